"""What every vision projector converter shares: a plan of output tensors made
from checkpoint headers, the clip keys common to all towers, and a streaming
write through gguf-py's ``GGUFWriter`` (tensor infos first, then one tensor's
data at a time), so peak memory is one tensor, not one tower.

The output is llama.cpp's ``clip`` GGUF (``general.type = mmproj``) that
libmtmd loads beside the language model. Architecture modules subclass
:class:`Projector` with their tensor names and image preprocessing keys.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import gguf
import numpy as np

from ember.convert.source import Checkpoint, TensorRef, to_float32
from ember.errors import ConversionError, InvalidFileError
from ember.fsutil import atomic_path
from ember.gguf.clip import check_projector
from ember.progress import ProgressCallback

Q = gguf.GGMLQuantizationType
V = gguf.MODEL_TENSOR

logging.getLogger("gguf").addHandler(logging.NullHandler())

#: projector output types: the tower is small next to the language model and
#: clip's convolutions need float weights, so no quantized types here.
OUTTYPES = {"f32": (Q.F32, gguf.LlamaFileType.ALL_F32), "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16)}

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def tensor_name(kind: gguf.MODEL_TENSOR, suffix: str = "weight", bid: int | None = None) -> str:
    """The GGUF name gguf-py defines for a clip tensor, e.g. ``v.blk.3.attn_q.bias``."""
    base = gguf.TENSOR_NAMES[kind]
    base = base.format(bid=bid) if bid is not None else base
    return f"{base}.{suffix}" if suffix else base


@dataclass
class ProjTensor:
    """One output tensor: its GGUF name, logical shape and how to read it."""

    name: str
    shape: tuple[int, ...]
    load: Callable[[], np.ndarray[Any, Any]]
    keep_f32: bool = False  # norms, biases, embeddings: precision matters, size does not


class Projector:
    """The vision half of a multimodal checkpoint -> a clip GGUF.

    ``vision`` is the vision tower's config, ``config`` the whole config.json;
    ``preprocessor`` merges preprocessor_config.json and processor_config.json
    (the image processor's mean, std, sizes and tiling limits).
    """

    projector_type: ClassVar[str]
    #: (prefix in the checkpoint, prefix of the module table below); the first match wins
    prefixes: ClassVar[tuple[tuple[str, str], ...]] = ()

    def __init__(self, model_dir: Path, config: dict[str, Any], config_file: Path) -> None:
        self.model_dir = model_dir
        self.config = config
        self.config_file = config_file
        vision = config.get("vision_config")
        if not isinstance(vision, dict):
            raise ConversionError(f"{config_file}: no 'vision_config' object; this checkpoint has no vision tower to convert (use --text-only)")
        self.vision = vision
        self.preprocessor = _preprocessor_config(model_dir)
        self.block_count = int(self.vp("num_hidden_layers", "depth"))

    # -- config helpers -------------------------------------------------
    def vp(self, *keys: str, default: Any = ...) -> Any:
        """A vision_config value (first of ``keys`` present)."""
        for k in keys:
            if self.vision.get(k) is not None:
                return self.vision[k]
        if default is ...:
            raise ConversionError(f"{self.config_file}: vision_config has no {' or '.join(repr(k) for k in keys)}; the config is incomplete")
        return default

    def text_hidden_size(self) -> int:
        text = self.config.get("text_config") or self.config.get("llm_config") or self.config
        n = text.get("hidden_size") or self.config.get("hidden_size")
        if not n:
            raise ConversionError(f"{self.config_file}: no hidden_size for the language model; the config is incomplete")
        return int(n)

    def mean_std(self, default_mean: list[float], default_std: list[float]) -> tuple[list[float], list[float]]:
        mean = self.preprocessor.get("image_mean", default_mean)
        std = self.preprocessor.get("image_std", default_std)
        for what, v in (("image_mean", mean), ("image_std", std)):
            if not (isinstance(v, list) and len(v) == 3 and all(isinstance(x, (int, float)) for x in v)):
                raise InvalidFileError(f"{self.model_dir / 'preprocessor_config.json'}: {what} must be a list of 3 numbers, got {v!r}")
        if any(x == 0 for x in std):
            raise InvalidFileError(f"{self.model_dir / 'preprocessor_config.json'}: image_std has a zero")
        return [float(x) for x in mean], [float(x) for x in std]

    # -- tensors --------------------------------------------------------
    def local_name(self, name: str) -> str | None:
        """The checkpoint name without its tower prefix (``vision_model.``,
        ``model.visual.``, ...), or None for a tensor of the language model."""
        for prefix, local in self.prefixes:
            if name.startswith(prefix):
                return local + name[len(prefix) :]
        return None

    def map_tensor(self, name: str, ref: TensorRef) -> Iterable[ProjTensor]:
        """Output tensors for one vision tensor (``name`` has its prefix replaced)."""
        raise NotImplementedError

    def required(self) -> list[str]:
        """Names clip cannot load without: checked before anything is written."""
        return []

    def plan(self, checkpoint: Checkpoint) -> list[ProjTensor]:
        out: list[ProjTensor] = []
        for ref in checkpoint:
            local = self.local_name(ref.name)
            if local is not None:
                out.extend(self.map_tensor(local, ref))
        names = [t.name for t in out]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ConversionError(f"{self.model_dir}: two source tensors map to {sorted(dup)[0]!r}; the checkpoint has duplicate weights")
        missing = [n for n in self.required() if n not in set(names)]
        if missing:
            raise ConversionError(f"{self.model_dir}: the vision tower has no {missing[0]!r} ({len(missing)} tensors missing); the checkpoint is incomplete or its vision_config does not match")
        return out

    def unknown(self, name: str) -> ConversionError:
        bid = block_id(name)
        if bid is not None and bid >= self.block_count:
            return ConversionError(f"{self.config_file}: vision_config has {self.block_count} layers but the checkpoint has vision layer {bid}; the config does not match the weights")
        return ConversionError(f"{self.model_dir}: vision tensor {name!r} is not known for {type(self).__name__}; the checkpoint has weights this converter does not support")

    def block_tensors(self, bid: int) -> list[str]:
        """The per-layer tensors every encoder block has (for :meth:`required`)."""
        return [tensor_name(k, "weight", bid) for k in (V.V_ENC_ATTN_Q, V.V_ENC_ATTN_K, V.V_ENC_ATTN_V, V.V_ENC_ATTN_O, V.V_ENC_INPUT_NORM, V.V_ENC_POST_ATTN_NORM, V.V_ENC_FFN_UP, V.V_ENC_FFN_DOWN)]

    # -- metadata -------------------------------------------------------
    def set_parameters(self, w: gguf.GGUFWriter) -> None:
        """Keys every vision tower has; subclasses add theirs."""
        w.add_clip_has_vision_encoder(True)
        w.add_clip_projector_type(self.projector_type)
        w.add_vision_projection_dim(self.text_hidden_size())
        w.add_vision_embedding_length(int(self.vp("hidden_size", "embed_dim")))
        w.add_vision_feed_forward_length(int(self.vp("intermediate_size")))
        w.add_vision_block_count(self.block_count)
        w.add_vision_head_count(int(self.vp("num_attention_heads", "num_heads")))
        w.add_vision_patch_size(_first(self.vp("patch_size")))


def block_id(name: str) -> int | None:
    m = re.search(r"\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def _first(v: Any) -> int:
    """``image_size``/``patch_size`` may be an int or a [height, width] pair."""
    if isinstance(v, list):
        if len(set(v)) != 1:
            raise ConversionError(f"non-square size {v} is not supported by llama.cpp's vision encoder")
        v = v[0]
    return int(v)


def _preprocessor_config(model_dir: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, inner in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
        path = model_dir / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InvalidFileError(f"{path}: not valid JSON ({e}); download it again") from None
        if not isinstance(data, dict):
            raise InvalidFileError(f"{path}: not a JSON object; download it again")
        if inner and isinstance(data.get(inner), dict):
            data = {**data, **data[inner]}
        out.update(data)
    return out


# ---------------------------------------------------------------------------
# tensor helpers


def same(name: str, ref: TensorRef, keep_f32: bool = False) -> ProjTensor:
    return ProjTensor(name, ref.shape, ref.load, keep_f32 or len(ref.shape) <= 1)


def transformed(name: str, ref: TensorRef, fn: Callable[[np.ndarray[Any, Any]], np.ndarray[Any, Any]], shape: tuple[int, ...], keep_f32: bool = False) -> ProjTensor:
    return ProjTensor(name, shape, lambda: fn(to_float32(ref.load())), keep_f32 or len(shape) <= 1)


def split_rows(names: list[str], ref: TensorRef) -> Iterator[ProjTensor]:
    """A fused tensor (qkv) split into equal parts along its first axis."""
    n = len(names)
    if ref.shape[0] % n:
        raise ConversionError(f"{ref.file}: tensor {ref.name!r} has {ref.shape[0]} rows, not divisible into {n} parts")
    rows = ref.shape[0] // n
    def part(i: int) -> Callable[[np.ndarray[Any, Any]], np.ndarray[Any, Any]]:
        return lambda a: a[i * rows : (i + 1) * rows]

    for i, name in enumerate(names):
        yield transformed(name, ref, part(i), (rows, *ref.shape[1:]))


# ---------------------------------------------------------------------------
# writing


def write_projector(proj: Projector, dest: Path, outtype: str = "f16", *, dry_run: bool = False, progress: ProgressCallback | None = None) -> Path:
    """Plan (which validates the checkpoint), then stream every tensor into ``dest``."""
    if outtype not in OUTTYPES:
        raise ConversionError(f"projector outtype {outtype!r} is not supported; use f16 or f32")
    qtype, ftype = OUTTYPES[outtype]
    plan = proj.plan(Checkpoint(proj.model_dir))
    if dry_run:
        return dest
    w = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.MMPROJ])
    w.add_type(gguf.GGUFType.MMPROJ)
    w.add_name(proj.model_dir.resolve().name)
    w.add_file_type(ftype)
    proj.set_parameters(w)
    types = [Q.F32 if t.keep_f32 else qtype for t in plan]
    for t, q in zip(plan, types):
        nbytes = int(np.prod(t.shape, dtype=np.int64)) * (4 if q == Q.F32 else 2)
        w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), nbytes, raw_dtype=q)
    total = sum(int(np.prod(t.shape, dtype=np.int64)) for t in plan)
    done = 0
    desc = f"Writing {dest.name}"
    with atomic_path(dest) as tmp:
        w.open_output_file(tmp)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        if progress:
            progress(desc, 0, total)
        for t, q in zip(plan, types):
            a = to_float32(t.load())
            if a.shape != t.shape:
                raise ConversionError(f"{proj.model_dir}: tensor {t.name} has shape {list(a.shape)}, expected {list(t.shape)}; the checkpoint is inconsistent")
            w.write_tensor_data(np.ascontiguousarray(a, dtype=np.float32 if q == Q.F32 else np.float16))
            done += a.size
            if progress:
                progress(desc, done, total)
        w.close()
        try:  # the checks libmtmd's users get, before the file takes its name
            check_projector(tmp)
        except InvalidFileError as e:
            raise ConversionError(f"{proj.model_dir}: the vision weights do not fit their config: {str(e).partition(': ')[2]}") from None
    return dest
