"""What every vision projector converter shares. A projector is a companion
output of a vision-language checkpoint (:meth:`ember.convert.base.Model.companions`
of its language model): llama.cpp's ``clip`` GGUF (``general.type`` mmproj)
that libmtmd loads beside the language model, written by the same plan and
writer as the model, beside it (``mmproj-<name>.gguf``).

Architecture modules subclass :class:`Projector` with their tensor names and
image preprocessing keys. The finished header is checked as libmtmd will read
it (:func:`ember.gguf.clip.check_clip`) while planning, so a checkpoint whose
vision weights do not fit their config fails before anything is written.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import gguf
import numpy as np

from ember.convert.base import Model, Planned
from ember.convert.source import Checkpoint, TensorRef, read_json_object, to_float32
from ember.errors import ConversionError, InvalidFileError
from ember.gguf.clip import check_clip

Q = gguf.GGMLQuantizationType
V = gguf.MODEL_TENSOR

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def tensor_name(kind: gguf.MODEL_TENSOR, suffix: str = "weight", bid: int | None = None) -> str:
    """The GGUF name gguf-py defines for a clip tensor, e.g. ``v.blk.3.attn_q.bias``."""
    base = gguf.TENSOR_NAMES[kind]
    base = base.format(bid=bid) if bid is not None else base
    return f"{base}.{suffix}" if suffix else base


class Projector(Model):
    """The vision half of a multimodal checkpoint -> a clip GGUF.

    ``hparams`` is the whole config.json, ``vision`` its vision tower's config;
    ``preprocessor`` merges preprocessor_config.json and processor_config.json
    (the image processor's mean, std, sizes and tiling limits).
    """

    gguf_arch = gguf.MODEL_ARCH.MMPROJ
    gguf_type = gguf.GGUFType.MMPROJ
    projector_type: ClassVar[str]
    #: (prefix in the checkpoint, prefix of the local name); the first match wins
    prefixes: ClassVar[tuple[tuple[str, str], ...]] = ()

    def __init__(self, model_dir: Path, hparams: dict[str, Any], config_file: Path) -> None:
        # Model.__init__ reads a language model's layer count and name map; a
        # tower has its own (vision_config), and names are mapped here.
        self.model_dir = model_dir
        self.hparams = hparams
        self.config_file = config_file
        vision = hparams.get("vision_config")
        if not isinstance(vision, dict):
            raise ConversionError(f"{config_file}: no 'vision_config' object; this checkpoint has no vision tower to convert (use --text-only)")
        self.vision = vision
        self.preprocessor = _preprocessor_config(model_dir)
        self.block_count = int(self.vp("num_hidden_layers", "depth"))

    def output_type(self, outtype: str) -> str:
        """f32 stays f32 (for exact comparisons); everything else, quantized
        types included, gives f16, as llama.cpp's converter and Ollama keep
        projectors (clip's convolutions need float weights)."""
        return "f32" if outtype == "f32" else "f16"

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
        text = self.hparams.get("text_config") or self.hparams.get("llm_config") or self.hparams
        n = text.get("hidden_size") or self.hparams.get("hidden_size")
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

    def skip(self, name: str) -> bool:
        return self.local_name(name) is None

    def rename(self, name: str) -> str:
        return self.local_name(name) or name

    def modify(self, name: str, ref: TensorRef) -> Iterable[Planned]:
        """Output tensors for one vision tensor (``name`` is the local name)."""
        raise NotImplementedError

    def required(self) -> list[str]:
        """Names clip cannot load without: checked before anything is written."""
        return []

    def plan_tensors(self, checkpoint: Checkpoint) -> list[Planned]:
        if not any(self.local_name(ref.name) is not None for ref in checkpoint):
            raise ConversionError(f"{self.model_dir}: the config has a vision tower but the checkpoint has no vision weights; convert with --text-only for the language model alone")
        return super().plan_tensors(checkpoint)

    def validate(self, plan: list[Planned]) -> None:
        names = {p.name for p in plan}
        missing = [n for n in self.required() if n not in names]
        if missing:
            raise ConversionError(f"{self.model_dir}: the vision tower has no {missing[0]!r} ({len(missing)} tensors missing); the checkpoint is incomplete or its vision_config does not match")

    def unknown(self, name: str) -> ConversionError:
        bid = block_id(name)
        if bid is not None and bid >= self.block_count:
            return ConversionError(f"{self.config_file}: vision_config has {self.block_count} layers but the checkpoint has vision layer {bid}; the config does not match the weights")
        return ConversionError(f"{self.model_dir}: vision tensor {name!r} is not known for {type(self).__name__}; the checkpoint has weights this converter does not support")

    def block_tensors(self, bid: int) -> list[str]:
        """The per-layer tensors every encoder block has (for :meth:`required`)."""
        return [tensor_name(k, "weight", bid) for k in (V.V_ENC_ATTN_Q, V.V_ENC_ATTN_K, V.V_ENC_ATTN_V, V.V_ENC_ATTN_O, V.V_ENC_INPUT_NORM, V.V_ENC_POST_ATTN_NORM, V.V_ENC_FFN_UP, V.V_ENC_FFN_DOWN)]

    def tensor_type(self, p: Planned, outtype: str) -> Q:
        """Matrices in ``outtype`` (f16 or f32); vectors, and the tensors a
        subclass marks (embeddings), f32."""
        if p.qtype is not None:
            return p.qtype
        return Q.F32 if len(p.shape) <= 1 or outtype == "f32" else Q.F16

    # -- metadata -------------------------------------------------------
    def set_parameters(self, w: gguf.GGUFWriter) -> None:
        """Keys every vision tower has (subclasses add theirs first, then call
        this), then the whole output checked as libmtmd will read it."""
        w.add_clip_has_vision_encoder(True)
        w.add_clip_projector_type(self.projector_type)
        w.add_vision_projection_dim(self.text_hidden_size())
        w.add_vision_embedding_length(int(self.vp("hidden_size", "embed_dim")))
        w.add_vision_feed_forward_length(int(self.vp("intermediate_size")))
        w.add_vision_block_count(self.block_count)
        w.add_vision_head_count(int(self.vp("num_attention_heads", "num_heads")))
        w.add_vision_patch_size(square_size(self.vp("patch_size")))
        self.set_vision_parameters(w)
        meta = {k: v.value for k, v in w.kv_data[0].items() if not isinstance(v.value, list)}
        tensors = {n: (tuple(reversed(ti.shape)), ti.dtype.name) for shard in w.tensors for n, ti in shard.items()}
        try:
            check_clip(meta, tensors)
        except InvalidFileError as e:
            raise ConversionError(f"{self.model_dir}: the vision weights do not fit their config: {e}") from None

    def set_vision_parameters(self, w: gguf.GGUFWriter) -> None:
        """The architecture's own keys (image size, normalization, projector)."""

    def set_vocab(self, w: gguf.GGUFWriter) -> None:
        pass  # a projector has no tokenizer


def block_id(name: str) -> int | None:
    m = re.search(r"\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def square_size(v: Any) -> int:
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
        if path.is_file():
            data = read_json_object(path, "; download it again")
            if inner and isinstance(data.get(inner), dict):
                data = {**data, **data[inner]}
            out.update(data)
    return out


# ---------------------------------------------------------------------------
# tensor helpers


def same(name: str, ref: TensorRef, keep_f32: bool = False) -> Planned:
    """The source tensor unchanged (``keep_f32``: norms, embeddings, where
    precision matters and size does not)."""
    return Planned(name, ref.shape, ref.dtype, ref.load, qtype=Q.F32 if keep_f32 else None, source=ref)


def transformed(name: str, ref: TensorRef, fn: Callable[[np.ndarray[Any, Any]], np.ndarray[Any, Any]], shape: tuple[int, ...], keep_f32: bool = False) -> Planned:
    return Planned(name, shape, ref.dtype, lambda: fn(to_float32(ref.load())), qtype=Q.F32 if keep_f32 else None)


def split_rows(names: list[str], ref: TensorRef) -> Iterator[Planned]:
    """A fused tensor (qkv) split into equal parts along its first axis."""
    n = len(names)
    if ref.shape[0] % n:
        raise ConversionError(f"{ref.file}: tensor {ref.name!r} has {ref.shape[0]} rows, not divisible into {n} parts")
    rows = ref.shape[0] // n

    def part(i: int) -> Callable[[np.ndarray[Any, Any]], np.ndarray[Any, Any]]:
        return lambda a: a[i * rows : (i + 1) * rows]

    for i, name in enumerate(names):
        yield transformed(name, ref, part(i), (rows, *ref.shape[1:]))
