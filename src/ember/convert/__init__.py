"""Hugging Face checkpoints -> GGUF (``convert_model``) and PEFT LoRA adapters ->
GGUF adapters (``convert_lora``). A small core (``core``, ``source``,
``tokenizer``) plus one module per architecture with only what is special."""

from __future__ import annotations

from ember.convert.core import convert_model, supported_architectures
from ember.errors import ConversionError, InvalidFileError


def convert_lora(*args, **kwargs):  # type: ignore[no-untyped-def]
    """See :func:`ember.convert.lora.convert_lora`."""
    from ember.convert.lora import convert_lora as _convert_lora

    return _convert_lora(*args, **kwargs)


__all__ = ["convert_model", "convert_lora", "supported_architectures", "ConversionError", "InvalidFileError"]
