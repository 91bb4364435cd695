"""Split a GGUF model into llama.cpp-compatible shards and merge shards back.

Layout follows llama.cpp's ``llama-gguf-split`` (tools/gguf-split): shard 1
carries every key of the source followed by ``split.no`` (u16),
``split.tensors.count`` (i32) and ``split.count`` (u16), in that order (the
order gguf's set-value calls leave them in); other shards carry only those
three keys. Shards are planned the same way: by tensor count, or by the sum of
tensor sizes padded to 32 bytes (metadata not counted).

Unlike llama-gguf-split, ``merge_model`` drops the split.* keys, so merging
Ember's split of a file gives back that file byte for byte; and a tensor
larger than ``max_size`` goes alone into its own shard instead of failing.

Headers are written by gguf-py's ``GGUFWriter``; tensor data is streamed in
chunks (``copy_file_range`` where the OS has it), so memory stays flat
whatever the model size. All outputs are written under temporary names and
renamed only when every one is complete.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
from gguf import GGUFValueType, GGUFWriter

from ember.errors import InvalidFileError, OptionError
from ember.fsutil import atomic_path
from ember.gguf.shards import find_shards, shard_name
from ember.gguf.validate import (
    DEFAULT_ALIGNMENT,
    KEY_SPLIT_COUNT,
    KEY_SPLIT_NO,
    KEY_SPLIT_TENSORS,
    GGUFHeader,
    KeyValue,
    TensorRecord,
    check_shards,
    read_header,
    read_raw,
)
from ember.progress import ProgressCallback, noop

SPLIT_KEYS = (KEY_SPLIT_NO, KEY_SPLIT_COUNT, KEY_SPLIT_TENSORS)
CHUNK = 16 << 20
DEFAULT_MAX_TENSORS = 128  # llama-gguf-split's default


@dataclass
class ShardPlan:
    """One output shard: its path and the tensors (with their source file)."""

    path: Path
    tensors: list[tuple[GGUFHeader, TensorRecord]] = field(default_factory=list)
    with_metadata: bool = False

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes for _, t in self.tensors)


def _pad(n: int, align: int) -> int:
    return -(-n // align) * align


def _strip_gguf(prefix: str | os.PathLike[str]) -> str:
    s = os.fspath(prefix)
    return s[:-5] if s.endswith(".gguf") else s


def plan_split(
    src: str | os.PathLike[str],
    out_prefix: str | os.PathLike[str],
    *,
    max_size: int | None = None,
    max_tensors: int | None = None,
    no_tensor_first_split: bool = False,
) -> list[ShardPlan]:
    """Which tensors go into which shard, as llama-gguf-split decides it."""
    if max_size is not None and max_tensors is not None:
        raise OptionError("give either a maximum shard size or a maximum tensor count, not both")
    if max_size is not None and max_size <= 0:
        raise OptionError(f"maximum shard size must be positive, got {max_size}")
    if max_tensors is not None and max_tensors <= 0:
        raise OptionError(f"maximum tensors per shard must be positive, got {max_tensors}")
    if max_size is None and max_tensors is None:
        max_tensors = DEFAULT_MAX_TENSORS
    headers = _read_model(src)
    tensors = [(h, t) for h in headers for t in h.tensors]
    if not tensors:
        raise InvalidFileError(f"{src}: the model has no tensors to split")
    groups: list[list[tuple[GGUFHeader, TensorRecord]]] = [[]]
    if no_tensor_first_split:
        groups.append([])
    current = 0
    for i, item in enumerate(tensors):
        n = _pad(item[1].nbytes, DEFAULT_ALIGNMENT)
        if max_size is not None:
            split = current + n > max_size and len(groups[-1]) > 0
        else:
            assert max_tensors is not None
            split = i > 0 and i % max_tensors == 0
        if split:
            groups.append([])
            current = n
        else:
            current += n
        groups[-1].append(item)
    prefix = _strip_gguf(out_prefix)
    count = len(groups)
    plans = [ShardPlan(shard_name(prefix, i, count), g, with_metadata=(i == 0)) for i, g in enumerate(groups)]
    return plans


def split_model(
    src: str | os.PathLike[str],
    out_prefix: str | os.PathLike[str],
    *,
    max_size: int | None = None,
    max_tensors: int | None = None,
    no_tensor_first_split: bool = False,
    dry_run: bool = False,
    progress: ProgressCallback | None = None,
) -> list[Path]:
    """Split ``src`` (a file, or any shard of a split model) into
    ``OUT_PREFIX-0000K-of-0000N.gguf`` shards; returns their paths. With
    ``dry_run`` nothing is written. ``max_size`` counts tensor bytes only
    (like llama-gguf-split); ``max_tensors`` defaults to 128 if neither is given."""
    plans = plan_split(
        src, out_prefix, max_size=max_size, max_tensors=max_tensors, no_tensor_first_split=no_tensor_first_split
    )
    paths = [p.path for p in plans]
    if dry_run:
        return paths
    headers = _read_model(src)
    _refuse_overwriting_inputs(paths, [h.path for h in headers])
    first = headers[0]
    base_kv = [kv for kv in first.kv.values() if kv.key not in SPLIT_KEYS]
    total_tensors = sum(len(p.tensors) for p in plans)
    count = len(plans)
    total = sum(p.tensor_bytes for p in plans)
    report = _Progress(progress or noop, f"Splitting {Path(src).name}", total)
    with contextlib.ExitStack() as stack:
        for i, plan in enumerate(plans):
            tmp = stack.enter_context(atomic_path(plan.path))
            kvs = _kv_items(first, base_kv) if plan.with_metadata else []
            kvs += [
                (KEY_SPLIT_NO, GGUFValueType.UINT16, i, None),
                (KEY_SPLIT_TENSORS, GGUFValueType.INT32, total_tensors, None),
                (KEY_SPLIT_COUNT, GGUFValueType.UINT16, count, None),
            ]
            alignment = first.alignment if plan.with_metadata else DEFAULT_ALIGNMENT
            _write_gguf(tmp, kvs, plan.tensors, alignment, report)
            _default_mode(tmp)
    report.done()
    return paths


def merge_model(
    first_shard: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    progress: ProgressCallback | None = None,
) -> Path:
    """Merge a split model (given any of its shards) into one GGUF file.

    The split.* keys are dropped, so the result is the file that was split."""
    headers = _read_model(first_shard)
    if KEY_SPLIT_COUNT not in headers[0].kv:
        raise InvalidFileError(f"{first_shard}: is not a split model (it has no split.count key): nothing to merge")
    out = Path(out)
    _refuse_overwriting_inputs([out], [h.path for h in headers])
    first = headers[0]
    base_kv = [kv for kv in first.kv.values() if kv.key not in SPLIT_KEYS]
    tensors = [(h, t) for h in headers for t in h.tensors]
    total = sum(t.nbytes for _, t in tensors)
    report = _Progress(progress or noop, f"Merging into {out.name}", total)
    with atomic_path(out) as tmp:
        _write_gguf(tmp, _kv_items(first, base_kv), tensors, first.alignment, report)
        _default_mode(tmp)
    report.done()
    return out


def _default_mode(path: Path) -> None:
    """Temporary files are created 0600; give outputs the usual umask mode."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _read_model(path: str | os.PathLike[str]) -> list[GGUFHeader]:
    headers = [read_header(p) for p in find_shards(path)]
    check_shards(headers)
    return headers


