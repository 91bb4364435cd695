"""A strict, bounded reader for GGUF headers, key/value tables and tensor tables.

Why not gguf-py's ``GGUFReader``: it trusts the lengths it reads (a flipped
byte can make it allocate gigabytes, loop for minutes or raise an arbitrary
exception) and it reads nothing llama.cpp's loader would reject. Every length
here is checked against the bytes left in the file *before* anything is
allocated, every count against a fixed limit, and every problem becomes one
:class:`~ember.errors.InvalidFileError` ``"FILE: what is wrong (where)"``.

Only headers and tables are read (through ``mmap``), never tensor data, so
checking the 235 MB demo model costs milliseconds. Large arrays (a tokenizer's
vocabulary) are walked but not decoded unless asked for with
:func:`read_array`.
"""

from __future__ import annotations

import mmap
import os
import stat
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from ember.errors import InvalidFileError

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_TENSORS = 1_000_000
MAX_KEYS = 100_000
MAX_KEY_LENGTH = 65_536
MAX_TENSOR_NAME = 63  # llama.cpp: GGML_MAX_NAME (64) including the terminating zero
MAX_DIMS = 4
MAX_ALIGNMENT = 1 << 30
# Arrays up to this length are decoded while reading the table; longer ones
# (vocabularies, merges, scores) are only walked, and read on demand.
DECODE_ARRAY_LIMIT = 64

KEY_ALIGNMENT = "general.alignment"
KEY_SPLIT_NO = "split.no"
KEY_SPLIT_COUNT = "split.count"
KEY_SPLIT_TENSORS = "split.tensors.count"

_T = GGUFValueType
# Fixed-size value types: struct format and numpy dtype (little-endian).
_SCALAR: dict[GGUFValueType, tuple[str, str]] = {
    _T.UINT8: ("<B", "<u1"),
    _T.INT8: ("<b", "<i1"),
    _T.UINT16: ("<H", "<u2"),
    _T.INT16: ("<h", "<i2"),
    _T.UINT32: ("<I", "<u4"),
    _T.INT32: ("<i", "<i4"),
    _T.FLOAT32: ("<f", "<f4"),
    _T.BOOL: ("<B", "<u1"),
    _T.UINT64: ("<Q", "<u8"),
    _T.INT64: ("<q", "<i8"),
    _T.FLOAT64: ("<d", "<f8"),
}
_SIZE = {t: struct.calcsize(fmt) for t, (fmt, _) in _SCALAR.items()}
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")


@dataclass(frozen=True)
class KeyValue:
    """One metadata entry. ``value`` is None for arrays longer than
    :data:`DECODE_ARRAY_LIMIT` (use :func:`read_array`)."""

    key: str
    type: GGUFValueType
    value: Any
    sub_type: GGUFValueType | None = None  # element type of an array
    count: int = 1  # array length (1 for scalars and strings)
    offset: int = 0  # file offset of the key record
    value_offset: int = 0  # file offset of the value (after the type fields)
    end: int = 0  # file offset just past the record

    @property
    def is_array(self) -> bool:
        return self.type == GGUFValueType.ARRAY


@dataclass(frozen=True)
class TensorRecord:
    """One tensor-info record. ``shape`` is in GGUF (ggml) order: ne[0] first."""

    name: str
    type: GGMLQuantizationType
    shape: tuple[int, ...]
    n_elements: int
    nbytes: int
    offset: int  # relative to the start of the data section
    info_offset: int  # file offset of the record


