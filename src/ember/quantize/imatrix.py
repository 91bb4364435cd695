"""Importance matrix files: read llama-imatrix's GGUF and legacy ``.dat``
formats (normalised the way llama-quantize does it), write the GGUF one."""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter

from ember.errors import InvalidFileError
from ember.fsutil import atomic_path


@dataclass
class ImportanceMatrix:
    """Per-tensor importance weights as llama.cpp's quantizer expects them
    (sums of squared activations divided by their counts)."""

    path: Path
    data: dict[str, Any]  # name -> float32 numpy array
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0


def load_imatrix(path: str | os.PathLike[str]) -> ImportanceMatrix:
    """Read an importance matrix written by llama-imatrix: the GGUF format
    (``NAME.in_sum2`` and ``NAME.counts`` tensors) or the legacy ``.dat`` one."""
    path = Path(path)
    if not path.is_file():
        raise InvalidFileError(f"{path}: importance matrix file not found")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return _load_gguf(path)
    return _load_legacy(path)


def _load_gguf(path: Path) -> ImportanceMatrix:
    try:
        reader = GGUFReader(path)
    except Exception as e:  # noqa: BLE001 - gguf-py raises many kinds
        raise InvalidFileError(f"{path}: not a readable imatrix GGUF ({e})") from None

    def field_value(key: str) -> Any:
        fld = reader.get_field(key)
        return None if fld is None else fld.contents()

    datasets = field_value("imatrix.datasets")
    chunk_count = field_value("imatrix.chunk_count")
    chunk_size = field_value("imatrix.chunk_size")
    if datasets is None or chunk_count is None or chunk_size is None:
        raise InvalidFileError(
            f"{path}: imatrix metadata missing (imatrix.datasets, imatrix.chunk_count, imatrix.chunk_size); "
            "make it with llama-imatrix"
        )
    sums: dict[str, Any] = {}
    counts: dict[str, Any] = {}
    for t in reader.tensors:
        if t.tensor_type != GGMLQuantizationType.F32:
            raise InvalidFileError(f"{path}: imatrix tensor {t.name} must be F32, not {t.tensor_type.name}")
        if t.name.endswith(".in_sum2"):
            sums[t.name[: -len(".in_sum2")]] = np.asarray(t.data, dtype=np.float32).reshape(-1)
        elif t.name.endswith(".counts"):
            counts[t.name[: -len(".counts")]] = np.asarray(t.data, dtype=np.float32).reshape(-1)
    if not sums:
        raise InvalidFileError(f"{path}: the imatrix has no entries")
    data: dict[str, Any] = {}
    for name in sorted(set(sums) | set(counts)):
        if name not in sums or name not in counts:
            raise InvalidFileError(f"{path}: imatrix entry {name} has sums without counts or counts without sums")
        s, c = sums[name], np.rint(counts[name])
        ne0 = s.size // max(1, c.size)
        if ne0 * c.size != s.size:
            raise InvalidFileError(f"{path}: imatrix entry {name}: {s.size} sums do not split into {c.size} counts")
        per = s.reshape(c.size, ne0)
        out = np.ones_like(per)
        ok = c > 0
        out[ok] = per[ok] / c[ok][:, None]
        data[name] = np.ascontiguousarray(out.reshape(-1), dtype=np.float32)
    return ImportanceMatrix(path, data, [str(d) for d in (datasets or [])], int(chunk_count))


def _load_legacy(path: Path) -> ImportanceMatrix:
    raw = path.read_bytes()
    pos = 0

    def take(fmt: str) -> Any:
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(raw):
            raise InvalidFileError(f"{path}: truncated legacy imatrix (at byte {pos}); not an imatrix file?")
        value = struct.unpack_from(fmt, raw, pos)
        pos += size
        return value[0] if len(value) == 1 else value

    n_entries = take("<i")
    if n_entries < 1 or n_entries > 1_000_000:
        raise InvalidFileError(f"{path}: not an imatrix file (neither GGUF nor llama-imatrix .dat)")
    data: dict[str, Any] = {}
    for i in range(n_entries):
        length = take("<i")
        if length < 0 or pos + length > len(raw):
            raise InvalidFileError(f"{path}: bad name in legacy imatrix entry {i + 1}")
        name = raw[pos : pos + length].decode("utf-8", "replace")
        pos += length
        ncall, nval = take("<i"), take("<i")
        if nval < 1 or pos + 4 * nval > len(raw):
            raise InvalidFileError(f"{path}: bad value count in legacy imatrix entry {name}")
        values = np.frombuffer(raw, dtype="<f4", count=nval, offset=pos).astype(np.float32)
        pos += 4 * nval
        data[name] = values / ncall if ncall > 0 else values.copy()
    datasets: list[str] = []
    chunk_count = 0
    if pos + 4 <= len(raw):
        chunk_count = take("<i")
        if pos + 4 <= len(raw):
            length = take("<i")
            if 0 < length <= len(raw) - pos:
                datasets.append(raw[pos : pos + length].decode("utf-8", "replace"))
    return ImportanceMatrix(path, data, datasets, chunk_count)


def write_imatrix(out: Path, sums: dict[str, Any], counts: dict[str, int], dataset: str, n_chunks: int, n_ctx: int) -> None:
    """Write sums of squared activations and token counts per weight in
    llama-imatrix's GGUF format (atomically)."""
    with atomic_path(out) as tmp:
        w = GGUFWriter(str(tmp), "imatrix")
        w.add_type("imatrix")
        w.add_array("imatrix.datasets", [dataset])
        w.add_uint32("imatrix.chunk_count", n_chunks)
        w.add_uint32("imatrix.chunk_size", n_ctx)
        for name in sorted(sums):
            w.add_tensor(name + ".in_sum2", sums[name].astype(np.float32).reshape(1, -1))
            w.add_tensor(name + ".counts", np.array([[float(counts[name])]], dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
