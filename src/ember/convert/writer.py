"""Writing GGUF files: the one module that knows how gguf-py writes them.

gguf-py's ``GGUFWriter`` holds the metadata and the tensor table (and decides
which tensors go into which shard); its public calls write the header, the
metadata and the tensor table of every shard. The tensor data is then written
here, at the offsets that table gives, one tensor at a time and in place
(``os.pwrite``, ``copy_file_range``), so peak memory is about one tensor, not
one model, and the bytes never pass through gguf-py.

One private part of gguf-py is used, in :class:`Writer`: ``_pack_val`` is
overridden to pack long metadata arrays (a 150k-token vocabulary's tokens,
scores, types and merges) in one go, 4x faster than an item at a time, same
bytes. pyproject.toml pins gguf to the versions this was tested with.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import sys
import tempfile
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from ember.convert.base import Planned
from ember.convert.cast import copy_span, tensor_nbytes, write_tensor
from ember.convert.source import BF16
from ember.errors import ConversionError
from ember.fsutil import atomic_path
from ember.progress import ProgressCallback

Q = gguf.GGMLQuantizationType

# gguf-py logs through the root logger's last-resort handler when the
# application configured none: keep its chatter off the user's terminal.
logging.getLogger("gguf").addHandler(logging.NullHandler())

_PREFETCH_MAX = 256 * 1024 * 1024  # read the next tensor while writing this one, if it is at most this big
_SAME = {Q.F32: np.dtype("<f4"), Q.F16: np.dtype("<f2"), Q.BF16: BF16}  # output types whose bytes a source can have


class Writer(gguf.GGUFWriter):
    """gguf-py's writer, packing long metadata arrays in one go instead of one
    ``struct.pack`` per item. The bytes are the same; only the speed differs."""

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

    def value(self, key: str) -> Any:
        """A metadata value added so far (None if absent)."""
        v = self.kv_data[0].get(key)
        return None if v is None else v.value


def add_tensor_infos(w: Writer, tensors: Sequence[Planned]) -> None:
    """Declare the planned tensors (types chosen) in ``w``'s tensor table."""
    for p in tensors:
        w.add_tensor_info(p.name, p.shape, np.dtype(np.float32), tensor_nbytes(p.shape, p.out_qtype), raw_dtype=p.out_qtype)


@dataclass
class _Slot:
    """Where one tensor's data goes: its shard's file and the byte offset."""

    shard: int
    offset: int
    nbytes: int


def write_gguf(w: Writer, tensors: Sequence[Planned], dests: list[Path], progress: ProgressCallback | None, desc: str) -> None:
    """Write ``w``'s metadata and the data of ``tensors`` (declared in ``w`` in
    this order) into ``dests``, one path per shard. Each file appears under
    its name only when complete (:func:`ember.fsutil.atomic_path`)."""
    if len(dests) != len(w.tensors):
        raise ValueError(f"{len(dests)} paths for {len(w.tensors)} shards")
    with contextlib.ExitStack() as stack:
        tmps = [stack.enter_context(atomic_path(d)) for d in dests]
        # gguf-py names the files it writes itself (shard names from one path):
        # let it write the heads in a private folder, then move them into place.
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f".{dests[0].name}.", suffix=".tmp", dir=dests[0].parent)))
        heads = w.format_shard_names(scratch / "head.gguf")
        w.write_header_to_file(scratch / "head.gguf")
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        w.close()
        slots: dict[str, _Slot] = {}
        for i, (head, tmp) in enumerate(zip(heads, tmps, strict=True)):
            os.replace(head, tmp)
            pos = w.ggml_pad(tmp.stat().st_size, w.data_alignment)
            for name, info in w.tensors[i].items():
                slots[name] = _Slot(i, pos, info.nbytes)
                pos += w.ggml_pad(info.nbytes, w.data_alignment)
            if w.tensors[i]:
                os.truncate(tmp, pos)  # the padding around tensors reads as zeros
        fds = [stack.enter_context(open(t, "r+b", buffering=0)).fileno() for t in tmps]
        reader = stack.enter_context(ThreadPoolExecutor(1, thread_name_prefix="ember-read"))
        pool = stack.enter_context(ThreadPoolExecutor(1, thread_name_prefix="ember-cast"))
        _write_data(tensors, slots, fds, reader, pool, progress, desc)


def _write_data(
    tensors: Sequence[Planned],
    slots: dict[str, _Slot],
    fds: list[int],
    reader: ThreadPoolExecutor,
    pool: ThreadPoolExecutor,
    progress: ProgressCallback | None,
    desc: str,
) -> None:
    """Each tensor into its slot; the next one is read ahead while this one is written."""
    total = sum(s.nbytes for s in slots.values())
    done = 0
    if progress:
        progress(desc, 0, total)
    pending: Future[np.ndarray[Any, Any]] | None = None
    for k, p in enumerate(tensors):
        slot = slots[p.name]
        expect = tensor_nbytes(p.shape, p.out_qtype)
        if expect != slot.nbytes:
            raise ConversionError(f"internal error: tensor {p.name} has {expect} bytes of data for a {slot.nbytes}-byte slot")
        if _is_span(p):
            assert p.source is not None and p.source.span is not None
            copy_span(p.source.file, p.source.span[0], p.source.span[1], fds[slot.shard], slot.offset)
        else:
            src = pending.result() if pending is not None else p.load()
            pending = None
            if k + 1 < len(tensors) and not _is_span(tensors[k + 1]) and _src_nbytes(tensors[k + 1]) <= _PREFETCH_MAX:
                pending = reader.submit(tensors[k + 1].load)
            if src.size != int(np.prod(p.shape, dtype=np.int64)):
                raise ConversionError(f"tensor {p.name}: has {src.size} values, expected {int(np.prod(p.shape))} for shape {list(p.shape)}; the checkpoint is inconsistent with its config")
            write_tensor(src, p.out_qtype, fds[slot.shard], slot.offset, pool)
            del src
        done += expect
        if progress:
            progress(desc, done, total)


def _is_span(p: Planned) -> bool:
    """True when the output bytes are the source bytes (no transform, same type)."""
    return (
        p.source is not None
        and p.source.span is not None
        and _SAME.get(p.out_qtype) == p.source.dtype
        and sys.byteorder == "little"
    )


def _src_nbytes(p: Planned) -> int:
    return int(np.prod(p.shape, dtype=np.int64)) * max(p.src_dtype.itemsize, 1)
