"""The one resolver of a model reference, used by the Python API, the server
and the CLI: a registry name (``demo``, ``qwen2.5:7b``), a GGUF file (any
shard of a split model), or a Hugging Face directory (converted once to a
cached F16 GGUF). The server can refuse filesystem paths for remote clients.
"""

from __future__ import annotations

import hashlib
from dataclasses import fields, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from ember.convert import convert_model
from ember.demo import DEMO_NAME, cache_dir, demo_model_path
from ember.errors import ModelNotFoundError, OptionError
from ember.progress import ProgressCallback
from ember.registry.core import ResolvedModel, find_model, from_manifest, resolve


def resolve_model(
    ref: str | Path,
    *,
    allow_paths: bool = True,
    convert: bool = False,
    progress: ProgressCallback | None = None,
) -> ResolvedModel:
    """What to load for ``ref``.

    ``allow_paths=False`` accepts registry names (and ``demo``) only, never a
    path on this machine. ``convert=True`` converts a Hugging Face directory
    (one with a config.json) into a cached GGUF instead of refusing it.
    """
    text = str(ref)
    if not text.strip():
        raise OptionError("model is required")
    try:
        if not allow_paths:
            return _registry_only(text)
        path = Path(text).expanduser()
        if convert and path.is_dir() and (path / "config.json").is_file():
            gguf = converted_gguf(path, progress=progress)
            r = resolve(str(gguf))
            projector = gguf.with_name("mmproj-" + gguf.name)  # a vision model's companion file
            return replace(r, projector_paths=[projector]) if projector.is_file() else r
        return resolve(text)
    except (OSError, ValueError):  # names no file system accepts: too long, NUL bytes
        raise ModelNotFoundError(f"model '{text[:200]}' not found") from None


def _registry_only(name: str) -> ResolvedModel:
    manifest = find_model(name)
    if manifest is not None:
        return from_manifest(manifest)
    if name.lower() in (DEMO_NAME, DEMO_NAME + ":latest"):
        return replace(resolve(str(demo_model_path())), name=DEMO_NAME + ":latest")
    raise ModelNotFoundError(f"model '{name[:200]}' not found; see 'ember list', or get it with 'ember pull'")


def model_key(r: ResolvedModel) -> str:
    """The identity of what ``r`` loads: its name and its files. Two files of
    the same name in different folders are different models."""
    files = [str(p) for p in r.model_paths + r.projector_paths + r.adapter_paths]
    return "\n".join([r.name, *files])


def converted_gguf(model_dir: Path, *, progress: ProgressCallback | None = None) -> Path:
    """A Hugging Face directory converted once to an F16 GGUF in the cache; the
    cache key covers the directory's path, file names, sizes and times."""
    h = hashlib.sha256(str(model_dir.resolve()).encode())
    for f in sorted(model_dir.iterdir()):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    out = cache_dir() / "converted" / f"{model_dir.name}-{h.hexdigest()[:16]}.gguf"
    if not out.is_file():
        convert_model(model_dir, out, outtype="f16", progress=progress)
    return out


def resolved_to_dict(r: ResolvedModel) -> dict[str, Any]:
    """JSON form of a resolved model (the server hands it to a runner process)."""
    out: dict[str, Any] = {}
    for f in fields(r):
        value = getattr(r, f.name)
        if isinstance(value, datetime):
            value = value.isoformat()
        elif isinstance(value, list) and value and isinstance(value[0], Path):
            value = [str(p) for p in value]
        out[f.name] = value
    return out


def resolved_from_dict(data: dict[str, Any]) -> ResolvedModel:
    r = ResolvedModel(**{f.name: data[f.name] for f in fields(ResolvedModel) if f.name in data})
    r.model_paths = [Path(p) for p in r.model_paths]
    r.projector_paths = [Path(p) for p in r.projector_paths]
    r.adapter_paths = [Path(p) for p in r.adapter_paths]
    if isinstance(r.modified_at, str):
        r.modified_at = datetime.fromisoformat(r.modified_at)
    return r
