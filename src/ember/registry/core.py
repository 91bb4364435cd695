"""Reading the registry: resolve a name (or a GGUF path) to what the engine
loads, copy and delete models (listing is :mod:`ember.registry.listing`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from ember import options
from ember.demo import demo_model_path
from ember.errors import EmberError, InvalidFileError, InvalidNameError, ModelNotFoundError
from ember.fsutil import path_kind
from ember.registry import bundled, ggufmeta, store
from ember.registry.listing import mtime
from ember.registry.names import parse_name


@dataclass
class ResolvedModel:
    """Everything needed to load and prompt a model."""

    name: str
    model_paths: list[Path]
    projector_paths: list[Path] = field(default_factory=list)
    adapter_paths: list[Path] = field(default_factory=list)
    template: str | None = None
    system: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    messages: list[dict[str, str]] = field(default_factory=list)
    license: list[str] = field(default_factory=list)
    digest: str | None = None
    size: int = 0
    modified_at: datetime | None = None


def shown(text: str, limit: int = 60) -> str:
    """A user's name or path, quoted and cut short for a one-line message."""
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def find_model(name: str, *, register_demo: bool = True) -> store.Manifest | None:
    """The manifest of a registry name (case-insensitive), or None. Asking for
    ``demo`` registers the bundled demo model when it is missing."""
    mname = parse_name(name)
    path = store.find_manifest_path(mname)
    if path is not None:
        return store.read_manifest(path)
    if register_demo and bundled.is_demo(mname):
        try:
            return bundled.register()
        except OSError:  # a registry that cannot be written to: resolve() loads the file itself
            return None
    return None


def _require(name: str, *, register_demo: bool = True) -> store.Manifest:
    m = find_model(name, register_demo=register_demo)
    if m is None:
        raise ModelNotFoundError(f"model {shown(name)} not found; see 'ember list', or get it with 'ember pull' or 'ember create'")
    return m


def resolve(name_or_path: str) -> ResolvedModel:
    """A registry name (case-insensitive) or a GGUF file (any shard of a split
    model) -> what to load."""
    text = str(name_or_path)
    try:
        manifest = find_model(text)
    except InvalidNameError:
        manifest = None
    if manifest is not None:
        return from_manifest(manifest)
    path = Path(os.path.expanduser(text))
    kind = path_kind(path)
    if kind == "file":
        return _from_file(path)
    if bundled.is_demo_text(text):
        return _from_file(demo_model_path(), name="demo:latest")
    if kind == "dir":
        raise ModelNotFoundError(f"{shown(text)} is a folder; convert it with 'ember convert' or register it with 'ember create NAME --from FOLDER'")
    if kind == "other":
        raise ModelNotFoundError(f"{shown(text, 200)} is not a regular file (a pipe or device); give a GGUF file or a model name")
    raise ModelNotFoundError(f"model {shown(text)} not found: no such model in the registry and no such file; see 'ember list', or get it with 'ember pull'")


def _from_file(path: Path, name: str | None = None) -> ResolvedModel:
    shards = ggufmeta.find_shards(path.resolve())
    return ResolvedModel(
        name=name or path.name,
        model_paths=shards,
        size=sum(p.stat().st_size for p in shards),
        modified_at=mtime(path.stat().st_mtime),
    )


def from_manifest(m: store.Manifest) -> ResolvedModel:
    def paths(media: str) -> list[Path]:
        out = []
        for layer in m.of_type(media):
            p = store.blob_path(layer.digest)
            if not p.is_file():
                raise InvalidFileError(
                    f"model {m.name.display!r} is damaged: blob {layer.digest[:19]}... is missing; create or pull it again"
                )
            out.append(p)
        return out

    model_paths = paths(store.MEDIA_MODEL)
    if not model_paths:
        raise InvalidFileError(f"model {m.name.display!r} has no model layer; create or pull it again")
    template = system = None
    params: dict[str, Any] = {}
    messages: list[dict[str, str]] = []
    licenses: list[str] = []
    for layer in m.layers:
        try:
            if layer.media_type == store.MEDIA_TEMPLATE:
                template = store.read_blob_text(layer.digest)
            elif layer.media_type == store.MEDIA_SYSTEM:
                system = store.read_blob_text(layer.digest)
            elif layer.media_type == store.MEDIA_PARAMS:
                params = options.coerce_all(store.read_blob_json(layer.digest))
            elif layer.media_type == store.MEDIA_MESSAGES:
                messages = list(store.read_blob_json(layer.digest))
            elif layer.media_type == store.MEDIA_LICENSE:
                licenses.append(store.read_blob_text(layer.digest))
        except FileNotFoundError:
            raise InvalidFileError(
                f"model {m.name.display!r} is damaged: blob {layer.digest[:19]}... is missing; create or pull it again"
            ) from None
        except (ValueError, EmberError) as e:
            raise InvalidFileError(f"model {m.name.display!r}: layer {layer.media_type} is damaged ({e})") from None
    return ResolvedModel(
        name=m.name.display,
        model_paths=model_paths,
        projector_paths=paths(store.MEDIA_PROJECTOR),
        adapter_paths=paths(store.MEDIA_ADAPTER),
        template=template,
        system=system,
        parameters=params,
        messages=messages,
        license=licenses,
        digest=m.digest,
        size=sum(layer.size for layer in m.layers),
        modified_at=mtime(m.mtime),
    )


def copy_model(src: str, dst: str) -> None:
    """``ember cp``: a second manifest naming the same blobs."""
    m = _require(src)
    dname = parse_name(dst)
    with store.writing():
        store.write_manifest(dname, m.config, m.layers)


def delete_model(name: str) -> None:
    """``ember rm``: remove the manifest, then blobs nothing else references."""
    m = _require(name, register_demo=False)
    store.delete_manifest(m.path)
    store.prune({m.config.digest, *(layer.digest for layer in m.layers)})
