"""Reading the registry: resolve a name (or a GGUF path) to what the engine
loads, list, show, copy and delete models."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ember import options
from ember.errors import EmberError, InvalidFileError, InvalidNameError, ModelNotFoundError
from ember.registry import ggufmeta, store
from ember.registry.modelfile import Modelfile, parameter_lines
from ember.registry.names import parse_name

DEMO_NAMES = ("demo", "demo:latest")


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


@dataclass
class ModelEntry:
    name: str
    digest: str
    size: int
    modified_at: datetime
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelDetails:
    name: str
    modelfile: str
    parameters: str  # Ollama's text form: one "name value" per line
    template: str | None
    system: str | None
    license: list[str]
    messages: list[dict[str, str]]
    details: dict[str, Any]
    model_info: dict[str, Any]
    digest: str | None
    modified_at: datetime | None
    resolved: ResolvedModel


def _mtime(t: float) -> datetime:
    return datetime.fromtimestamp(t, tz=timezone.utc)


def find_model(name: str) -> store.Manifest | None:
    """The manifest of a registry name (case-insensitive), or None."""
    mname = parse_name(name)
    path = store.find_manifest_path(mname)
    if path is None:
        return None
    m = store.read_manifest(path)
    return m


def _require(name: str) -> store.Manifest:
    m = find_model(name)
    if m is None:
        raise ModelNotFoundError(f"model {name!r} not found; see 'ember list', or get it with 'ember pull' or 'ember create'")
    return m


def resolve(name_or_path: str) -> ResolvedModel:
    """A registry name (case-insensitive) or a GGUF file (any shard of a split
    model) -> what to load. ``demo`` falls back to the bundled demo model."""
    text = str(name_or_path)
    manifest = None
    try:
        manifest = find_model(text)
    except InvalidNameError:
        manifest = None
    if manifest is not None:
        return from_manifest(manifest)
    path = Path(os.path.expanduser(text))
    if path.is_file():
        return _from_file(path)
    if text.lower() in DEMO_NAMES:
        from ember.demo import demo_model_path

        return _from_file(Path(demo_model_path()), name="demo:latest")
    if path.is_dir():
        raise ModelNotFoundError(f"{text} is a folder; convert it with 'ember convert' or register it with 'ember create NAME --from {text}'")
    raise ModelNotFoundError(f"model {text!r} not found: no such model in the registry and no such file; see 'ember list', or get it with 'ember pull'")


def _from_file(path: Path, name: str | None = None) -> ResolvedModel:
    shards = ggufmeta.find_shards(path.resolve())
    return ResolvedModel(
        name=name or path.name,
        model_paths=shards,
        size=sum(p.stat().st_size for p in shards),
        modified_at=_mtime(path.stat().st_mtime),
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
        modified_at=_mtime(m.mtime),
    )


def _config(m: store.Manifest) -> dict[str, Any]:
    try:
        cfg = store.read_blob_json(m.config.digest)
        return cfg if isinstance(cfg, dict) else {}
    except (OSError, ValueError):
        return {}


def details_of(m: store.Manifest) -> dict[str, Any]:
    cfg = _config(m)
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
    """Every model in the registry, newest first."""
    out = []
    for p in store.iter_manifests():
        try:
            m = store.read_manifest(p)
        except (InvalidFileError, OSError):
            continue
        out.append(ModelEntry(m.name.display, m.digest, sum(layer.size for layer in m.layers), _mtime(m.mtime), details_of(m)))
    out.sort(key=lambda e: e.modified_at, reverse=True)
    return out


def show_model(name: str) -> ModelDetails:
    """Details of a registry model, or of what :func:`resolve` finds for a GGUF
    path or ``demo`` (then from the file's own metadata)."""
    try:
        m = find_model(name)
    except InvalidNameError:
        m = None
    if m is None:
        return _show_file(resolve(name))
    r = from_manifest(m)
    info: dict[str, Any] = {}
    try:
        gi = ggufmeta.read_info(r.model_paths[0])
        info = dict(gi.metadata)
        if len(r.model_paths) > 1:
            info["general.parameter_count"] = sum(ggufmeta.read_info(p).n_params for p in r.model_paths)
        else:
            info["general.parameter_count"] = gi.n_params
    except EmberError:
        pass
    return ModelDetails(
        name=m.name.display,
        modelfile=modelfile_text(r),
        parameters="\n".join(_param_text(r.parameters)),
        template=r.template,
        system=r.system,
        license=r.license,
        messages=r.messages,
        details=details_of(m),
        model_info=info,
        digest=m.digest,
        modified_at=r.modified_at,
        resolved=r,
    )


def _show_file(r: ResolvedModel) -> ModelDetails:
    infos = [ggufmeta.read_info(p) for p in r.model_paths]
    first = infos[0]
    info = dict(first.metadata)
    info["general.parameter_count"] = sum(i.n_params for i in infos)
    arch = first.architecture or ""
    details = {
        "parent_model": "",
        "format": "gguf",
        "family": arch,
        "families": [arch] if arch else None,
        "parameter_size": ggufmeta.format_params(sum(i.n_params for i in infos)),
        "quantization_level": first.file_type or "",
    }
    return ModelDetails(
        name=r.name, modelfile=modelfile_text(r), parameters="", template=None, system=None, license=[],
        messages=[], details=details, model_info=info, digest=None, modified_at=r.modified_at, resolved=r,
    )


def _param_text(params: dict[str, Any]) -> list[str]:
    lines = []
    for line in parameter_lines(params):
        _, name, value = line.split(" ", 2)
        lines.append(f"{name:<30} {value}")
    return lines


def modelfile_text(r: ResolvedModel) -> str:
    """Ollama's ``show --modelfile``: FROM the blob paths, so the text creates
    the same model again."""
    out = [
        '# Modelfile generated by "ember show"',
        "# To build a new Modelfile based on this, replace FROM with:",
        f"# FROM {r.name}",
        "",
    ]
    body = Modelfile(
        from_=[str(p) for p in r.model_paths + r.projector_paths],
        adapters=[str(p) for p in r.adapter_paths],
        template=r.template,
        system=r.system,
        parameters=r.parameters,
        messages=r.messages,
        licenses=r.license,
    )
    return "\n".join(out) + "\n" + body.to_text()


def copy_model(src: str, dst: str) -> None:
    """``ember cp``: a second manifest naming the same blobs."""
    m = _require(src)
    dname = parse_name(dst)
    with store.writing():
        store.write_manifest(dname, m.config, m.layers)


def delete_model(name: str) -> None:
    """``ember rm``: remove the manifest, then blobs nothing else references."""
    m = _require(name)
    store.delete_manifest(m.path)
    store.prune({m.config.digest, *(layer.digest for layer in m.layers)})

