"""``ember create``: Modelfile -> blobs + manifest.

Everything a user can get wrong (name, Modelfile, TEMPLATE, FROM files,
shards, adapters) is checked before the registry is touched; conversion and
quantization write into a work folder inside the registry (same file system,
so results are renamed into ``blobs/`` rather than copied); the manifest is
written last (see :mod:`ember.registry.store` for the crash-safety argument).

Split GGUF models: every shard becomes its own ``application/vnd.ollama.image.model``
layer, in ``split.no`` order (what Ollama's split import does), and
:func:`ember.registry.resolve` returns the blob paths in that order.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import sys
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ember.errors import EmberError, InvalidFileError, ModelfileError, TemplateError
from ember.progress import ProgressCallback
from ember.registry import ggufmeta, store
from ember.registry.core import ResolvedModel, find_model, from_manifest
from ember.registry.modelfile import Modelfile, parse_modelfile, read_modelfile
from ember.registry.names import parse_name

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
    infos: dict[Path, ggufmeta.GGUFInfo] = field(default_factory=dict)


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
    """Parse TEMPLATE with :mod:`ember.templates` (when present) so a broken
    template fails at create time with its line number."""
    if mf.template is None:
        return
    try:
        from ember.templates import ChatTemplate  # type: ignore[attr-defined]
    except ImportError:
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


def _looks_like_path(value: str) -> bool:
    return (
        value.startswith((".", "/", "~", "\\"))
        or value.lower().endswith(_MODEL_SUFFIXES)
        or (len(value) > 1 and value[1] == ":")  # C:\...
        or "\\" in value
    )


def _pullable(value: str) -> bool:
    """An explicit hub reference (hf.co/..., huggingface.co/..., modelscope.cn/...)."""
    from ember.registry.pull import HF_HOSTS, MS_HOSTS, parse_ref

    host = value.split("/", 1)[0].lower()
    if host not in HF_HOSTS + MS_HOSTS:
        return False
    try:
        parse_ref(value)
    except EmberError:
        return False
    return True


def _is_hf_dir(p: Path) -> bool:
    pats = ("*.safetensors", "pytorch_model*.bin", "consolidated*.pth")
    return any(next(p.glob(g), None) is not None for g in pats)


def plan(mf: Modelfile) -> _Plan:
    """Check every FROM and ADAPTER without writing anything."""
    pl = _Plan()
    gguf_sources: list[tuple[Path, int]] = []
    for idx, value in enumerate(mf.from_):
        where = mf.where("from", idx)
        line = mf.line_of("from", idx) or 0
        path = mf.resolve_path(value)
        if path.exists():
            if path.is_dir():
                if not _is_hf_dir(path):
                    raise ModelfileError(f"{where}: folder {path} holds no safetensors or pytorch_model*.bin weights; name a .gguf file instead")
                if pl.convert_dir is not None:
                    raise ModelfileError(f"{where}: only one model folder may be given")
                if _converter() is None:
                    raise ModelfileError(f"{where}: converting Hugging Face folders is not supported yet; convert {path.name} to GGUF first")
                pl.convert_dir = path
                continue
            if not ggufmeta.is_gguf(path):
                raise ModelfileError(f"{where}: {path} is not a GGUF file; give a .gguf file, a model folder or a model name")
            try:
                shards = ggufmeta.find_shards(path)
            except InvalidFileError as e:
                raise ModelfileError(f"{where}: {e}") from None
            gguf_sources.extend((s, line) for s in shards)
            continue
        base = None
        if not _looks_like_path(value):
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
        if _looks_like_path(value) or "/" in value:
            raise ModelfileError(f"{where}: FROM file not found: {path}")
        raise ModelfileError(f"{where}: FROM {value!r} is neither a file nor a model in the registry; see 'ember list' or 'ember pull'")

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
        pl.infos[path] = info
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
        if not path.exists():
            raise ModelfileError(f"{where}: ADAPTER file not found: {path}")
        if path.is_dir():
            if _lora_converter() is None:
                raise ModelfileError(f"{where}: converting PEFT adapter folders is not supported yet; convert it to a GGUF adapter first")
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


@contextlib.contextmanager
def _work_dir() -> Iterator[Path]:
    base = store.root() / "tmp"
    base.mkdir(parents=True, exist_ok=True)
    d = Path(tempfile.mkdtemp(prefix=store.TMP_PREFIX, dir=base))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _converter() -> Any:
    try:
        from ember.convert import convert_model  # type: ignore[attr-defined]
    except ImportError:
        try:
            from ember.convert.core import convert_model
        except ImportError:
            return None
    return convert_model


def _lora_converter() -> Any:
    try:
        from ember.convert import convert_lora  # type: ignore[attr-defined]
    except ImportError:
        return None
    return convert_lora


def _convert(src: Path, work: Path, outtype: str, progress: ProgressCallback | None) -> list[Path]:
    convert_model = _converter()
    if convert_model is None:
        raise ModelfileError("converting Hugging Face folders is not supported yet; convert to GGUF first")
    first = convert_model(src, work / "model.gguf", outtype=outtype, progress=progress)
    return ggufmeta.find_shards(Path(first))


def _named(files: list[Path], work: Path) -> Path:
    """Blobs have no .gguf or shard names, which llama.cpp and the converters go
    by: link them under such names in the work folder; return the first."""
    if len(files) == 1 and files[0].name.endswith(".gguf"):
        return files[0]
    links = Path(tempfile.mkdtemp(prefix="in-", dir=work))
    names = ["model.gguf"] if len(files) == 1 else [f"model-{i + 1:05d}-of-{len(files):05d}.gguf" for i in range(len(files))]
    for f, n in zip(files, names, strict=True):
        os.symlink(f, links / n)
    return links / names[0]


def _quantize(files: list[Path], work: Path, qtype: str, progress: ProgressCallback | None) -> list[Path]:
    try:
        from ember.quantize import quantize_model
    except ImportError:
        raise ModelfileError("quantizing is not supported yet (ember.quantize is missing)") from None
    out = quantize_model(_named(files, work), work / "quantized.gguf", qtype, progress=progress)
    return [Path(p) for p in out]


def _config(files: list[Path], infos: dict[Path, ggufmeta.GGUFInfo], layers: list[store.Layer],
            base_cfg: dict[str, Any] | None) -> dict[str, Any]:
    cfg: dict[str, Any]
    if files:
        got = [infos.get(f) or ggufmeta.read_info(f) for f in files]
        arch = got[0].architecture or ""
        cfg = {
            "model_format": "gguf",
            "model_family": arch,
            "model_families": [arch] if arch else None,
            "model_type": ggufmeta.format_params(sum(i.n_params for i in got)),
            "file_type": got[0].file_type or "",
        }
    else:
        cfg = {k: (base_cfg or {}).get(k) for k in ("model_format", "model_family", "model_families", "model_type", "file_type")}
    cfg.update({
        # Ollama writes Go's GOARCH/GOOS here.
        "architecture": {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine().lower(), platform.machine().lower()),
        "os": {"win32": "windows"}.get(sys.platform, sys.platform),
        "rootfs": {"type": "layers", "diff_ids": [layer.digest for layer in layers]},
    })
    return cfg


def create_model(
    name: str,
    modelfile: Modelfile | str | os.PathLike[str] | None = None,
    *,
    quantize: str | None = None,
    progress: ProgressCallback | None = None,
    _move_sources: bool = False,
    _expected: dict[Path, str] | None = None,
) -> ResolvedModel:
    """Create (or replace) model ``name`` from a Modelfile; see the module doc.

    (``_move_sources``/``_expected`` are for pull: downloaded files are moved
    into ``blobs/`` and checked against the hub's sha256.)"""
    mname = parse_name(name)
    mf = load_modelfile(modelfile)
    check_template(mf)
    if quantize is not None:
        try:
            from ember.quantize import parse_quant_type

            quantize = parse_quant_type(quantize)
        except ImportError:
            pass
    pl = plan(mf)
    if pl.pull is not None:
        from ember.registry.pull import pull_model

        pulled = pull_model(pl.pull, progress=progress)
        pl.base = find_model(pulled.name)
    base = from_manifest(pl.base) if pl.base is not None else None
    base_cfg: dict[str, Any] | None = None
    if pl.base is not None:
        try:
            base_cfg = store.read_blob_json(pl.base.config.digest)
        except (OSError, ValueError):
            base_cfg = None

    with store.writing(), _work_dir() as work:
        model_files = list(pl.model_files)
        derived = False
        if pl.convert_dir is not None:
            model_files = _convert(pl.convert_dir, work, quantize or "auto", progress)
            derived = True
        elif quantize is not None:
            src = model_files or (base.model_paths if base else [])
            model_files = _quantize(src, work, quantize, progress)
            derived = True
        adapters = list(pl.adapters)
        if pl.adapter_dirs:
            # A PEFT adapter is converted against its base: the HF folder, else the model GGUF.
            lora_base = pl.convert_dir or _named(model_files or (base.model_paths if base else []), work)
            for d, idx in pl.adapter_dirs:
                adapters.append(_convert_adapter(d, lora_base, work, mf, idx, progress))

        layers: list[store.Layer] = []
        if model_files:
            for f in model_files:
                digest, size = store.add_file(f, progress, move=derived or _move_sources,
                                              expected=(_expected or {}).get(f.resolve()))
                layers.append(store.Layer(store.MEDIA_MODEL, digest, size))
        else:
            assert pl.base is not None
            layers += pl.base.of_type(store.MEDIA_MODEL)
        if pl.base is not None:
            if not pl.projectors:
                layers += pl.base.of_type(store.MEDIA_PROJECTOR)
            if not adapters:
                layers += pl.base.of_type(store.MEDIA_ADAPTER)
        for media, files in ((store.MEDIA_PROJECTOR, pl.projectors), (store.MEDIA_ADAPTER, adapters)):
            for f in files:
                moved = f.is_relative_to(work) or (_move_sources and media == store.MEDIA_PROJECTOR)
                digest, size = store.add_file(f, progress, move=moved,
                                              expected=(_expected or {}).get(f.resolve()))
                layers.append(store.Layer(media, digest, size))

        template = mf.template if mf.template is not None else (base.template if base else None)
        system = mf.system if mf.system is not None else (base.system if base else None)
        params = dict(base.parameters) if base else {}
        params.update(mf.parameters)
        messages = mf.messages if mf.messages else (base.messages if base else [])
        licenses = mf.licenses if mf.licenses else (base.license if base else [])
        if template is not None:
            layers.append(store.Layer(store.MEDIA_TEMPLATE, *store.add_bytes(template.encode())))
        if system is not None:
            layers.append(store.Layer(store.MEDIA_SYSTEM, *store.add_bytes(system.encode())))
        if params:
            layers.append(store.Layer(store.MEDIA_PARAMS, *store.add_json(params)))
        if messages:
            layers.append(store.Layer(store.MEDIA_MESSAGES, *store.add_json(messages)))
        for lic in licenses:
            layers.append(store.Layer(store.MEDIA_LICENSE, *store.add_bytes(lic.encode())))

        infos = dict(pl.infos)
        cfg_files = model_files if (model_files and not derived) else []
        if derived:
            cfg_files = [store.blob_path(layer.digest) for layer in layers if layer.media_type == store.MEDIA_MODEL]
        cfg = _config(cfg_files, infos, layers, base_cfg)
        config = store.Layer(store.CONFIG_MEDIA, *store.add_json(cfg))
        old = find_model(mname.display)
        store.write_manifest(mname, config, layers)
    if old is not None:  # the layers of the version this one replaced
        store.prune({old.config.digest, *(layer.digest for layer in old.layers)})
    found = find_model(mname.display)
    if found is None:  # pragma: no cover - a concurrent rm
        raise InvalidFileError(f"model {mname.display!r} was removed while it was being created")
    return from_manifest(found)


def _convert_adapter(d: Path, lora_base: Path, work: Path, mf: Modelfile, idx: int,
                     progress: ProgressCallback | None) -> Path:
    convert_lora = _lora_converter()
    if convert_lora is None:
        raise ModelfileError(
            f"{mf.where('adapter', idx)}: converting PEFT adapter folders is not supported yet; convert it to a GGUF adapter first"
        )
    out = convert_lora(d, lora_base, work / f"adapter{idx}.gguf", progress=progress)
    return Path(out)
