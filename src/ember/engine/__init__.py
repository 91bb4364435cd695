"""Inference on llama.cpp's low-level API: models, contexts, samplers and the
scheduler that batches many sequences into one context."""

from __future__ import annotations

from ember.engine.model import Context, LoadedModel, MemoryReport


def load_model(paths, options=None, *, lora=None) -> LoadedModel:  # type: ignore[no-untyped-def]
    """Load a GGUF (any shard of a split model, or a list of shards)."""
    return LoadedModel(paths, options, lora=lora)


__all__ = ["Context", "LoadedModel", "MemoryReport", "load_model"]
