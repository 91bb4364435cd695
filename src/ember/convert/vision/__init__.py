"""Vision projectors: the image half of a vision-language checkpoint -> the
``clip`` GGUF (``mmproj-<name>-<TYPE>.gguf``) that libmtmd loads beside the
language model's GGUF. One module per architecture, found through the table
below (Hugging Face architecture -> module and class)."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import gguf

from ember.convert.vision.base import OUTTYPES, Projector, write_projector
from ember.errors import ConversionError
from ember.progress import ProgressCallback

_PROJECTORS: dict[str, tuple[str, str]] = {
    "InternVLChatModel": ("internvl", "InternVLProjector"),
    "InternVLForConditionalGeneration": ("internvl", "InternVLProjector"),
    "Gemma3ForConditionalGeneration": ("gemma3", "Gemma3Projector"),
    "Qwen2_5_VLForConditionalGeneration": ("qwen25vl", "Qwen25VLProjector"),
}


def vision_architectures() -> list[str]:
    return sorted(_PROJECTORS)


def make_projector(model_dir: str | os.PathLike[str]) -> Projector | None:
    """The projector converter for a checkpoint folder, or None when the model
    has no vision tower Ember converts (a text model)."""
    from ember.convert.core import load_config

    model_dir = Path(model_dir)
    config, config_file = load_config(model_dir)
    archs = config.get("architectures")
    arch = str(archs[0]) if isinstance(archs, list) and archs else None
    entry = _PROJECTORS.get(arch or "")
    if entry is None or not isinstance(config.get("vision_config"), dict):
        return None
    module = importlib.import_module(f"ember.convert.vision.{entry[0]}")
    cls: type[Projector] = getattr(module, entry[1])
    return cls(model_dir, config, config_file)


def projector_outtype(model_outtype: str) -> str:
    """The projector's type for a model converted with ``--outtype``: f32 stays
    f32 (for exact comparisons); everything else, quantized types included,
    gives f16, as llama.cpp's converter and Ollama keep projectors."""
    return "f32" if model_outtype.lower() == "f32" else "f16"


def default_projector_name(model_dir: Path, outtype: str) -> str:
    """``mmproj-<Name>-<TYPE>.gguf``: llama.cpp's naming for projectors, with
    the model's name as the converted model's file has it (model card or folder)."""
    try:
        md = gguf.Metadata.load(None, model_dir, None, 0)
    except Exception:  # noqa: BLE001 - a broken model card: the converter reports it for the model
        md = gguf.Metadata()
    name = md.name or model_dir.resolve().name
    stem = gguf.naming_convention(name, md.basename, md.finetune, md.version, None, outtype.upper())
    return f"mmproj-{stem}.gguf"


def convert_projector(
    model_dir: str | os.PathLike[str],
    outfile: str | os.PathLike[str] | None = None,
    *,
    outtype: str = "f16",
    dry_run: bool = False,
    progress: ProgressCallback | None = None,
) -> Path:
    """Write the vision projector of ``model_dir`` and return its path.

    ``outfile`` is a file, a folder (the default name inside it) or None (the
    default name beside ``model_dir``, where ``convert_model`` puts the model).
    ``outtype`` is f16 (the default) or f32.
    """
    model_dir = Path(model_dir)
    ot = outtype.lower()
    if ot not in OUTTYPES:
        raise ConversionError(f"projector outtype {outtype!r} is not supported; use f16 or f32")
    proj = make_projector(model_dir)
    if proj is None:
        raise ConversionError(f"{model_dir}: no vision tower Ember can convert; vision models: {', '.join(vision_architectures())}")
    if outfile is None:
        dest = model_dir.parent / default_projector_name(model_dir, ot)
    else:
        dest = Path(outfile)
        if dest.is_dir():
            dest = dest / default_projector_name(model_dir, ot)
    return write_projector(proj, dest, ot, dry_run=dry_run, progress=progress)


__all__ = ["convert_projector", "make_projector", "default_projector_name", "projector_outtype", "vision_architectures"]