@dataclass
class GGUFHeader:
    """Everything in a GGUF file except the tensor data."""

    path: Path
    file_size: int
    version: int
    alignment: int
    kv: dict[str, KeyValue]
    tensors: list[TensorRecord]
    tensor_info_end: int  # file offset just past the tensor-info table
    data_offset: int  # absolute offset of the (aligned) data section
    stat_key: tuple[int, int, int] = field(default=(0, 0, 0), repr=False)

    def get(self, key: str, default: Any = None) -> Any:
        kv = self.kv.get(key)
        return default if kv is None or kv.value is None else kv.value

    @property
    def data_size(self) -> int:
        """Bytes from the data section start to the end of the last tensor."""
        if not self.tensors:
            return 0
        last = self.tensors[-1]
        return last.offset + last.nbytes

    def split_count(self) -> int:
        """split.count, or 0 when the file is not a shard (absent or 0)."""
        return int(self.get(KEY_SPLIT_COUNT, 0) or 0)


def _q(name: str) -> str:
    """A key or tensor name for a message: quoted, escaped, at most ~60 chars."""
    return repr(name if len(name) <= 60 else name[:57] + "...")


def _err(path: Path | str, what: str) -> InvalidFileError:
    return InvalidFileError(f"{path}: {what}")


class _Cursor:
    """Bounded little-endian reads from a buffer; every read checks the end first."""

    __slots__ = ("buf", "pos", "end", "path")

    def __init__(self, buf: Any, end: int, path: Path) -> None:
        self.buf = buf
        self.pos = 0
        self.end = end
        self.path = path

    def need(self, n: int, what: str) -> None:
        if n < 0 or n > self.end - self.pos:
            left = self.end - self.pos
            raise _err(
                self.path,
                f"{what} at offset {self.pos} needs {n} bytes but only {left} remain: the file is truncated or corrupt",
            )

    def u32(self, what: str) -> int:
        self.need(4, what)
        (v,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return int(v)

    def u64(self, what: str) -> int:
        self.need(8, what)
        (v,) = _U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return int(v)

    def raw_string(self, what: str, limit: int | None = None) -> bytes:
        start = self.pos
        n = self.u64(f"{what} length")
        if limit is not None and n > limit:
            raise _err(self.path, f"{what} at offset {start} has length {n} (limit {limit})")
        if n > self.end - self.pos:
            raise _err(
                self.path,
                f"{what} at offset {start} has length {n} but only {self.end - self.pos} bytes remain in the file",
            )
        b = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return b

    def skip_strings(self, count: int, what: str) -> None:
        """Walk ``count`` length-prefixed strings without decoding them.

        A vocabulary has hundreds of thousands of entries: the walk first
        runs without per-entry checks (a length past the end makes the next
        read fail, or leaves the position past the end) and only when that
        fails walks again, checking each entry, to say which one is wrong."""
        buf, pos, unpack = self.buf, self.pos, _U64.unpack_from
        try:
            for _ in range(count):
                pos += 8 + unpack(buf, pos)[0]
        except (struct.error, OverflowError):
            pos = self.end + 1
        if pos <= self.end:
            self.pos = pos
            return
        self._skip_strings_checked(count, what)

    def _skip_strings_checked(self, count: int, what: str) -> None:
        buf, pos, end, unpack = self.buf, self.pos, self.end, _U64.unpack_from
        for i in range(count):
            if end - pos < 8:
                self.pos = pos
                raise _err(self.path, f"{what}: element {i} at offset {pos} runs past the end of the file: the file is truncated or corrupt")
            (n,) = unpack(buf, pos)
            pos += 8
            if n > end - pos:
                raise _err(
                    self.path,
                    f"{what}: element {i} at offset {pos - 8} has length {n} but only {end - pos} bytes remain: "
                    "the file is truncated or corrupt",
                )
            pos += n
        self.pos = pos

    def strings(self, count: int, what: str) -> list[str]:
        out: list[str] = []
        buf, pos, end, unpack = self.buf, self.pos, self.end, _U64.unpack_from
        for i in range(count):
            if end - pos < 8:
                raise _err(self.path, f"{what}: element {i} at offset {pos} runs past the end of the file: the file is truncated or corrupt")
            (n,) = unpack(buf, pos)
            pos += 8
            if n > end - pos:
                raise _err(
                    self.path,
                    f"{what}: element {i} at offset {pos - 8} has length {n} but only {end - pos} bytes remain: "
                    "the file is truncated or corrupt",
                )
            out.append(bytes(buf[pos : pos + n]).decode("utf-8", "surrogateescape"))
            pos += n
        self.pos = pos
        return out


def _value_type(code: int, cur: _Cursor, what: str, at: int) -> GGUFValueType:
    try:
        return GGUFValueType(code)
    except ValueError:
        raise _err(cur.path, f"{what} at offset {at} has unknown value type {code}") from None


def _read_scalar(cur: _Cursor, vtype: GGUFValueType, what: str) -> Any:
    fmt, _ = _SCALAR[vtype]
    size = _SIZE[vtype]
    cur.need(size, what)
    (v,) = struct.unpack_from(fmt, cur.buf, cur.pos)
    if vtype == GGUFValueType.BOOL:
        if v > 1:
            raise _err(cur.path, f"{what} at offset {cur.pos} is a bool stored as {v} (must be 0 or 1)")
        cur.pos += size
        return bool(v)
    cur.pos += size
    return v


def _read_array_values(cur: _Cursor, sub: GGUFValueType, count: int, what: str, decode: bool) -> Any:
    if sub == GGUFValueType.STRING:
        if decode:
            return cur.strings(count, what)
        cur.skip_strings(count, what)
        return None
    size = _SIZE[sub] * count
    cur.need(size, f"{what} ({count} x {sub.name.lower()})")
    if not decode:
        cur.pos += size
        return None
    arr = np.frombuffer(cur.buf, dtype=_SCALAR[sub][1], count=count, offset=cur.pos)
    cur.pos += size
    if sub == GGUFValueType.BOOL:
        return [bool(x) for x in arr]
    return arr.tolist()


def _parse(buf: Any, size: int, path: Path) -> GGUFHeader:
    cur = _Cursor(buf, size, path)
    if size < 4 or bytes(buf[:4]) != GGUF_MAGIC:
        head = bytes(buf[: min(size, 4)])
        raise _err(path, f"not a GGUF file (magic {head!r} at offset 0, expected b'GGUF')")
    cur.pos = 4
    version = cur.u32("version")
    if version == 0:
        raise _err(path, "GGUF version 0 is invalid (offset 4)")
    if version & 0xFFFF == 0:
        raise _err(path, f"GGUF version {version:#x} (offset 4): a big-endian file, which llama.cpp cannot load here")
    if version == 1:
        raise _err(path, "GGUF version 1 is no longer supported (offset 4): convert the model again")
    if version > 3:
        raise _err(path, f"GGUF version {version} is newer than supported (3) (offset 4)")
    n_tensors = cur.u64("tensor count")
    if n_tensors > MAX_TENSORS:
        raise _err(path, f"tensor count {n_tensors} (offset 8) exceeds the limit of {MAX_TENSORS}")
    n_kv = cur.u64("key/value count")
    if n_kv > MAX_KEYS:
        raise _err(path, f"key/value count {n_kv} (offset 16) exceeds the limit of {MAX_KEYS}")
    # Every key needs at least 8 (length) + 1 (name) + 4 (type) + 1 (value) bytes,
    # every tensor record 8 + 1 + 4 + 8 + 4 + 8: counts beyond that are lies.
    if n_kv * 14 + n_tensors * 33 > size - cur.pos:
        raise _err(
            path,
            f"{n_kv} keys and {n_tensors} tensors (offset 8) cannot fit in a {size}-byte file: the file is truncated or its header counts are corrupt",
        )

    kv: dict[str, KeyValue] = {}
    for i in range(n_kv):
        start = cur.pos
        raw = cur.raw_string(f"key #{i} name", MAX_KEY_LENGTH)
        try:
            key = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _err(path, f"key #{i} name at offset {start} is not valid UTF-8") from None
        if not key:
            raise _err(path, f"key #{i} at offset {start} has an empty name")
        if key in kv:
            raise _err(path, f"duplicate key {_q(key)} (key #{i} at offset {start})")
        what = f"key {_q(key)} (#{i})"
        at = cur.pos
        vtype = _value_type(cur.u32(f"{what} type"), cur, what, at)
        sub: GGUFValueType | None = None
        count = 1
        if vtype == GGUFValueType.ARRAY:
            at = cur.pos
            sub = _value_type(cur.u32(f"{what} array type"), cur, what, at)
            if sub == GGUFValueType.ARRAY:
                raise _err(path, f"{what} at offset {start} is an array of arrays, which llama.cpp cannot read")
            count = cur.u64(f"{what} array length")
            min_elem = 8 if sub == GGUFValueType.STRING else _SIZE[sub]
            if count * min_elem > size - cur.pos:
                raise _err(
                    path,
                    f"{what} at offset {start}: array of {count} {sub.name.lower()} cannot fit in the "
                    f"{size - cur.pos} bytes left in the file",
                )
            value_offset = cur.pos
            value = _read_array_values(cur, sub, count, what, decode=count <= DECODE_ARRAY_LIMIT)
        elif vtype == GGUFValueType.STRING:
            value_offset = cur.pos
            value = cur.raw_string(f"{what} value").decode("utf-8", "surrogateescape")
        else:
            value_offset = cur.pos
            value = _read_scalar(cur, vtype, f"{what} value")
        kv[key] = KeyValue(key, vtype, value, sub, count, start, value_offset, cur.pos)

    alignment = DEFAULT_ALIGNMENT
    if KEY_ALIGNMENT in kv:
        a = kv[KEY_ALIGNMENT]
        if a.type != GGUFValueType.UINT32:
            raise _err(path, f"key {KEY_ALIGNMENT!r} must be uint32, not {a.type.name.lower()} (offset {a.offset})")
        alignment = int(a.value)
        if alignment == 0 or alignment & (alignment - 1) or alignment > MAX_ALIGNMENT:
            raise _err(path, f"{KEY_ALIGNMENT} = {alignment} is not a power of two up to 1 GiB (offset {a.offset})")
    _check_split_keys(path, kv)

    records: list[tuple[str, GGMLQuantizationType, tuple[int, ...], int, int, int, int]] = []
    names: set[str] = set()
    for i in range(n_tensors):
        start = cur.pos
        raw = cur.raw_string(f"tensor #{i} name", 1 << 16)
        if len(raw) > MAX_TENSOR_NAME:
            raise _err(path, f"tensor #{i} name at offset {start} is {len(raw)} bytes long (llama.cpp allows {MAX_TENSOR_NAME})")
        name = raw.decode("utf-8", "surrogateescape")
        if not name:
            raise _err(path, f"tensor #{i} at offset {start} has an empty name")
        if name in names:
            raise _err(path, f"duplicate tensor name {_q(name)} (tensor #{i} at offset {start})")
        names.add(name)
        what = f"tensor {_q(name)} (#{i}, offset {start})"
        n_dims = cur.u32(f"{what} dimension count")
        if not 1 <= n_dims <= MAX_DIMS:
            raise _err(path, f"{what} has {n_dims} dimensions (must be 1 to {MAX_DIMS})")
        cur.need(8 * n_dims, f"{what} shape")
        shape = struct.unpack_from(f"<{n_dims}q", cur.buf, cur.pos)
        cur.pos += 8 * n_dims
        n_elements = 1
        for d, ne in enumerate(shape):
            if ne <= 0:
                raise _err(path, f"{what} dimension {d} is {ne} (must be positive)")
            n_elements *= ne
        if n_elements >= 1 << 63:
            raise _err(path, f"{what} shape {list(shape)} has more than 2^63 elements")
        code = cur.u32(f"{what} type")
        try:
            ttype = GGMLQuantizationType(code)
            block, type_size = GGML_QUANT_SIZES[ttype]
        except (ValueError, KeyError):
            raise _err(path, f"{what} has unknown tensor type {code}") from None
        if shape[0] % block:
            raise _err(
                path,
                f"{what} of type {ttype.name} has rows of {shape[0]} elements, not a multiple of its block size {block}",
            )
        nbytes = n_elements // block * type_size
        offset = cur.u64(f"{what} data offset")
        records.append((name, ttype, tuple(int(x) for x in shape), n_elements, nbytes, offset, start))
    tensor_info_end = cur.pos

    data_offset = -(-tensor_info_end // alignment) * alignment
    if records and data_offset > size:
        raise _err(path, f"data section would start at offset {data_offset}, past the end of the {size}-byte file")
    tensors: list[TensorRecord] = []
    expected = 0
    prev: TensorRecord | None = None
    for name, ttype, shape, n_elements, nbytes, offset, info_offset in records:
        what = f"tensor {_q(name)} (info at offset {info_offset})"
        if offset % alignment:
            raise _err(path, f"{what} data offset {offset} is not a multiple of the alignment {alignment}")
        if offset < expected and prev is not None:
            raise _err(
                path,
                f"{what} data at offset {offset} overlaps tensor {_q(prev.name)} "
                f"(which ends at {prev.offset + prev.nbytes})",
            )
        if offset != expected:
            raise _err(
                path,
                f"{what} data offset is {offset}, expected {expected}: tensors must be stored in order, "
                f"each padded to {alignment} bytes",
            )
        end = data_offset + offset + nbytes
        if end > size:
            raise _err(
                path,
                f"{what} data (bytes {data_offset + offset}..{end}, {nbytes} bytes of {ttype.name}) extends past "
                f"the end of the {size}-byte file: the file is truncated",
            )
        rec = TensorRecord(name, ttype, shape, n_elements, nbytes, offset, info_offset)
        tensors.append(rec)
        prev = rec
        expected = offset + -(-nbytes // alignment) * alignment
    return GGUFHeader(path, size, version, alignment, kv, tensors, tensor_info_end, data_offset)


def _check_split_keys(path: Path, kv: dict[str, KeyValue]) -> None:
    want = {KEY_SPLIT_NO: GGUFValueType.UINT16, KEY_SPLIT_COUNT: GGUFValueType.UINT16, KEY_SPLIT_TENSORS: GGUFValueType.INT32}
    for key, vtype in want.items():
        e = kv.get(key)
        if e is not None and e.type != vtype:
            raise _err(path, f"key {key!r} must be {vtype.name.lower()}, not {e.type.name.lower()} (offset {e.offset})")
    count = kv.get(KEY_SPLIT_COUNT)
    if count is None or count.value == 0:
        return
    no = kv.get(KEY_SPLIT_NO)
    total = kv.get(KEY_SPLIT_TENSORS)
    if no is None:
        raise _err(path, f"split.count is {count.value} but split.no is missing (offset {count.offset})")
    if no.value >= count.value:
        raise _err(path, f"split.no = {no.value} but split.count = {count.value} (offset {no.offset})")
    if total is None:
        raise _err(path, f"split.count is {count.value} but split.tensors.count is missing")
    if total.value < 0:
        raise _err(path, f"split.tensors.count = {total.value} is negative (offset {total.offset})")


@contextmanager
def _mapped(path: Path) -> Iterator[tuple[Any, int]]:
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise _err(path, "no such file") from None
    except IsADirectoryError:
        raise _err(path, "is a directory, not a GGUF file") from None
    except OSError as e:
        raise _err(path, f"cannot open: {e.strerror or e}") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise _err(path, "the file is empty")
        try:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:
            raise _err(path, f"cannot map the file: {e}") from None
        try:
            yield mm, size
        finally:
            mm.close()


_CACHE: dict[str, GGUFHeader] = {}
_CACHE_MAX = 16


def _stat_key(path: Path) -> tuple[int, int, int]:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise _err(path, "no such file") from None
    except OSError as e:
        raise _err(path, f"cannot read: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise _err(path, "is not a regular file")
    return (st.st_size, st.st_mtime_ns, st.st_ino)


def read_header(path: str | os.PathLike[str]) -> GGUFHeader:
    """Parse and check one GGUF file's header, key/value and tensor tables.

    Raises :class:`InvalidFileError` naming the file and what is wrong. Results
    are cached per (path, size, mtime, inode), so checking a model before
    every load is free after the first time.
    """
    p = Path(path)
    if p.is_dir():
        raise _err(p, "is a directory, not a GGUF file")
    key = str(p.resolve())
    stat_key = _stat_key(p)
    hit = _CACHE.get(key)
    if hit is not None and hit.stat_key == stat_key:
        if hit.path != p:
            hit = GGUFHeader(**{**hit.__dict__, "path": p})
        return hit
    with _mapped(p) as (mm, size):
        header = _parse(mm, size, p)
    header.stat_key = stat_key
    if len(_CACHE) >= _CACHE_MAX:
        _CACHE.pop(next(iter(_CACHE)))
    _CACHE[key] = header
    return header


def read_array(header: GGUFHeader, key: str) -> list[Any]:
    """The full value of an array key (vocabularies are not decoded by
    :func:`read_header`). Re-reads the file; fails cleanly if it changed."""
    kv = header.kv[key]
    if not kv.is_array:
        raise ValueError(f"{key} is not an array")
    if kv.value is not None:
        return list(kv.value)
    assert kv.sub_type is not None
    with _mapped(header.path) as (mm, size):
        if size != header.file_size:
            raise _err(header.path, "the file changed while being read")
        cur = _Cursor(mm, size, header.path)
        cur.pos = kv.value_offset
        out = _read_array_values(cur, kv.sub_type, kv.count, f"key {key!r}", decode=True)
        return list(out)


def read_raw(header: GGUFHeader, kv: KeyValue) -> bytes:
    """The stored bytes of a value (for arrays: the elements, without the
    type and length fields). The bounds were checked by :func:`read_header`."""
    with _mapped(header.path) as (mm, size):
        if size != header.file_size:
            raise _err(header.path, "the file changed while being read")
        return bytes(mm[kv.value_offset : kv.end])


def check_shards(headers: list[GGUFHeader]) -> None:
    """Cross-shard checks: split.no/split.count/split.tensors.count agree with
    the list of files, tensor names are unique across shards."""
    n = len(headers)
    first = headers[0]
    count = first.split_count()
    if n == 1:
        if count > 1:
            raise _err(first.path, f"is shard {first.get(KEY_SPLIT_NO, 0) + 1} of {count}: open the whole set of {count} files")
        return
    for i, h in enumerate(headers):
        c = h.split_count()
        if c != n:
            raise _err(h.path, f"split.count is {c} but the model has {n} shard files (shard {i + 1})")
        no = h.get(KEY_SPLIT_NO)
        if no != i:
            raise _err(h.path, f"split.no is {no} but this file is shard {i + 1} of {n} (split.no should be {i})")
    total = sum(len(h.tensors) for h in headers)
    seen: dict[str, int] = {}
    for i, h in enumerate(headers):
        tc = h.get(KEY_SPLIT_TENSORS)
        if tc != total:
            raise _err(h.path, f"split.tensors.count is {tc} but the {n} shards hold {total} tensors")
        for t in h.tensors:
            if t.name in seen:
                raise _err(h.path, f"tensor {_q(t.name)} is also in shard {seen[t.name] + 1} ({headers[seen[t.name]].path})")
            seen[t.name] = i
