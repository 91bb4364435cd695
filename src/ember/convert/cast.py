"""Tensor data into GGML types, written straight into the output file.

Source arrays (f32, f16, bf16) become f32, f16, bf16 or q8_0 bytes a block at
a time in a small staging buffer that ``os.pwrite`` puts in place, so no
converted copy of a whole tensor is ever made, and the temporaries stay in the
CPU cache (chunks of 64k elements: about 5x faster than whole-tensor casts).
Big tensors are split over a second thread of a pool the caller owns (numpy
drops the GIL while it casts). Bytes already in the output type are copied by
the kernel (``copy_file_range``) without passing through Python.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from ember.convert.source import is_bf16, to_float32
from ember.errors import InvalidFileError

Q = gguf.GGMLQuantizationType

CHUNK = 1 << 16  # elements per cast: temporaries stay in the CPU cache
BLOCK = 1 << 19  # elements converted into the staging buffer per pwrite

#: numpy layout of the GGML types written by casting (bf16 as raw 16-bit words)
OUT_DTYPE: dict[Q, np.dtype[Any]] = {Q.F32: np.dtype("<f4"), Q.F16: np.dtype("<f2"), Q.BF16: np.dtype("<u2")}


def tensor_nbytes(shape: tuple[int, ...], q: Q) -> int:
    """Bytes of a tensor of ``shape`` in GGML type ``q``."""
    block, size = gguf.GGML_QUANT_SIZES[q]
    return int(np.prod(shape, dtype=np.int64)) // block * size


def write_tensor(a: np.ndarray[Any, Any], q: Q, fd: int, start: int, pool: ThreadPoolExecutor | None) -> None:
    """Write ``a`` as GGML type ``q`` (f32, f16, bf16 or q8_0) at byte ``start`` of ``fd``."""
    if q in OUT_DTYPE:
        _write_cast(a, q, fd, start, pool)
    elif q == Q.Q8_0:
        _write_quantized(a, q, fd, start)
    else:
        raise ValueError(f"cannot write GGML type {q.name} directly")


def _write_cast(a: np.ndarray[Any, Any], q: Q, fd: int, start: int, pool: ThreadPoolExecutor | None) -> None:
    """f32/f16/bf16 output; a big tensor's second half on the pool's thread."""
    flat = np.ascontiguousarray(a).reshape(-1)
    n = flat.size
    if n >= 4 * BLOCK and pool is not None:
        mid = (n // 2) // BLOCK * BLOCK
        fut = pool.submit(_write_range, flat, q, fd, start, mid, n)
        try:
            _write_range(flat, q, fd, start, 0, mid)
        finally:
            fut.result()
    else:
        _write_range(flat, q, fd, start, 0, n)


def _write_range(flat: np.ndarray[Any, Any], q: Q, fd: int, start: int, lo: int, hi: int) -> None:
    """Convert ``flat[lo:hi]`` to ``q`` block by block and pwrite each block to its place."""
    od = OUT_DTYPE[q]
    same = flat.dtype == od or (q == Q.BF16 and is_bf16(flat))
    staging = None if same else np.empty(BLOCK, dtype=od)
    for i in range(lo, hi, BLOCK):
        j = min(hi, i + BLOCK)
        if staging is None:
            block = flat[i:j]
        else:
            block = staging[: j - i]
            if q == Q.BF16:
                block[...] = to_bf16(flat[i:j])
            else:
                _cast_into(flat[i:j], block)
        pwrite_all(fd, block.view(np.uint8), start + i * od.itemsize)


def _write_quantized(a: np.ndarray[Any, Any], q: Q, fd: int, start: int) -> None:
    """Quantize (gguf-py's reference quantizer) a few rows at a time: blocks run
    along rows, so row groups are independent and no float32 copy of the
    whole tensor is made."""
    rows = a.reshape(-1, a.shape[-1])
    block, size = gguf.GGML_QUANT_SIZES[q]
    row_bytes = a.shape[-1] // block * size
    step = max(1, BLOCK // a.shape[-1])
    for i in range(0, rows.shape[0], step):
        data = gguf.quants.quantize(to_float32(rows[i : i + step]), q)
        pwrite_all(fd, np.ascontiguousarray(data).reshape(-1).view(np.uint8), start + i * row_bytes)


def _cast_into(flat: np.ndarray[Any, Any], out: np.ndarray[Any, Any]) -> None:
    """``out[:] = flat`` (bf16 source included) in cache-sized chunks."""
    with np.errstate(over="ignore"):  # f16 overflow becomes inf, as in llama.cpp's converter
        if is_bf16(flat) and out.dtype == np.float16:
            _bf16_to_f16(flat.view(np.uint16), out)
        elif is_bf16(flat):
            words = flat.view(np.uint16)
            buf = np.empty(CHUNK, dtype=np.uint32)
            for i in range(0, flat.size, CHUNK):
                j = min(flat.size, i + CHUNK)
                b = buf[: j - i]
                np.left_shift(words[i:j], 16, out=b, dtype=np.uint32)
                out[i:j] = b.view(np.float32)
        else:
            for i in range(0, flat.size, CHUNK):
                out[i : i + CHUNK] = flat[i : i + CHUNK]


def _bf16_to_f16(words: np.ndarray[Any, Any], out: np.ndarray[Any, Any]) -> None:
    """bf16 -> f16 by integer arithmetic where the value is a normal f16 (the
    exponent is re-biased, the 7 mantissa bits fit in f16's 10); zeros,
    subnormals, overflow, inf and NaN go through a float32 cast. Bit-identical
    to casting through float32, about twice as fast."""
    o16 = out.view(np.uint16)
    buf = np.empty(CHUNK, dtype=np.uint32)
    lo_e, hi_e = np.uint16(113 << 7), np.uint16(143 << 7)
    for i in range(0, words.size, CHUNK):
        j = min(words.size, i + CHUNK)
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


def to_bf16(a: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """Float array -> bf16 words, rounded to nearest even (NaN stays NaN)."""
    flat = a.reshape(-1)
    out = np.empty(flat.shape, dtype=np.uint16)
    for i in range(0, flat.size, CHUNK):
        u = to_float32(flat[i : i + CHUNK]).view(np.uint32)
        nan = (u & 0x7FFFFFFF) > 0x7F800000
        r = ((u.astype(np.uint64) + (0x7FFF + ((u >> 16) & 1))) >> 16).astype(np.uint16)
        r[nan] = ((u[nan] >> 16) | 64).astype(np.uint16)
        out[i : i + CHUNK] = r
    return out


def copy_span(src: Path, offset: int, nbytes: int, out_fd: int, dst_offset: int) -> None:
    """Copy ``nbytes`` at ``offset`` of ``src`` to ``dst_offset`` of ``out_fd``:
    in the kernel (copy_file_range) where the file systems allow, else by reads."""
    with open(src, "rb", buffering=0) as f:
        done = 0
        try:
            while done < nbytes:
                k = os.copy_file_range(f.fileno(), out_fd, nbytes - done, offset + done, dst_offset + done)
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
            pwrite_all(out_fd, chunk, dst_offset + done)
            done += len(chunk)


def pwrite_all(fd: int, buf: Any, pos: int) -> None:
    mv = memoryview(buf).cast("B")
    while len(mv):
        k = os.pwrite(fd, mv, pos)
        mv = mv[k:]
        pos += k