def _refuse_overwriting_inputs(outputs: Sequence[Path], inputs: Sequence[Path]) -> None:
    for o in outputs:
        if o.is_dir():
            raise InvalidFileError(f"{o}: is a directory; give a file name for the output")
        for i in inputs:
            with contextlib.suppress(OSError):
                if o.exists() and os.path.samefile(o, i):
                    raise InvalidFileError(f"{o}: is one of the input files; choose another output name")


class _Progress:
    def __init__(self, callback: ProgressCallback, description: str, total: int) -> None:
        self.callback, self.description, self.total, self.completed = callback, description, total, 0
        callback(description, 0, total)

    def advance(self, n: int) -> None:
        self.completed += n
        self.callback(self.description, self.completed, self.total)

    def done(self) -> None:
        self.callback(self.description, self.total, self.total)


@dataclass(frozen=True)
class _RawArray:
    """An array value kept as its stored element bytes (already walked and
    bounds-checked by the validator): a 262k-token vocabulary is copied as
    4 MB of bytes instead of half a million Python objects."""

    sub_type: GGUFValueType
    count: int
    payload: bytes

    def __len__(self) -> int:
        return self.count


def _kv_items(header: GGUFHeader, kvs: Sequence[KeyValue]) -> list[tuple[str, GGUFValueType, Any, GGUFValueType | None]]:
    """(key, type, value, element type) with values exactly as stored: strings
    as their original bytes, arrays as their stored element bytes."""
    out: list[tuple[str, GGUFValueType, Any, GGUFValueType | None]] = []
    for kv in kvs:
        if kv.is_array:
            assert kv.sub_type is not None
            out.append((kv.key, kv.type, _RawArray(kv.sub_type, kv.count, read_raw(header, kv)), kv.sub_type))
        elif kv.type == GGUFValueType.STRING:
            out.append((kv.key, kv.type, _raw(kv.value), None))
        else:
            out.append((kv.key, kv.type, kv.value, None))
    return out


