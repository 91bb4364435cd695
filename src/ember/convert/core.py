"""The converter core: plan every output tensor from checkpoint headers, write
GGUF metadata, then stream tensor data one tensor at a time through
``gguf.GGUFWriter`` (``add_tensor_info`` while planning, ``write_tensor_data``
while streaming), so peak memory is about one tensor, not one model.

Architecture modules subclass :class:`Model` and override only what is special
about them; they register themselves with :func:`register`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import struct
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import gguf
import numpy as np

from ember.convert.source import BF16, Checkpoint, TensorRef, is_bf16, to_float32
from ember.errors import ConversionError, InvalidFileError
from ember.fsutil import atomic_path
from ember.progress import ProgressCallback

Q = gguf.GGMLQuantizationType

# gguf-py logs through the root logger's last-resort handler when the
# application configured none: keep its chatter off the user's terminal.
logging.getLogger("gguf").addHandler(logging.NullHandler())

#: --outtype values written directly; anything else is a llama.cpp quant type
#: produced through ember.quantize from a temporary f16 file.
DIRECT_OUTTYPES = ("f32", "f16", "bf16", "q8_0", "auto")

_FTYPE = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "bf16": gguf.LlamaFileType.MOSTLY_BF16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
}
_QTYPE = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}

_CHUNK = 1 << 16  # elements per conversion chunk: temporaries stay in the CPU cache (5x faster than whole tensors)


@dataclass
class Planned:
    """One output tensor: its GGUF name, logical shape and how to produce it."""

    name: str
    shape: tuple[int, ...]
    src_dtype: np.dtype[Any]
    load: Callable[[], np.ndarray[Any, Any]]
    qtype: Q | None = None  # forced type (None: by the usual rules)
    source: TensorRef | None = None  # set when the data is the source tensor unchanged
    out_qtype: Q = field(default=Q.F32, init=False)


class Writer(gguf.GGUFWriter):
    """gguf-py's writer, packing long metadata arrays (a 150k-token vocabulary's
    tokens, scores and types) in one go instead of one struct.pack per item.
    The bytes are the same; only the speed differs."""

    _NP = {
        gguf.GGUFValueType.INT32: "<i4",
        gguf.GGUFValueType.UINT32: "<u4",
        gguf.GGUFValueType.FLOAT32: "<f4",
        gguf.GGUFValueType.INT64: "<i8",
        gguf.GGUFValueType.FLOAT64: "<f8",
        gguf.GGUFValueType.UINT8: "u1",
    }

    def _pack_val(self, val: Any, vtype: gguf.GGUFValueType, add_vtype: bool, sub_type: gguf.GGUFValueType | None = None) -> bytes:
        if vtype != gguf.GGUFValueType.ARRAY or len(val) < 64 or self.endianess != gguf.GGUFEndian.LITTLE or isinstance(val, (bytes, bytearray)):
            return super()._pack_val(val, vtype, add_vtype, sub_type)
        first = val[0]
        head = struct.pack("<I", vtype) if add_vtype else b""
        if isinstance(first, (str, bytes, bytearray)) and all(isinstance(x, (str, bytes, bytearray)) for x in val):
            parts = [x.encode("utf-8") if isinstance(x, str) else bytes(x) for x in val]
            body = b"".join(struct.pack("<Q", len(x)) + x for x in parts)
            return head + struct.pack("<IQ", gguf.GGUFValueType.STRING, len(parts)) + body
        ltype = sub_type or gguf.GGUFValueType.get_type(first)
        fmt = self._NP.get(ltype)
        if fmt is None or isinstance(first, bool) or not all(type(x) is type(first) for x in val):
            return super()._pack_val(val, vtype, add_vtype, sub_type)
        arr = np.asarray(val, dtype=fmt)
        return head + struct.pack("<IQ", ltype, len(arr)) + arr.tobytes()

    def begin_tensor(self, nbytes: int) -> tuple[Any, int]:
        """Start the next tensor's data (the bookkeeping of ``write_tensor_data``):
        returns its file and the aligned offset where its bytes go. The caller
        fills them (os.pwrite, copy_file_range), then calls :meth:`end_tensor`."""
        assert self.fout is not None
        file_id = next(i for i, t in enumerate(self.tensors) if t)
        fout = self.fout[file_id]
        ti = self.tensors[file_id].pop(next(iter(self.tensors[file_id])))
        if ti.nbytes != nbytes:
            raise ConversionError(f"internal error: tensor data of {nbytes} bytes for a {ti.nbytes}-byte slot")
        self.write_padding(fout, fout.tell())
        fout.flush()
        return fout, fout.tell()

    def end_tensor(self, fout: Any, start: int, nbytes: int) -> None:
        fout.seek(start + nbytes)
        self.write_padding(fout, nbytes)
        self.state = gguf.gguf_writer.WriterState.WEIGHTS

    def write_tensor_span(self, src: Path, offset: int, nbytes: int) -> None:
        """Like ``write_tensor_data`` for a tensor whose bytes already sit in a
        file: the kernel copies them (copy_file_range), nothing passes through
        Python memory."""
        assert self.fout is not None
        file_id = next(i for i, t in enumerate(self.tensors) if t)
        fout = self.fout[file_id]
        ti = self.tensors[file_id].pop(next(iter(self.tensors[file_id])))
        assert ti.nbytes == nbytes
        self.write_padding(fout, fout.tell())
        fout.flush()
        _copy_span(src, offset, nbytes, fout.fileno())
        self.write_padding(fout, nbytes)
        self.state = gguf.gguf_writer.WriterState.WEIGHTS


def _copy_span(src: Path, offset: int, nbytes: int, out_fd: int, dst_offset: int | None = None) -> None:
    with open(src, "rb", buffering=0) as f:
        done = 0
        try:
            while done < nbytes:
                k = os.copy_file_range(f.fileno(), out_fd, nbytes - done, offset + done, None if dst_offset is None else dst_offset + done)
                if k <= 0:
                    raise InvalidFileError(f"{src}: truncated while reading tensor data; download it again")
                done += k
            return
        except OSError:
            if done:
                raise
        f.seek(offset)
        while done < nbytes:
            chunk = f.read(min(1 << 24, nbytes - done))
            if not chunk:
                raise InvalidFileError(f"{src}: truncated while reading tensor data; download it again")
            if dst_offset is None:
                os.write(out_fd, chunk)
            else:
                _pwrite_all(out_fd, memoryview(chunk), dst_offset + done)
            done += len(chunk)


def _pwrite_all(fd: int, buf: Any, pos: int) -> None:
    mv = memoryview(buf).cast("B")
    while len(mv):
        k = os.pwrite(fd, mv, pos)
        mv = mv[k:]
        pos += k


_REGISTRY: dict[str, Any] = {}  # HF architecture -> Model subclass (or a class with from_config)


def register(*hf_archs: str) -> Callable[[Any], Any]:
    def deco(cls: Any) -> Any:
        for a in hf_archs:
            _REGISTRY[a] = cls
        return cls

    return deco


def supported_architectures() -> list[str]:
    _load_arch_modules()
    return sorted(_REGISTRY)


def _load_arch_modules() -> None:
    # Importing each module registers its classes.
    from ember.convert import baichuan, gemma3, internlm2, internvl, llama, mistral, qwen, qwen2vl  # noqa: F401


class Model:
    """Default behaviour: map names with gguf-py's TensorNameMap, copy data."""

    gguf_arch: ClassVar[gguf.MODEL_ARCH]

    def __init__(self, model_dir: Path, hparams: dict[str, Any], config_file: Path) -> None:
        self.model_dir = model_dir
        self.hparams = hparams
        self.config_file = config_file
        self.block_count = int(self.hp("num_hidden_layers", "n_layer", "num_layers"))
        self.tensor_map = gguf.get_tensor_name_map(self.gguf_arch, self.block_count)

    # -- config helpers -------------------------------------------------
    def hp(self, *keys: str, default: Any = ...) -> Any:
        for k in keys:
            if k in self.hparams and self.hparams[k] is not None:
                return self.hparams[k]
        if default is ...:
            raise ConversionError(f"{self.config_file}: missing {' or '.join(repr(k) for k in keys)}; the config does not match its architecture {self.hf_arch!r}")
        return default

    @property
    def hf_arch(self) -> str:
        archs = self.hparams.get("architectures") or ["?"]
        return str(archs[0])

    @property
    def n_head(self) -> int:
        return int(self.hp("num_attention_heads", "n_heads"))

    @property
    def n_head_kv(self) -> int:
        return int(self.hp("num_key_value_heads", "n_kv_heads", default=self.n_head))

    @property
    def head_dim(self) -> int:
        hd = self.hparams.get("head_dim")
        return int(hd) if hd else int(self.hp("hidden_size")) // self.n_head

    def rope_params(self) -> dict[str, Any]:
        """rope settings from transformers 5 ``rope_parameters`` or older ``rope_scaling``/``rope_theta``."""
        rp = dict(self.hparams.get("rope_parameters") or self.hparams.get("rope_scaling") or {})
        if "full_attention" in rp and isinstance(rp["full_attention"], dict):
            rp = dict(rp["full_attention"])
        if "rope_type" not in rp and "type" in rp:
            rp["rope_type"] = rp["type"]
        if "rope_theta" not in rp and self.hparams.get("rope_theta") is not None:
            rp["rope_theta"] = self.hparams["rope_theta"]
        return rp

    # -- tensors --------------------------------------------------------
    def skip(self, name: str) -> bool:
        return name.endswith((".rotary_emb.inv_freq", ".attention.masked_bias", ".attention.bias"))

    def rename(self, name: str) -> str:
        return name

    def map_name(self, name: str) -> str:
        new = self.tensor_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            bid = next((int(x) for x in name.split(".") if x.isdecimal()), None)
            if bid is not None and bid >= self.block_count:
                raise ConversionError(f"{self.config_file}: num_hidden_layers is {self.block_count} but the checkpoint has layer {bid}; the config does not match the weights")
            raise ConversionError(f"{self.model_dir}: tensor {name!r} is not known for architecture {self.hf_arch}; the checkpoint has extra weights this converter does not support")
        return new

    def modify(self, name: str, ref: TensorRef) -> Iterable[Planned]:
        """Output tensors for one source tensor; architectures override this."""
        yield Planned(self.map_name(name), ref.shape, ref.dtype, ref.load, source=ref)

    def extra_tensors(self) -> Iterable[Planned]:
        return ()

    def plan(self, checkpoint: Checkpoint) -> list[Planned]:
        out: list[Planned] = list(self.extra_tensors())
        for ref in checkpoint:
            if self.skip(ref.name):
                continue
            name = self.rename(ref.name)
            if name is None:
                continue
            out.extend(self.modify(name, ref))
        seen: set[str] = set()
        for p in out:
            if p.name in seen:
                raise ConversionError(f"{self.model_dir}: two source tensors map to {p.name!r}; the checkpoint has duplicate weights")
            seen.add(p.name)
        self.validate(out)
        return out

    def validate(self, plan: list[Planned]) -> None:
        """Catch a config that does not match the weights before writing anything."""
        by_name = {p.name: p for p in plan}
        hidden = self.hp("hidden_size", "n_embd", "dim", default=None)
        vocab = self.hparams.get("vocab_size")
        emb = by_name.get("token_embd.weight")
        if emb is None:
            raise ConversionError(f"{self.model_dir}: no token embedding tensor in the checkpoint; the weights are incomplete")
        if hidden is not None and emb.shape[-1] != int(hidden):
            raise ConversionError(f"{self.config_file}: hidden_size is {hidden} but the token embedding has width {emb.shape[-1]}; the config does not match the weights")
        if vocab is not None and emb.shape[0] != int(vocab):
            raise ConversionError(f"{self.config_file}: vocab_size is {vocab} but the token embedding has {emb.shape[0]} rows; the config does not match the weights")
        for p in plan:
            parts = p.name.split(".")
            if parts[0] == "blk" and int(parts[1]) >= self.block_count:
                raise ConversionError(f"{self.config_file}: num_hidden_layers is {self.block_count} but the checkpoint has layer {parts[1]}; the config does not match the weights")
        if hidden is not None and f"blk.{self.block_count - 1}.attn_norm.weight" not in by_name and "blk.0.attn_norm.weight" in by_name:
            raise ConversionError(f"{self.config_file}: num_hidden_layers is {self.block_count} but the checkpoint has fewer layers; the config does not match the weights")
        q = by_name.get("blk.0.attn_q.weight")
        if q is not None and q.shape[0] != self.n_head * self.head_dim:
            raise ConversionError(f"{self.config_file}: {self.n_head} heads of {self.head_dim} need {self.n_head * self.head_dim} query rows, the weights have {q.shape[0]}; the config does not match the weights")

    # -- metadata -------------------------------------------------------
    def set_parameters(self, w: gguf.GGUFWriter) -> None:
        w.add_block_count(self.block_count)
        if (n_ctx := self.hp("max_position_embeddings", "n_positions", "max_sequence_length", default=None)) is not None:
            w.add_context_length(int(n_ctx))
        w.add_embedding_length(int(self.hp("hidden_size", "n_embd", "dim")))
        if (n_ff := self.hp("intermediate_size", "n_inner", default=None)) is not None:
            w.add_feed_forward_length(int(n_ff))
        w.add_head_count(self.n_head)
        w.add_head_count_kv(self.n_head_kv)
        rp = self.rope_params()
        if (theta := rp.get("rope_theta")) is not None:
            w.add_rope_freq_base(float(theta))
        rtype = str(rp.get("rope_type") or "default").lower()
        factor = rp.get("factor")
        if rtype == "linear" and factor is not None:
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(factor))
        elif rtype == "yarn" and factor is not None:
            w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(float(factor))
            if (orig := rp.get("original_max_position_embeddings")) is not None:
                w.add_rope_scaling_orig_ctx_len(int(orig))
        elif rtype not in ("default", "llama3", "dynamic"):  # dynamic NTK: llama.cpp ignores it too
            raise ConversionError(f"{self.config_file}: rope type {rtype!r} is not supported; supported: default, linear, yarn, llama3")
        if (eps := self.hp("rms_norm_eps", "norm_eps", default=None)) is not None:
            w.add_layer_norm_rms_eps(float(eps))
        if self.hparams.get("head_dim"):
            w.add_key_length(int(self.hparams["head_dim"]))
            w.add_value_length(int(self.hparams["head_dim"]))

    def set_vocab(self, w: gguf.GGUFWriter) -> None:
        from ember.convert.tokenizer import write_vocab

        write_vocab(w, self.model_dir, self.hparams, **self.vocab_options())

    def vocab_options(self) -> dict[str, Any]:
        """Keyword overrides for :func:`ember.convert.tokenizer.write_vocab`."""
        return {}


