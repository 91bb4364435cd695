"""Layers and manifests: what every way into the registry (create, a hub
pull, the demo) shares once its files are ready.

Blobs are stored first (moved when they were made or downloaded for the
registry), then the config blob and, last, the manifest; see
:mod:`ember.registry.store` for why a killed writer never leaves a manifest
that names a missing blob. An Ollama registry pull writes the registry's own
manifest bytes and needs none of this.
"""

from __future__ import annotations

import contextlib
import platform
import sys
from pathlib import Path
from typing import Any

from ember.errors import InvalidFileError
from ember.gguf.inspect import format_params
from ember.progress import ProgressCallback
from ember.registry import ggufmeta, store
from ember.registry.names import ModelName

CONFIG_KEYS = ("model_format", "model_family", "model_families", "model_type", "file_type")


def file_layers(media_type: str, files: list[Path], progress: ProgressCallback | None = None, *,
                move: bool = False, expected: dict[Path, str] | None = None) -> list[store.Layer]:
    """Store ``files`` as blobs (in order) and return their layers. ``expected``
    maps a file to the sha256 its source advertised (checked by the store)."""
    layers = []
    for f in files:
        digest, size = store.add_file(f, progress, move=move, expected=(expected or {}).get(f))
        layers.append(store.Layer(media_type, digest, size))
    return layers


def text_layers(template: str | None = None, system: str | None = None, parameters: dict[str, Any] | None = None,
                messages: list[dict[str, str]] | None = None, licenses: list[str] | None = None) -> list[store.Layer]:
    """The small layers after the files, in Ollama's order."""
    layers = []
    if template is not None:
        layers.append(store.Layer(store.MEDIA_TEMPLATE, *store.add_bytes(template.encode())))
    if system is not None:
        layers.append(store.Layer(store.MEDIA_SYSTEM, *store.add_bytes(system.encode())))
    if parameters:
        layers.append(store.Layer(store.MEDIA_PARAMS, *store.add_json(parameters)))
    if messages:
        layers.append(store.Layer(store.MEDIA_MESSAGES, *store.add_json(messages)))
    for text in licenses or []:
        layers.append(store.Layer(store.MEDIA_LICENSE, *store.add_bytes(text.encode())))
    return layers


def model_config(infos: list[ggufmeta.GGUFInfo]) -> dict[str, Any]:
    """Ollama's config fields that describe the model, from its GGUF shards."""
    arch = infos[0].architecture or ""
    return {
        "model_format": "gguf",
        "model_family": arch,
        "model_families": [arch] if arch else None,
        "model_type": format_params(sum(i.n_params for i in infos)),
        "file_type": infos[0].file_type or "",
    }


def write_model(name: ModelName, layers: list[store.Layer], model_cfg: dict[str, Any]) -> store.Manifest | None:
    """Write the config blob and the manifest of ``name`` (the caller holds
    :func:`store.writing`); return the manifest this one replaced, if any, so
    the caller can prune its layers once the lock is released."""
    cfg = {k: model_cfg.get(k) for k in CONFIG_KEYS}
    cfg.update({
        # Ollama writes Go's GOARCH/GOOS here.
        "architecture": {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine().lower(), platform.machine().lower()),
        "os": {"win32": "windows"}.get(sys.platform, sys.platform),
        "rootfs": {"type": "layers", "diff_ids": [layer.digest for layer in layers]},
    })
    config = store.Layer(store.CONFIG_MEDIA, *store.add_json(cfg))
    old = None
    old_path = store.find_manifest_path(name)
    if old_path is not None:
        with contextlib.suppress(InvalidFileError, OSError):  # a damaged manifest is simply replaced
            old = store.read_manifest(old_path)
    store.write_manifest(name, config, layers)
    return old


def replaced_digests(old: store.Manifest | None) -> set[str]:
    """Prune candidates: every blob of a manifest that was just replaced."""
    return set() if old is None else {old.config.digest, *(layer.digest for layer in old.layers)}
