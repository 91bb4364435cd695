"""Listing the registry (``ember list``, ``/api/tags``, ``/v1/models``): it reads
manifests and config blobs only, so ``ember list`` loads no GGUF reader
(gguf-py, numpy) and no template engine."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ember.errors import InvalidFileError
from ember.registry import store


@dataclass
class ModelEntry:
    name: str
    digest: str
    size: int
    modified_at: datetime
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """One model of Ollama's ``/api/tags`` (and ``ember list --json``)."""
        return {"name": self.name, "model": self.name, "modified_at": iso_time(self.modified_at), "size": self.size,
                "digest": self.digest.removeprefix("sha256:"), "details": self.details}


def iso_time(t: datetime) -> str:
    """A time as Ollama's JSON writes it (UTC, ``Z``)."""
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z")


def mtime(t: float) -> datetime:
    return datetime.fromtimestamp(t, tz=UTC)


def details_of(m: store.Manifest) -> dict[str, Any]:
    """Ollama's ``details`` of a model, from its config blob."""
    try:
        cfg = store.read_blob_json(m.config.digest)
    except (OSError, ValueError):
        cfg = {}
    if not isinstance(cfg, dict):
        cfg = {}
    family = cfg.get("model_family") or ""
    return {
        "parent_model": cfg.get("parent_model", ""),
        "format": cfg.get("model_format") or "gguf",
        "family": family,
        "families": cfg.get("model_families") or ([family] if family else None),
        "parameter_size": cfg.get("model_type") or "",
        "quantization_level": cfg.get("file_type") or "",
    }


def list_models() -> list[ModelEntry]:
    """Every model in the registry, newest first (a registry's first listing
    registers the demo model; see :mod:`ember.registry.bundled`)."""
    if not (store.root() / store.OFFERED_MARKER).exists():
        # lazy: registering the demo reads its GGUF header (gguf-py, numpy);
        # only a registry's first listing does, so `ember list` starts fast.
        from ember.registry import bundled

        bundled.offer()
    out = []
    for p in store.iter_manifests():
        try:
            m = store.read_manifest(p)
        except (InvalidFileError, OSError):
            continue
        out.append(ModelEntry(m.name.display, m.digest, sum(layer.size for layer in m.layers), mtime(m.mtime), details_of(m)))
    out.sort(key=lambda e: e.modified_at, reverse=True)
    return out