def _raw(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


class _Writer(GGUFWriter):
    """gguf-py's writer, taught to emit a :class:`_RawArray` (same bytes as
    packing its elements one by one, without the Python objects)."""

    def _pack_val(self, val: Any, vtype: GGUFValueType, add_vtype: bool, sub_type: GGUFValueType | None = None) -> bytes:
        if isinstance(val, _RawArray):
            head = self._pack("I", vtype) if add_vtype else b""
            return head + self._pack("I", val.sub_type) + self._pack("Q", val.count) + val.payload
        return super()._pack_val(val, vtype, add_vtype, sub_type)


def _write_gguf(
    path: Path,
    kvs: Sequence[tuple[str, GGUFValueType, Any, GGUFValueType | None]],
    tensors: Sequence[tuple[GGUFHeader, TensorRecord]],
    alignment: int,
    report: _Progress,
) -> None:
    """Header via gguf-py's GGUFWriter (keys in the given order), then the
    tensor data streamed from the source files, each padded to ``alignment``."""
    w = _Writer(path, arch="")
    w.kv_data = [{}]  # drop the general.architecture key GGUFWriter adds itself
    w.data_alignment = alignment
    for key, vtype, value, sub in kvs:
        w.add_key_value(key, value, vtype, sub_type=sub)
    for _, t in tensors:
        name: Any = t.name if t.name.isascii() else _raw(t.name)
        w.add_tensor_info(name, tuple(reversed(t.shape)), np.dtype(np.float32), t.nbytes, raw_dtype=t.type)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        assert w.fout is not None
        fout = w.fout[0]
        w.write_padding(fout, fout.tell())
        fout.flush()
        sources: dict[Path, IO[bytes]] = {}
        try:
            for h, t in tensors:
                src = sources.get(h.path)
                if src is None:
                    src = sources[h.path] = open(h.path, "rb")
                _copy(src, fout, h.data_offset + t.offset, t.nbytes, report, h.path)
                w.write_padding(fout, t.nbytes)
        finally:
            for f in sources.values():
                f.close()
        fout.flush()
    finally:
        w.close()


def _copy(src: Any, dst: Any, offset: int, n: int, report: _Progress, src_path: Path) -> None:
    """Copy ``n`` bytes from ``src`` at ``offset`` to the end of ``dst``."""
    remaining = n
    if hasattr(os, "copy_file_range"):
        dst.flush()
        out_fd = dst.fileno()
        in_off = offset
        try:
            while remaining > 0:
                done = os.copy_file_range(src.fileno(), out_fd, min(remaining, CHUNK), in_off)
                if done == 0:
                    break
                in_off += done
                remaining -= done
                report.advance(done)
            if remaining == 0:
                # copy_file_range moved the fd offset; keep the buffered writer in step.
                dst.seek(0, os.SEEK_END)
                return
        except OSError:
            pass
        dst.seek(0, os.SEEK_END)
        offset = in_off
    src.seek(offset)
    buf = bytearray(min(CHUNK, max(remaining, 1)))
    view = memoryview(buf)
    while remaining > 0:
        k = src.readinto(view[: min(remaining, len(buf))])
        if not k:
            raise InvalidFileError(f"{src_path}: ended early while copying tensor data (the file changed or is truncated)")
        dst.write(view[:k])
        remaining -= k
        report.advance(k)
