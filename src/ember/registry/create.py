"""``ember create``: Modelfile -> blobs + manifest.

Everything a user can get wrong (name, Modelfile, TEMPLATE, FROM files,
shards, adapters) is checked before the registry is touched; conversion and
quantization happen in a work folder (:mod:`ember.registry.derive`); blobs,
config and manifest are written by :mod:`ember.registry.assemble`, the
manifest last (see :mod:`ember.registry.store` for the crash-safety argument).

Split GGUF models: every shard becomes its own ``application/vnd.ollama.image.model``
layer, in ``split.no`` order (what Ollama's split import does), and
:func:`ember.registry.resolve` returns the blob paths in that order.

Vision models: a second FROM naming a projector GGUF (``general.type``
``mmproj`` or architecture ``clip``) becomes an
``application/vnd.ollama.image.projector`` layer, as in Ollama; so does the
projector a converted checkpoint folder yields. A model built FROM another
keeps its projector unless a new one is given.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ember.errors import EmberError, InvalidFileError, ModelfileError, TemplateError
from ember.fsutil import path_kind
from ember.progress import ProgressCallback
from ember.quantize import parse_quant_type
from ember.registry import assemble, derive, ggufmeta, store
from ember.registry.core import ResolvedModel, find_model, from_manifest, shown
from ember.registry.modelfile import Modelfile, parse_modelfile, read_modelfile
from ember.registry.names import is_hub_ref, parse_hub_ref, parse_name
from ember.registry.pull import pull_model
from ember.templates import ChatTemplate

_MODEL_SUFFIXES = (".gguf", ".bin", ".safetensors", ".pth", ".pt")


@dataclass
class _Plan:
    model_files: list[Path] = field(default_factory=list)  # ordered shards
    projectors: list[Path] = field(default_factory=list)
    adapters: list[Path] = field(default_factory=list)
    adapter_dirs: list[tuple[Path, int]] = field(default_factory=list)
    convert_dir: Path | None = None
    base: store.Manifest | None = None
    pull: str | None = None


def load_modelfile(modelfile: Modelfile | str | os.PathLike[str] | None) -> Modelfile:
    """A :class:`Modelfile`, Modelfile text (``str``), a path (``Path``) or
    None for ``./Modelfile``."""
    if isinstance(modelfile, Modelfile):
        return modelfile
    if modelfile is None:
        return read_modelfile(Path("Modelfile"))
    if isinstance(modelfile, str):
        return parse_modelfile(modelfile, base_dir=Path.cwd())
    return read_modelfile(Path(modelfile))


def check_template(mf: Modelfile) -> None:
    """Parse TEMPLATE so a broken template fails at create time with its line number."""
    if mf.template is None:
        return
    try:
        ChatTemplate.parse(mf.template)
    except TemplateError as e:
        msg = str(e)
        line = mf.line_of("template")
        m = re.match(r"(?:chat |jinja |go )?template line (\d+):\s*(.*)", msg, re.IGNORECASE)
        if m and line:
            # The template's text starts on the TEMPLATE line: report the Modelfile's line.
            line += int(m.group(1)) - 1
            msg = m.group(2)
        where = f"{mf.filename} line {line}" if line else mf.filename
        raise ModelfileError(f"{where}: TEMPLATE does not parse: {msg}") from None


def looks_like_path(value: str) -> bool:
    """A FROM value meant as a file, not a model name."""
    return (
        value.startswith((".", "/", "~", "\\"))
        or value.lower().endswith(_MODEL_SUFFIXES)
        or (len(value) > 1 and value[1] == ":")  # C:\...
        or "\\" in value
    )


def _pullable(value: str) -> bool:
    """An explicit hub reference (hf.co/..., huggingface.co/..., modelscope.cn/...)."""
    if not is_hub_ref(value):
        return False
    try:
        parse_hub_ref(value)
    except EmberError:
        return False
    return True


def _outside(path: Path, files_under: Path | None) -> bool:
    """Whether ``path`` (its target, links followed) lies outside ``files_under``."""
    if files_under is None:
        return False
    try:
        return not Path(os.path.realpath(path)).is_relative_to(os.path.realpath(files_under))
    except (OSError, ValueError):
        return True


def plan(mf: Modelfile, files_under: Path | None = None) -> _Plan:
    """Check every FROM and ADAPTER without writing anything. With
    ``files_under``, only files there are read; any other FROM is a model name."""
    pl = _Plan()
    gguf_sources: list[tuple[Path, int]] = []
    for idx, value in enumerate(mf.from_):
        where = mf.where("from", idx)
        line = mf.line_of("from", idx) or 0
        path = mf.resolve_path(value)
        kind = "missing" if _outside(path, files_under) else path_kind(path)
        if kind == "other":
            raise ModelfileError(f"{where}: {shown(str(path), 200)} is not a regular file (a pipe, device or socket); give a .gguf file")
        if kind == "dir":
            if not derive.is_checkpoint(path):
                raise ModelfileError(f"{where}: folder {path} holds no safetensors or pytorch_model*.bin weights; name a .gguf file instead")
            if pl.convert_dir is not None:
                raise ModelfileError(f"{where}: only one model folder may be given")
            pl.convert_dir = path
            continue
        if kind == "file":
            if not ggufmeta.is_gguf(path):
                raise ModelfileError(f"{where}: {path} is not a GGUF file; give a .gguf file, a model folder or a model name")
            try:
                shards = ggufmeta.find_shards(path)
            except InvalidFileError as e:
                raise ModelfileError(f"{where}: {e}") from None
            gguf_sources.extend((s, line) for s in shards)
            continue
        base = None
        if not looks_like_path(value):
            try:
                base = find_model(value)
            except EmberError:
                base = None
        if base is not None or _pullable(value):
            if pl.base is not None or pl.pull is not None:
                raise ModelfileError(f"{where}: only one FROM may name a model")
            if base is None:
                pl.pull = value  # like Ollama: a hub model that is not here yet is pulled first
            pl.base = base
            continue
        if looks_like_path(value) or "/" in value or len(value) > 255:
            raise ModelfileError(f"{where}: FROM file not found: {shown(str(path), 200)}")
        raise ModelfileError(f"{where}: FROM {shown(value)} is neither a file nor a model in the registry; see 'ember list', or 'ember pull' it first")

    seen: set[Path] = set()
    models: list[tuple[ggufmeta.GGUFInfo, int]] = []
    for path, line in gguf_sources:
        real = path.resolve()
        if real in seen:
            continue
        seen.add(real)
        try:
            info = ggufmeta.read_info(path)
        except InvalidFileError as e:
            raise ModelfileError(f"{mf.filename} line {line}: {e}") from None
        if info.is_projector:
            pl.projectors.append(path)
        elif info.is_adapter:
            raise ModelfileError(f"{mf.filename} line {line}: {path.name} is a LoRA adapter; use ADAPTER for it")
        else:
            models.append((info, line))
    named = pl.base is not None or pl.pull is not None
    if models and (named or pl.convert_dir is not None):
        raise ModelfileError(f"{mf.filename} line {models[0][1]}: FROM gives two models (a GGUF file and a {'model name' if named else 'folder'})")
    if named and pl.convert_dir is not None:
        raise ModelfileError(f"{mf.where('from')}: FROM gives two models (a model name and a folder)")
    if len(models) > 1:
        counts = {i.split_count for i, _ in models}
        nos = sorted(i.split_no for i, _ in models)
        line = models[1][1]
        if 1 in counts:
            single = next(i for i, _ in models if i.split_count == 1)
            other = next(x for x in models if x[0] is not single) if models[0][0] is single else models[0]
            line = max(other[1], next(ln for i, ln in models if i is single))
            raise ModelfileError(
                f"{mf.filename} line {line}: a second model file ({single.path.name} and {other[0].path.name}); "
                "FROM may repeat only for the shards of one split model or a projector"
            )
        if len(counts) > 1 or nos != list(range(models[0][0].split_count)):
            raise ModelfileError(
                f"{mf.filename} line {line}: the FROM files are not the complete shards of one split model "
                f"(found shards {[n + 1 for n in nos]} of {sorted(counts)})"
            )
        models.sort(key=lambda x: x[0].split_no)
    elif len(models) == 1 and models[0][0].split_count > 1:
        i, line = models[0]
        raise ModelfileError(
            f"{mf.filename} line {line}: {i.path.name} is shard {i.split_no + 1} of {i.split_count}; "
            "keep the shards' -0000N-of-0000M.gguf names or add a FROM line for each shard"
        )
    pl.model_files = [i.path for i, _ in models]
    if pl.model_files:
        try:
            ggufmeta.check_model(pl.model_files)
        except InvalidFileError as e:
            raise ModelfileError(f"{mf.filename} line {models[0][1]}: {e}") from None
    if not pl.model_files and not named and pl.convert_dir is None:
        raise ModelfileError(f"{mf.where('from')}: FROM names only a projector; add the model file")

    for idx, value in enumerate(mf.adapters):
        where = mf.where("adapter", idx)
        path = mf.resolve_path(value)
        kind = "missing" if _outside(path, files_under) else path_kind(path)
        if kind == "missing":
            raise ModelfileError(f"{where}: ADAPTER file not found: {shown(str(path), 200)}")
        if kind == "other":
            raise ModelfileError(f"{where}: {shown(str(path), 200)} is not a regular file (a pipe, device or socket); give a GGUF adapter")
        if kind == "dir":
            pl.adapter_dirs.append((path, idx))
            continue
        try:
            info = ggufmeta.read_info(path)
        except InvalidFileError as e:
            raise ModelfileError(f"{where}: {e}") from None
        if not info.is_adapter:
            raise ModelfileError(f"{where}: {path.name} is not a LoRA adapter GGUF (general.type is {info.general_type!r})")
        pl.adapters.append(path)
    return pl


def create_model(
    name: str,
    modelfile: Modelfile | str | os.PathLike[str] | None = None,
    *,
    quantize: str | None = None,
    progress: ProgressCallback | None = None,
    files_under: Path | None = None,
) -> ResolvedModel:
    """Create (or replace) model ``name`` from a Modelfile; see the module doc.
    ``files_under``: read files only from there (the server passes the model
    store, where uploaded blobs live); any other FROM is a model name."""
    mname = parse_name(name)
    mf = load_modelfile(modelfile)
    check_template(mf)
    if quantize is not None:
        quantize = parse_quant_type(quantize)
    pl = plan(mf, files_under)
    if pl.pull is not None:  # like Ollama: FROM a hub model that is not here yet pulls it first
        pl.base = find_model(pull_model(pl.pull, progress=progress).name)
    base = from_manifest(pl.base) if pl.base is not None else None
    base_cfg: dict[str, Any] = {}
    if pl.base is not None:
        try:
            base_cfg = dict(store.read_blob_json(pl.base.config.digest))
        except (OSError, ValueError, TypeError):
            base_cfg = {}

    with store.writing(), derive.work_dir() as work:
        model_files = list(pl.model_files)
        projectors = list(pl.projectors)
        derived = False
        if pl.convert_dir is not None:
            model_files, converted_projectors = derive.convert_checkpoint(pl.convert_dir, work, quantize or "auto", progress)
            projectors += converted_projectors
            derived = True
        elif quantize is not None:
            model_files = derive.quantize_files(model_files or (base.model_paths if base else []), work, quantize, progress)
            derived = True
        adapters = list(pl.adapters)
        if pl.adapter_dirs:
            # A PEFT adapter is converted against its base: the HF folder, else the model GGUF.
            lora_base = pl.convert_dir or derive.named(model_files or (base.model_paths if base else []), work)
            adapters += [derive.convert_adapter(d, lora_base, work, idx, progress) for d, idx in pl.adapter_dirs]

        if model_files:
            layers = assemble.file_layers(store.MEDIA_MODEL, model_files, progress, move=derived)
            model_cfg = assemble.model_config([ggufmeta.read_info(store.blob_path(layer.digest)) for layer in layers])
        else:
            assert pl.base is not None
            layers = pl.base.of_type(store.MEDIA_MODEL)
            model_cfg = base_cfg
        if pl.base is not None:
            if not projectors:
                layers += pl.base.of_type(store.MEDIA_PROJECTOR)
            if not adapters:
                layers += pl.base.of_type(store.MEDIA_ADAPTER)
        for media, files in ((store.MEDIA_PROJECTOR, projectors), (store.MEDIA_ADAPTER, adapters)):
            for f in files:  # made in the work folder: moved; the user's own files: copied
                layers += assemble.file_layers(media, [f], progress, move=f.is_relative_to(work))

        params = dict(base.parameters) if base else {}
        params.update(mf.parameters)
        layers += assemble.text_layers(
            template=mf.template if mf.template is not None else (base.template if base else None),
            system=mf.system if mf.system is not None else (base.system if base else None),
            parameters=params,
            messages=mf.messages or (base.messages if base else []),
            licenses=mf.licenses or (base.license if base else []),
        )
        old = assemble.write_model(mname, layers, model_cfg)
    # Always prune: the replaced version's layers, and leftovers of killed creates.
    store.prune(assemble.replaced_digests(old))
    found = find_model(mname.display)
    if found is None:  # pragma: no cover - a concurrent rm
        raise InvalidFileError(f"model {mname.display!r} was removed while it was being created")
    return from_manifest(found)