# ---------------------------------------------------------------------------
# tensor helpers shared by architecture modules


def permute_qk(w: np.ndarray[Any, Any], n_head: int, n_head_kv: int | None = None) -> np.ndarray[Any, Any]:
    """HF rotary layout (halves) -> llama.cpp/GGML layout (interleaved pairs)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return np.ascontiguousarray(
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def lazy(fn: Callable[[np.ndarray[Any, Any]], np.ndarray[Any, Any]], ref: TensorRef) -> Callable[[], np.ndarray[Any, Any]]:
    return lambda: fn(ref.load())


# ---------------------------------------------------------------------------
# type selection and data conversion


def _choose_qtype(p: Planned, ftype: str) -> Q:
    if p.qtype is not None:
        return p.qtype
    if len(p.shape) <= 1 or p.name.endswith("_norm.weight") or not p.name.endswith(".weight"):
        return Q.F32
    if p.src_dtype.kind in "iub":
        return Q.F32
    q = _QTYPE[ftype]
    if q == Q.Q8_0 and p.shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0] != 0:
        return Q.F16  # llama.cpp's converter falls back the same way
    return q


def _nbytes(shape: tuple[int, ...], q: Q) -> int:
    block, size = gguf.GGML_QUANT_SIZES[q]
    n = int(np.prod(shape, dtype=np.int64))
    return n // block * size


def _bf16_to_f16_range(words: np.ndarray[Any, Any], out: np.ndarray[Any, Any], lo: int, hi: int) -> None:
    """bf16 -> f16 by integer arithmetic where the value is a normal f16 (the
    exponent is re-biased, the 7 mantissa bits fit in f16's 10); zeros,
    subnormals, overflow, inf and NaN go through a float32 cast. Bit-identical
    to casting through float32, about twice as fast."""
    o16 = out.view(np.uint16)
    buf = np.empty(_CHUNK, dtype=np.uint32)
    lo_e, hi_e = np.uint16(113 << 7), np.uint16(143 << 7)
    for i in range(lo, hi, _CHUNK):
        j = min(hi, i + _CHUNK)
        x = words[i:j]
        o = o16[i:j]
        ax = x & np.uint16(0x7FFF)
        np.subtract(ax, np.uint16(112 << 7), out=o)
        np.left_shift(o, np.uint16(3), out=o)
        np.bitwise_or(o, x & np.uint16(0x8000), out=o)
        bad = (ax < lo_e) | (ax >= hi_e)
        if bad.any():
            idx = np.flatnonzero(bad)
            b = buf[: idx.size]
            np.left_shift(x[idx], 16, out=b, dtype=np.uint32)
            o[idx] = b.view(np.float32).astype(np.float16).view(np.uint16)


def _cast_range(flat: np.ndarray[Any, Any], out: np.ndarray[Any, Any], lo: int, hi: int) -> None:
    with np.errstate(over="ignore"):  # f16 overflow becomes inf, as in llama.cpp's converter
        if is_bf16(flat) and out.dtype == np.float16:
            _bf16_to_f16_range(flat.view(np.uint16), out, lo, hi)
        elif is_bf16(flat):
            words = flat.view(np.uint16)
            buf = np.empty(_CHUNK, dtype=np.uint32)
            for i in range(lo, hi, _CHUNK):
                j = min(hi, i + _CHUNK)
                b = buf[: j - i]
                np.left_shift(words[i:j], 16, out=b, dtype=np.uint32)
                out[i:j] = b.view(np.float32)
        else:
            for i in range(lo, hi, _CHUNK):
                j = min(hi, i + _CHUNK)
                out[i:j] = flat[i:j]


def _cast_chunked(a: np.ndarray[Any, Any], dtype: Any) -> np.ndarray[Any, Any]:
    """Cast in cache-sized chunks; big tensors on two threads (numpy drops the GIL)."""
    flat = np.ascontiguousarray(a).reshape(-1)
    out = np.empty(flat.shape, dtype=dtype)
    n = flat.size
    if n >= 16 * _CHUNK and _POOL is not None:
        mid = (n // 2) // _CHUNK * _CHUNK
        fut = _POOL.submit(_cast_range, flat, out, mid, n)
        _cast_range(flat, out, 0, mid)
        fut.result()
    else:
        _cast_range(flat, out, 0, n)
    return out.reshape(a.shape)


_POOL: ThreadPoolExecutor | None = None
_BLOCK = 1 << 19  # elements converted into a staging buffer per pwrite
_OUT_DTYPE: dict[Q, np.dtype[Any]] = {Q.F32: np.dtype("<f4"), Q.F16: np.dtype("<f2"), Q.BF16: np.dtype("<u2")}


def _stream_range(flat: np.ndarray[Any, Any], q: Q, fd: int, start: int, lo: int, hi: int) -> None:
    """Convert ``flat[lo:hi]`` to ``q`` block by block and pwrite each block to its place."""
    od = _OUT_DTYPE[q]
    same = flat.dtype == od or (q == Q.BF16 and is_bf16(flat))
    staging = None if same else np.empty(_BLOCK, dtype=od)
    for i in range(lo, hi, _BLOCK):
        j = min(hi, i + _BLOCK)
        if staging is None:
            block = flat[i:j]
        else:
            block = staging[: j - i]
            if q == Q.BF16:
                block[...] = _to_bf16(flat[i:j])
            else:
                _cast_range(flat[i:j], block, 0, j - i)
        _pwrite_all(fd, block.view(np.uint8), start + i * od.itemsize)


def _stream_rows_quantized(a: np.ndarray[Any, Any], q: Q, fd: int, start: int) -> None:
    """Quantize (gguf-py's reference quantizer) a few rows at a time: blocks run
    along rows, so row groups are independent and no float32 copy of the
    whole tensor is made."""
    rows = a.reshape(-1, a.shape[-1])
    block, size = gguf.GGML_QUANT_SIZES[q]
    row_bytes = a.shape[-1] // block * size
    step = max(1, _BLOCK // a.shape[-1])
    for i in range(0, rows.shape[0], step):
        data = gguf.quants.quantize(to_float32(rows[i : i + step]), q)
        _pwrite_all(fd, np.ascontiguousarray(data).reshape(-1).view(np.uint8), start + i * row_bytes)


def _stream_tensor(a: np.ndarray[Any, Any], q: Q, fd: int, start: int) -> None:
    """Write tensor ``a`` as GGML type ``q`` (f32/f16/bf16) at ``start`` without
    materialising the converted tensor; big tensors on two threads."""
    flat = np.ascontiguousarray(a).reshape(-1)
    n = flat.size
    if n >= 4 * _BLOCK and _POOL is not None:
        mid = (n // 2) // _BLOCK * _BLOCK
        fut = _POOL.submit(_stream_range, flat, q, fd, start, mid, n)
        try:
            _stream_range(flat, q, fd, start, 0, mid)
        finally:
            fut.result()
    else:
        _stream_range(flat, q, fd, start, 0, n)
_PREFETCH_MAX = 256 * 1024 * 1024  # read the next tensor while writing this one, if it is at most this big


def _to_bf16(a: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    flat = a.reshape(-1)
    out = np.empty(flat.shape, dtype=np.uint16)
    for i in range(0, flat.size, _CHUNK):
        u = to_float32(flat[i : i + _CHUNK]).view(np.uint32)
        nan = (u & 0x7FFFFFFF) > 0x7F800000
        r = ((u.astype(np.uint64) + (0x7FFF + ((u >> 16) & 1))) >> 16).astype(np.uint16)
        r[nan] = ((u[nan] >> 16) | 64).astype(np.uint16)
        out[i : i + _CHUNK] = r
    return out


def convert_data(a: np.ndarray[Any, Any], q: Q) -> np.ndarray[Any, Any]:
    """Source array (any float dtype, bf16 included) -> bytes of GGML type ``q``."""
    if q == Q.F32:
        return np.ascontiguousarray(a, dtype=np.float32) if not is_bf16(a) else to_float32(a)
    if q == Q.F16:
        if a.dtype == np.float16:
            return np.ascontiguousarray(a)
        return _cast_chunked(a, np.float16)
    if q == Q.BF16:
        if is_bf16(a):
            return np.ascontiguousarray(a).view(np.uint16)
        return _to_bf16(a)
    if q == Q.Q8_0:
        return gguf.quants.quantize(to_float32(a).reshape(a.shape), Q.Q8_0)
    raise ConversionError(f"unsupported output type {q.name}")


# ---------------------------------------------------------------------------
# public entry point


def load_config(model_dir: Path) -> tuple[dict[str, Any], Path]:
    config_file = model_dir / "config.json"
    if not model_dir.is_dir():
        raise ConversionError(f"{model_dir}: not a directory; give the folder of a Hugging Face model (with config.json)")
    if not config_file.is_file():
        raise ConversionError(f"{config_file}: missing; a Hugging Face model folder needs its config.json")
    return read_json_object(config_file, "; download it again"), config_file


def read_json_object(path: Path, fix: str = "") -> dict[str, Any]:
    """A JSON file that must hold an object; InvalidFileError naming the file otherwise."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidFileError(f"{path}: not valid JSON ({e}){fix}") from None
    if not isinstance(data, dict):
        raise InvalidFileError(f"{path}: not a JSON object{fix}")
    return data


def make_model(model_dir: Path) -> Model:
    hparams, config_file = load_config(model_dir)
    _load_arch_modules()
    archs = hparams.get("architectures")
    if not isinstance(archs, list) or not archs:
        raise ConversionError(f"{config_file}: no 'architectures' list; add the model class name, e.g. \"architectures\": [\"LlamaForCausalLM\"]")
    arch = str(archs[0])
    cls = _REGISTRY.get(arch)
    if cls is None:
        raise ConversionError(f"{config_file}: architecture {arch!r} is not supported; supported: {', '.join(sorted(_REGISTRY))}")
    return cls.from_config(model_dir, hparams, config_file) if hasattr(cls, "from_config") else cls(model_dir, hparams, config_file)


def _auto_outtype(plan: list[Planned]) -> str:
    for p in plan:
        if len(p.shape) >= 2:
            if p.src_dtype == BF16:
                return "bf16"
            return "f16"
    return "f16"


def _metadata(model_dir: Path, total_params: int, shared: int, expert: int, n_expert: int) -> gguf.Metadata:
    import yaml  # type: ignore[import-untyped]

    try:
        md = gguf.Metadata.load(None, model_dir, None, total_params)
    except yaml.YAMLError as e:
        raise InvalidFileError(f"{model_dir / 'README.md'}: model card front matter is not valid YAML ({str(e).splitlines()[0]}); fix or remove it") from None
    if md.name is None:
        md.name = model_dir.resolve().name
    if md.size_label is None and total_params > 0:
        md.size_label = gguf.size_label(total_params, shared, expert, n_expert)
    return md


def _default_name(md: gguf.Metadata, output_type: str | None, vocab_only: bool) -> str:
    if vocab_only:
        return gguf.naming_convention(md.name, md.basename, md.finetune, md.version, None, None, model_type="vocab") + ".gguf"
    return gguf.naming_convention(md.name, md.basename, md.finetune, md.version, md.size_label, output_type) + ".gguf"


def convert_model(
    model_dir: str | os.PathLike[str],
    outfile: str | os.PathLike[str] | None = None,
    *,
    outtype: str = "auto",
    split_max_size: int | None = None,
    dry_run: bool = False,
    vocab_only: bool = False,
    progress: ProgressCallback | None = None,
) -> Path:
    """Convert a Hugging Face model folder to GGUF and return the output path.

    ``outtype`` is f32, f16, bf16, q8_0 or auto (the checkpoint's 16-bit type),
    or any llama.cpp quantization type (q4_k_m, ...), which is made from a
    temporary f16 file in the destination folder that is always removed.
    With ``split_max_size`` the output is several ``-0000N-of-0000M.gguf``
    files and the first one's path is returned. ``dry_run`` plans everything
    (and validates the checkpoint) but writes nothing.
    """
    model_dir = Path(model_dir)
    ot = outtype.lower()
    if ot not in DIRECT_OUTTYPES:
        return _convert_then_quantize(model_dir, outfile, ot, split_max_size, dry_run, vocab_only, progress)

    model = make_model(model_dir)
    plan: list[Planned] = [] if vocab_only else model.plan(Checkpoint(model_dir))
    if ot == "auto":
        ot = _auto_outtype(plan)
    for p in plan:
        p.out_qtype = _choose_qtype(p, ot)

    arch_name = gguf.MODEL_ARCH_NAMES[model.gguf_arch]
    w = Writer(None, arch_name, split_max_size=split_max_size or 0)
    for p in plan:
        w.add_tensor_info(p.name, p.shape, np.dtype(np.float32), _nbytes(p.shape, p.out_qtype), raw_dtype=p.out_qtype)

    total, shared, expert, n_expert = w.get_total_parameter_count()
    md = _metadata(model_dir, total, shared, expert, n_expert)
    output_type = None if vocab_only else _FTYPE[ot].name.partition("_")[2]
    if outfile is None:
        dest = model_dir.parent / _default_name(md, output_type, vocab_only)
    else:
        dest = Path(outfile)
        if dest.is_dir():
            dest = dest / _default_name(md, output_type, vocab_only)
        elif "{ftype}" in dest.name or "{FTYPE}" in dest.name:
            dest = dest.parent / gguf.fill_templated_filename(dest.name, output_type or "vocab")

    w.add_type(gguf.GGUFType.MODEL)
    md.set_gguf_meta_model(w)
    model.set_parameters(w)
    if not vocab_only:
        w.add_file_type(_FTYPE[ot])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    model.set_vocab(w)

    dests = w.format_shard_names(dest)
    if dry_run:
        return dests[0]
    _write(w, plan, dests, progress)
    return dests[0]


def _write(w: Writer, plan: list[Planned], dests: list[Path], progress: ProgressCallback | None) -> None:
    total = sum(_nbytes(p.shape, p.out_qtype) for p in plan)
    # the f16 intermediate of a quantized --outtype has a hidden temporary name
    desc = "Converting to F16" if dests[0].name.startswith(".") else f"Writing {dests[0].name}"
    done = 0
    with contextlib.ExitStack() as stack:
        tmps = [stack.enter_context(atomic_path(d)) for d in dests]
        # GGUFWriter opens its own file names; hand it our temporary files instead.
        w.fout = [stack.enter_context(open(t, "wb")) for t in tmps]
        w.path = dests[0]
        w.state = gguf.gguf_writer.WriterState.EMPTY
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        if progress:
            progress(desc, 0, total)
        global _POOL
        reader = stack.enter_context(ThreadPoolExecutor(1, thread_name_prefix="ember-read"))
        _POOL = stack.enter_context(ThreadPoolExecutor(1, thread_name_prefix="ember-cast"))
        stack.callback(_reset_pool)
        # read-ahead of the next tensor overlaps with converting and writing this one
        pending: Future[np.ndarray[Any, Any]] | None = None
        for k, p in enumerate(plan):
            expect = _nbytes(p.shape, p.out_qtype)
            if _is_span(p):
                assert p.source is not None and p.source.span is not None
                fout, start = w.begin_tensor(expect)
                _copy_span(p.source.file, p.source.span[0], p.source.span[1], fout.fileno(), start)
                w.end_tensor(fout, start, expect)
            else:
                src = pending.result() if pending is not None else p.load()
                pending = None
                if k + 1 < len(plan) and not _is_span(plan[k + 1]) and _src_nbytes(plan[k + 1]) <= _PREFETCH_MAX:
                    pending = reader.submit(plan[k + 1].load)
                if src.size * _OUT_DTYPE.get(p.out_qtype, np.dtype("u1")).itemsize != expect and p.out_qtype in _OUT_DTYPE:
                    raise ConversionError(f"tensor {p.name}: has {src.size} values, expected {int(np.prod(p.shape))} for shape {list(p.shape)}; the checkpoint is inconsistent with its config")
                fout, start = w.begin_tensor(expect)
                if p.out_qtype in _OUT_DTYPE:
                    _stream_tensor(src, p.out_qtype, fout.fileno(), start)
                elif p.out_qtype == Q.Q8_0 and len(p.shape) >= 2:
                    _stream_rows_quantized(src, p.out_qtype, fout.fileno(), start)
                else:
                    data = convert_data(src, p.out_qtype)
                    if data.nbytes != expect:
                        raise ConversionError(f"tensor {p.name}: produced {data.nbytes} bytes, expected {expect} for shape {list(p.shape)}; the checkpoint is inconsistent with its config")
                    _pwrite_all(fout.fileno(), np.ascontiguousarray(data).reshape(-1).view(np.uint8), start)
                    del data
                w.end_tensor(fout, start, expect)
                del src
            done += expect
            if progress:
                progress(desc, done, total)
        for f in w.fout:
            f.flush()
        w.fout = None
        # closing happens via the ExitStack, before atomic_path renames
        stack.pop_all().close()


_SAME = {Q.F32: np.dtype("<f4"), Q.F16: np.dtype("<f2"), Q.BF16: BF16}


def _is_span(p: Planned) -> bool:
    """True when the output bytes are the source bytes (no transform, same type)."""
    return (
        p.source is not None
        and p.source.span is not None
        and _SAME.get(p.out_qtype) == p.source.dtype
        and sys.byteorder == "little"
    )


def _reset_pool() -> None:
    global _POOL
    _POOL = None


def _src_nbytes(p: Planned) -> int:
    return int(np.prod(p.shape, dtype=np.int64)) * max(p.src_dtype.itemsize, 1)


def _convert_then_quantize(
    model_dir: Path,
    outfile: str | os.PathLike[str] | None,
    qtype: str,
    split_max_size: int | None,
    dry_run: bool,
    vocab_only: bool,
    progress: ProgressCallback | None,
) -> Path:
    if vocab_only:
        raise ConversionError(f"--vocab-only writes no weights, so --outtype {qtype} makes no sense; use --outtype f16")
    if split_max_size:
        raise ConversionError(f"--split-max-size with --outtype {qtype}: quantize first, then split with `ember split`")
    try:
        from ember.quantize import parse_quant_type, quantize_model
    except ImportError:
        raise ConversionError(f"--outtype {qtype}: quantization is not available in this installation; use f32, f16, bf16 or q8_0") from None
    name = parse_quant_type(qtype)  # unknown names fail here, before any work
    if outfile is None or Path(outfile).is_dir():
        probe = convert_model(model_dir, outfile, outtype="f16", dry_run=True)
        stem = probe.name.removesuffix(".gguf")
        stem = stem[: -len("-F16")] if stem.endswith("-F16") else stem
        dest = probe.parent / f"{stem}-{name}.gguf"
    else:
        dest = Path(outfile)
    if dry_run:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    # the f16 intermediate lives beside the output (same filesystem) and never survives
    tmp = dest.parent / f".{dest.name}.f16-{os.getpid()}.tmp.gguf"
    try:
        convert_model(model_dir, tmp, outtype="f16", progress=progress)
        files = quantize_model(tmp, dest, name, progress=progress)
        return Path(files[0]) if files else dest
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def iter_chunks(n: int, step: int) -> Iterator[tuple[int, int]]:
    for i in range(0, n, step):
        yield i, min(n, i + step)


def check_divisible(model: Model, what: str, a: int, b: int) -> None:
    if b == 0 or a % b:
        raise ConversionError(f"{model.config_file}: {what}: {a} is not divisible by {b}; the config is inconsistent")


__all__ = ["convert_model", "Model", "Planned", "register", "permute_qk", "lazy", "math"]
