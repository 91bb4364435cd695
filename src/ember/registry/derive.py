"""Model files the registry makes itself: a converted Hugging Face checkpoint,
a quantization, a converted PEFT adapter. They are written into a work folder
inside the registry (same file system, so the results are renamed into
``blobs/``, not copied); the folder is removed when the block ends, or by the
next prune if the process was killed.

Vision checkpoints: the converter writes the language model to the
``model.gguf`` it is given and may write more GGUF files beside it; each one
whose ``general.type`` (or architecture) says it is a projector becomes the
model's projector layer (``application/vnd.ollama.image.projector``).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ember.convert import convert_model
from ember.convert.lora import convert_lora
from ember.progress import ProgressCallback
from ember.registry import ggufmeta, store

# The package, not the API function ember.quantize(); its parts that load
# llama.cpp are imported on first use (the server process never loads it).
_quantize = importlib.import_module("ember.quantize")


@contextlib.contextmanager
def work_dir() -> Iterator[Path]:
    """A fresh folder under ``$EMBER_MODELS/tmp`` owned by this process."""
    base = store.root() / "tmp"
    base.mkdir(parents=True, exist_ok=True)
    d = Path(tempfile.mkdtemp(prefix=store.temp_prefix(), dir=base))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def is_checkpoint(folder: Path) -> bool:
    """A Hugging Face checkpoint: safetensors, pytorch_model*.bin or consolidated*.pth weights."""
    patterns = ("*.safetensors", "pytorch_model*.bin", "consolidated*.pth")
    return any(next(folder.glob(g), None) is not None for g in patterns)


def convert_checkpoint(src: Path, work: Path, outtype: str,
                       progress: ProgressCallback | None) -> tuple[list[Path], list[Path]]:
    """Convert a checkpoint folder; return (model shards in order, projector files)."""
    out = work / "converted"
    out.mkdir()
    first = convert_model(src, out / "model.gguf", outtype=outtype, progress=progress)
    shards = ggufmeta.find_shards(Path(first))
    projectors = []
    for f in sorted(out.glob("*.gguf")):
        if f not in shards and ggufmeta.read_info(f).is_projector:
            projectors.append(f)
    return shards, projectors


def named(files: list[Path], work: Path) -> Path:
    """Blobs have no .gguf or shard names, which llama.cpp and the converters go
    by: link them under such names in the work folder; return the first."""
    if len(files) == 1 and files[0].name.endswith(".gguf"):
        return files[0]
    links = Path(tempfile.mkdtemp(prefix="in-", dir=work))
    names = ["model.gguf"] if len(files) == 1 else [f"model-{i + 1:05d}-of-{len(files):05d}.gguf" for i in range(len(files))]
    for f, n in zip(files, names, strict=True):
        os.symlink(f, links / n)
    return links / names[0]


def quantize_files(files: list[Path], work: Path, qtype: str, progress: ProgressCallback | None) -> list[Path]:
    """Quantize a model (all its shards) to ``qtype``; return the output shards."""
    out = _quantize.quantize_model(named(files, work), work / "quantized.gguf", qtype, progress=progress)
    return [Path(p) for p in out]


def convert_adapter(adapter_dir: Path, base: Path, work: Path, index: int, progress: ProgressCallback | None) -> Path:
    """Convert a PEFT adapter folder against its base (a checkpoint folder or a GGUF)."""
    return Path(convert_lora(adapter_dir, base, work / f"adapter{index}.gguf", progress=progress))
