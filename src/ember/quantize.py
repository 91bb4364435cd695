"""Quantize GGUF models through llama.cpp's own ``llama_model_quantize``.

Why through llama.cpp: the K-quant mixes (which tensor gets which type) and
the quantization kernels live in llama.cpp; calling the library gives files
identical to what its ``llama-quantize`` tool writes, for every type it knows.

This module adds what the C call lacks: type names with aliases and a clear
error for bad ones, an importance matrix loaded in Python (GGUF or legacy
``.dat``) and handed over as llama.cpp's ``llama_model_imatrix_data`` array,
tensor-type overrides, atomic output (llama.cpp writes to a temporary file in
the destination folder that is renamed when it is complete), progress by
tensor count (llama.cpp logs one line per tensor; there is no callback), and
size planning through llama.cpp's dry run.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import struct
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ember.errors import InvalidFileError, QuantizationError
from ember.progress import ProgressCallback

# ---------------------------------------------------------------------------
# Types
# ---------------------------------------------------------------------------

# ggml tensor types usable as quantization targets: name -> (ggml_type id,
# elements per block, bytes per block). Ids and block layouts are ggml's
# (ggml.h / ggml-common.h of the llama.cpp vendored by llama-cpp-python 0.3.36).
GGML_TYPES: dict[str, tuple[int, int, int]] = {
    "F32": (0, 1, 4),
    "F16": (1, 1, 2),
    "Q4_0": (2, 32, 18),
    "Q4_1": (3, 32, 20),
    "Q5_0": (6, 32, 22),
    "Q5_1": (7, 32, 24),
    "Q8_0": (8, 32, 34),
    "Q2_K": (10, 256, 84),
    "Q3_K": (11, 256, 110),
    "Q4_K": (12, 256, 144),
    "Q5_K": (13, 256, 176),
    "Q6_K": (14, 256, 210),
    "IQ2_XXS": (16, 256, 66),
    "IQ2_XS": (17, 256, 74),
    "IQ3_XXS": (18, 256, 98),
    "IQ1_S": (19, 256, 50),
    "IQ4_NL": (20, 32, 18),
    "IQ3_S": (21, 256, 110),
    "IQ2_S": (22, 256, 82),
    "IQ4_XS": (23, 256, 136),
    "IQ1_M": (29, 256, 56),
    "BF16": (30, 1, 2),
    "TQ1_0": (34, 256, 54),
    "TQ2_0": (35, 256, 66),
    "MXFP4": (39, 32, 17),
    "Q1_0": (41, 128, 18),
    "Q2_0": (42, 64, 18),
}
GGML_TYPE_NAMES: dict[int, str] = {v[0]: k for k, v in GGML_TYPES.items()}
GGML_TYPE_COUNT = 43


def _bpw(ggml_name: str) -> float:
    _, block, size = GGML_TYPES[ggml_name]
    return size * 8 / block


# name -> (llama_ftype, description, approx bits per weight, needs_imatrix).
# Order and ftype ids follow llama.cpp's QUANT_OPTIONS (tools/quantize).
# Bits per weight are those of the mix's main tensor type (the exact figure for
# a given model, mix included, comes from `quantize --list MODEL`).
# needs_imatrix: llama.cpp refuses the type without an importance matrix
# (tensor_requires_imatrix in llama-quant.cpp: IQ1/IQ2/IQ3_XXS tensors, and
# Q2_K tensors inside a Q2_K_S file; IQ3_XS uses IQ3_XXS for attn_q/k and
# most ffn_up/gate tensors).
QUANT_TYPES: dict[str, tuple[int, str, float, bool]] = {
    "Q1_0": (40, "1-bit, group 128", _bpw("Q1_0"), False),
    "Q2_0": (41, "2-bit, group 64", _bpw("Q2_0"), False),
    "Q4_0": (2, "4-bit legacy, one scale per 32", _bpw("Q4_0"), False),
    "Q4_1": (3, "4-bit legacy, scale and min per 32", _bpw("Q4_1"), False),
    "MXFP4_MOE": (38, "MXFP4 expert tensors, Q8_0 elsewhere", _bpw("MXFP4"), False),
    "Q5_0": (8, "5-bit legacy, one scale per 32", _bpw("Q5_0"), False),
    "Q5_1": (9, "5-bit legacy, scale and min per 32", _bpw("Q5_1"), False),
    "IQ2_XXS": (19, "2.06 bpw i-quant", _bpw("IQ2_XXS"), True),
    "IQ2_XS": (20, "2.31 bpw i-quant", _bpw("IQ2_XS"), True),
    "IQ2_S": (28, "2.5 bpw i-quant mix", 2.5, True),
    "IQ2_M": (29, "2.7 bpw i-quant mix", 2.7, True),
    "IQ1_S": (24, "1.56 bpw i-quant", _bpw("IQ1_S"), True),
    "IQ1_M": (31, "1.75 bpw i-quant", _bpw("IQ1_M"), True),
    "TQ1_0": (36, "1.69 bpw ternary", _bpw("TQ1_0"), False),
    "TQ2_0": (37, "2.06 bpw ternary", _bpw("TQ2_0"), False),
    "Q2_K": (10, "2-bit K-quant mix", _bpw("Q2_K"), False),
    "Q2_K_S": (21, "2-bit K-quant, smaller mix", _bpw("Q2_K"), True),
    "IQ3_XXS": (23, "3.06 bpw i-quant", _bpw("IQ3_XXS"), True),
    "IQ3_S": (26, "3.44 bpw i-quant", _bpw("IQ3_S"), False),
    "IQ3_M": (27, "3.66 bpw i-quant mix", 3.66, False),
    "IQ3_XS": (22, "3.3 bpw i-quant mix", 3.3, True),
    "Q3_K_S": (11, "3-bit K-quant, small mix", _bpw("Q3_K"), False),
    "Q3_K_M": (12, "3-bit K-quant, medium mix", _bpw("Q3_K"), False),
    "Q3_K_L": (13, "3-bit K-quant, large mix", _bpw("Q3_K"), False),
    "IQ4_NL": (25, "4.5 bpw non-linear", _bpw("IQ4_NL"), False),
    "IQ4_XS": (30, "4.25 bpw non-linear", _bpw("IQ4_XS"), False),
    "Q4_K_S": (14, "4-bit K-quant, small mix", _bpw("Q4_K"), False),
    "Q4_K_M": (15, "4-bit K-quant, medium mix (a good default)", _bpw("Q4_K"), False),
    "Q5_K_S": (16, "5-bit K-quant, small mix", _bpw("Q5_K"), False),
    "Q5_K_M": (17, "5-bit K-quant, medium mix", _bpw("Q5_K"), False),
    "Q6_K": (18, "6-bit K-quant", _bpw("Q6_K"), False),
    "Q8_0": (7, "8-bit, nearly lossless", _bpw("Q8_0"), False),
    "F16": (1, "16-bit float", 16.0, False),
    "BF16": (32, "16-bit bfloat", 16.0, False),
    "F32": (0, "32-bit float", 32.0, False),
    "COPY": (0, "copy tensors unchanged (re-writes metadata, joins or keeps splits)", 0.0, False),
}

_ALIASES = {
    "Q3_K": "Q3_K_M",  # llama.cpp's own aliases
    "Q4_K": "Q4_K_M",
    "Q5_K": "Q5_K_M",
    "FP16": "F16",
    "FLOAT16": "F16",
    "HALF": "F16",
    "FP32": "F32",
    "FLOAT32": "F32",
    "FLOAT": "F32",
    "BFLOAT16": "BF16",
    "MXFP4": "MXFP4_MOE",
}


def parse_quant_type(name: str) -> str:
    """Canonical quant type name: case-insensitive, ``-`` or ``_``, llama.cpp's
    aliases (Q4_K -> Q4_K_M) and its numeric ftype ids ("15" -> Q4_K_M)."""
    key = str(name).strip().upper().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key in QUANT_TYPES:
        return key
    if key.isdigit():
        for qname, (ftype, *_rest) in QUANT_TYPES.items():
            if ftype == int(key) and qname != "COPY":
                return qname
    raise QuantizationError(
        f"unknown quantization type {name!r}; valid types: {', '.join(QUANT_TYPES)} "
        "(aliases: Q3_K, Q4_K, Q5_K, FP16, FP32)"
    )


def parse_ggml_type(name: str, what: str = "tensor type") -> int:
    """ggml tensor type name (q8_0, Q6_K, f16...) -> ggml_type id."""
    key = str(name).strip().upper().replace("-", "_")
    if key == "FP16":
        key = "F16"
    if key not in GGML_TYPES:
        raise QuantizationError(f"unknown {what} {name!r}; valid: {', '.join(t.lower() for t in GGML_TYPES)}")
    return GGML_TYPES[key][0]


def needs_imatrix(qtype: str) -> bool:
    return QUANT_TYPES[parse_quant_type(qtype)][3]


# ---------------------------------------------------------------------------
# Importance matrix
# ---------------------------------------------------------------------------


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
    (``NAME.in_sum2`` and ``NAME.counts`` tensors) or the legacy ``.dat`` one.
    Normalised the way llama-quantize does it."""
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise InvalidFileError(f"{path}: importance matrix file not found")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return _load_imatrix_gguf(path, np)
    return _load_imatrix_legacy(path, np)


def _load_imatrix_gguf(path: Path, np: Any) -> ImportanceMatrix:
    from gguf import GGUFReader, GGMLQuantizationType

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


def _load_imatrix_legacy(path: Path, np: Any) -> ImportanceMatrix:
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


# ---------------------------------------------------------------------------
# llama.cpp plumbing
# ---------------------------------------------------------------------------

def _ensure_backend() -> None:
    from ember.engine.llama import ensure_backend

    ensure_backend()


@dataclass
class _Params:
    """A filled ``llama_model_quantize_params`` plus the buffers it points to
    (kept alive until llama.cpp returns)."""

    params: Any
    keep: list[Any]


def _build_params(
    qtype: str,
    *,
    imatrix: ImportanceMatrix | None,
    output_tensor_type: str | None,
    token_embedding_type: str | None,
    tensor_types: dict[str, str] | None,
    pure: bool,
    allow_requantize: bool,
    keep_split: bool,
    leave_output_tensor: bool,
    nthread: int,
    dry_run: bool,
) -> _Params:
    import llama_cpp as lc

    p = lc.llama_model_quantize_default_params()
    p.ftype = QUANT_TYPES[qtype][0]
    p.nthread = int(nthread)
    p.only_copy = qtype == "COPY"
    p.pure = bool(pure)
    p.allow_requantize = bool(allow_requantize)
    p.keep_split = bool(keep_split)
    p.quantize_output_tensor = not leave_output_tensor
    p.dry_run = bool(dry_run)
    if output_tensor_type:
        p.output_tensor_type = parse_ggml_type(output_tensor_type, "output tensor type")
    if token_embedding_type:
        p.token_embedding_type = parse_ggml_type(token_embedding_type, "token embedding type")
    keep: list[Any] = []
    if tensor_types:
        arr = (lc.llama_model_tensor_override * (len(tensor_types) + 1))()
        for i, (pattern, tname) in enumerate(tensor_types.items()):
            pattern = str(pattern).lower()  # as llama-quantize does
            if not pattern:
                raise QuantizationError(f"empty tensor name pattern in --tensor-type {pattern}={tname}")
            try:
                re.compile(pattern)
            except re.error as e:
                raise QuantizationError(f"--tensor-type {pattern}={tname}: bad pattern ({e})") from None
            raw = pattern.encode()
            keep.append(raw)
            arr[i].pattern = raw
            arr[i].type = parse_ggml_type(tname)
        arr[len(tensor_types)].pattern = None
        arr[len(tensor_types)].type = GGML_TYPE_COUNT
        keep.append(arr)
        p.tt_overrides = ctypes.cast(arr, ctypes.POINTER(lc.llama_model_tensor_override))
    if imatrix is not None and imatrix.data:
        import numpy as np

        entries = (lc.llama_model_imatrix_data * (len(imatrix.data) + 1))()
        for i, (name, values) in enumerate(imatrix.data.items()):
            values = np.ascontiguousarray(values, dtype=np.float32)
            raw = name.encode()
            keep += [raw, values]
            entries[i].name = raw
            entries[i].data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = values.size
        entries[len(imatrix.data)].name = None
        keep.append(entries)
        p.imatrix = ctypes.cast(entries, ctypes.POINTER(lc.llama_model_imatrix_data))
        # The same provenance keys llama-quantize writes.
        kvs: list[tuple[str, int, Any]] = [("quantize.imatrix.file", 3, str(imatrix.path))]
        if imatrix.datasets:
            kvs.append(("quantize.imatrix.dataset", 3, imatrix.datasets[0]))
        kvs.append(("quantize.imatrix.entries_count", 0, len(imatrix.data)))
        if imatrix.chunk_count > 0:
            kvs.append(("quantize.imatrix.chunks_count", 0, imatrix.chunk_count))
        over = (lc.llama_model_kv_override * (len(kvs) + 1))()
        for i, (key, tag, value) in enumerate(kvs):
            over[i].key = key.encode()[:127]
            over[i].tag = tag
            union: Any = over[i].value  # the ctypes union (typed loosely by llama_cpp)
            if tag == 3:
                union.val_str = str(value).encode()[:127]
            else:
                union.val_i64 = int(value)
        over[len(kvs)].key = b""
        keep.append(over)
        p.kv_overrides = ctypes.cast(over, ctypes.POINTER(lc.llama_model_kv_override))
    return _Params(p, keep)


_TENSOR_LINE = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]\s+(\S+)\s+-\s+\[([\d,\s]+)\],\s+type\s*=\s*(\S+),(.*)$")
_TARGET = re.compile(r"\(\s*(\w+)\s*\)\s*$")


class _LogState:
    """Collects llama.cpp's quantize log: tensor progress, per-tensor plan, errors."""

    def __init__(self) -> None:
        self.buffer = ""
        self.lines: list[str] = []
        self.done = 0
        self.total = 0

    def feed(self, text: str) -> None:
        self.buffer += text
        while "\n" in self.buffer:
            line, self.buffer = self.buffer.split("\n", 1)
            self.lines.append(line)
            m = _TENSOR_LINE.match(line.strip())
            if m:
                self.done, self.total = int(m.group(1)) - 1, int(m.group(2))  # that one is under way

    def flush(self) -> None:
        if self.buffer:
            self.lines.append(self.buffer)
            self.buffer = ""

    def error(self) -> str | None:
        """llama.cpp's reason for failing, without its own prefixes."""
        for line in reversed(self.lines):
            if "failed to quantize:" in line:
                return line.split("failed to quantize:", 1)[1].strip()
        for line in reversed(self.lines):
            low = line.lower()
            if "error" in low or "failed" in low:
                return line.strip()
        return None


def _run_quantize(src: Path, dst: str, params: _Params, progress: ProgressCallback | None, label: str) -> _LogState:
    """Run llama_model_quantize in a worker thread; its log lines (captured for
    that thread only, so a server's log is untouched) give progress and errors."""
    import llama_cpp as lc

    from ember.engine import llama as engine_llama

    _ensure_backend()
    state = _LogState()
    result: list[int] = []
    captured: list[list[str]] = []
    started = threading.Event()

    def work() -> None:
        with engine_llama.capture_log() as lines:
            captured.append(lines)
            started.set()
            result.append(int(lc.llama_model_quantize(str(src).encode(), dst.encode(), ctypes.byref(params.params))))

    worker = threading.Thread(target=work, name="ember-quantize", daemon=True)
    worker.start()
    started.wait()
    seen = 0
    while True:
        alive = worker.is_alive()
        lines = captured[0]
        n = len(lines)
        for text in lines[seen:n]:
            state.feed(text)
        seen = n
        if progress is not None and state.total:
            progress(label, state.done, state.total)
        if not alive:
            break
        worker.join(0.1)
    state.flush()
    if progress is not None and state.total and result and result[0] == 0:
        progress(label, state.total, state.total)
    if not result or result[0] != 0:
        raise QuantizationError(_explain_failure(src, state))
    return state


def _explain_failure(src: Path, state: _LogState) -> str:
    reason = state.error() or "llama.cpp gave no reason"
    if "requires an imatrix" in reason or "Missing importance matrix" in reason:
        tensor = ""
        for line in state.lines:
            if "offending tensor:" in line:
                tensor = " (first tensor: " + line.split("offending tensor:", 1)[1].strip() + ")"
        return (
            f"{src}: this quantization type needs an importance matrix{tensor}; "
            "pass --imatrix FILE (make one with `ember imatrix MODEL --file TEXT -o FILE`), or choose a type that does not need one"
        )
    if "requantizing from type" in reason:
        return f"{src}: {reason}: the model is already quantized; pass --allow-requantize (quality suffers) or start from an F16/F32 model"
    return f"{src}: llama.cpp could not quantize: {reason}"


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------


def _validate_input(src: Path) -> list[Path]:
    """Validate the whole model (every shard) before llama.cpp opens it;
    return its shards, first one first (llama.cpp wants the first)."""
    if not src.exists():
        raise InvalidFileError(f"{src}: no such file")
    if src.is_dir():
        raise InvalidFileError(f"{src}: is a folder; give the .gguf file (the first shard of a split model)")
    from ember.gguf import validate_model

    shards = validate_model(src)
    return [Path(p) for p in shards] or [src]


def _split_name(prefix: str, index: int, count: int) -> str:
    # llama.cpp's llama_split_path: PREFIX-%05d-of-%05d.gguf
    return f"{prefix}-{index + 1:05d}-of-{count:05d}.gguf"


def quantize_model(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    qtype: str,
    *,
    imatrix: str | os.PathLike[str] | ImportanceMatrix | None = None,
    output_tensor_type: str | None = None,
    token_embedding_type: str | None = None,
    tensor_types: dict[str, str] | None = None,
    pure: bool = False,
    allow_requantize: bool = False,
    keep_split: bool = False,
    leave_output_tensor: bool = False,
    nthread: int = 0,
    progress: ProgressCallback | None = None,
) -> list[Path]:
    """Quantize ``src`` (a GGUF, or the first shard of a split one) to ``dst``.

    Returns the written files: ``[dst]``, or with ``keep_split`` and a split
    input one file per shard named like llama.cpp names them
    (``DST-00001-of-0000N.gguf``, where DST is ``dst`` without ``.gguf``).
    Nothing is left under a final name if llama.cpp fails.
    """
    src, dst = Path(src), Path(dst)
    qtype = parse_quant_type(qtype)
    shards = _validate_input(src)
    src, n_shards = shards[0], len(shards)
    if dst.exists() and dst.is_dir():
        raise QuantizationError(f"{dst}: is a folder; give the output file name")
    with contextlib.suppress(OSError):
        if dst.exists() and os.path.samefile(src, dst):
            raise QuantizationError(f"{dst}: input and output are the same file")
    im: ImportanceMatrix | None
    if imatrix is None or isinstance(imatrix, ImportanceMatrix):
        im = imatrix
    else:
        im = load_imatrix(imatrix)
    params = _build_params(
        qtype,
        imatrix=im,
        output_tensor_type=output_tensor_type,
        token_embedding_type=token_embedding_type,
        tensor_types=tensor_types,
        pure=pure,
        allow_requantize=allow_requantize,
        keep_split=keep_split and n_shards > 1,
        leave_output_tensor=leave_output_tensor,
        nthread=nthread,
        dry_run=False,
    )
    label = f"quantizing to {qtype}"
    try:
        return _quantize_to(src, dst, params, progress, label, keep_split and n_shards > 1, n_shards)
    except OSError as e:
        raise QuantizationError(f"{dst}: cannot write the output ({e.strerror or e})") from None


def _quantize_to(
    src: Path, dst: Path, params: _Params, progress: ProgressCallback | None, label: str, keep_split: bool, n_shards: int
) -> list[Path]:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if keep_split:
        final_prefix = str(dst)[: -len(".gguf")] if dst.name.endswith(".gguf") else str(dst)
        tmp_prefix = tempfile.mktemp(prefix=f".{Path(final_prefix).name}.", suffix=".tmp", dir=dst.parent)
        tmp_files = [Path(_split_name(tmp_prefix, i, n_shards)) for i in range(n_shards)]
        finals = [Path(_split_name(final_prefix, i, n_shards)) for i in range(n_shards)]
        try:
            _run_quantize(src, tmp_prefix, params, progress, label)
            for tmp in tmp_files:
                if not tmp.exists():
                    raise QuantizationError(f"{src}: llama.cpp wrote no {tmp.name}")
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
            for tmp, final in zip(tmp_files, finals, strict=True):
                os.replace(tmp, final)
        finally:
            for tmp in tmp_files:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
        return finals
    from ember.fsutil import atomic_path

    with atomic_path(dst) as tmp:
        _run_quantize(src, str(tmp), params, progress, label)
        default_mode(tmp)
    return [dst]


def default_mode(path: Path) -> None:
    """Temporary files are created 0600; give outputs the usual umask mode."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


@dataclass
class TensorPlan:
    name: str
    shape: tuple[int, ...]  # ggml order (ne0 first)
    current_type: str
    target_type: str

    @property
    def target_bytes(self) -> int:
        _, block, size = GGML_TYPES.get(self.target_type.upper(), (0, 1, 0))
        n = 1
        for d in self.shape:
            n *= d
        return n // block * size


@dataclass
class QuantPlan:
    """What llama.cpp would do (its own dry run): one type per tensor."""

    qtype: str
    tensors: list[TensorPlan]
    requires_imatrix: bool

    @property
    def n_elements(self) -> int:
        total = 0
        for t in self.tensors:
            n = 1
            for d in t.shape:
                n *= d
            total += n
        return total

    @property
    def tensor_bytes(self) -> int:
        return sum(t.target_bytes for t in self.tensors)

    @property
    def bits_per_weight(self) -> float:
        return self.tensor_bytes * 8 / max(1, self.n_elements)


def plan_quantization(
    src: str | os.PathLike[str],
    qtype: str,
    *,
    output_tensor_type: str | None = None,
    token_embedding_type: str | None = None,
    tensor_types: dict[str, str] | None = None,
    pure: bool = False,
    leave_output_tensor: bool = False,
    has_imatrix: bool = False,
) -> QuantPlan:
    """Per-tensor target types for ``qtype`` from llama.cpp's own dry run
    (nothing written, tensor data not read), for sizes and checks."""
    qtype = parse_quant_type(qtype)
    src = _validate_input(Path(src))[0]  # llama.cpp wants the first shard
    im = None
    if has_imatrix:
        # A tiny placeholder entry only flips llama.cpp's "has imatrix" switch,
        # which changes a few mix choices (IQ3_XXS, IQ4_NL/XS, Q4_0/Q5_0).
        import numpy as np

        im = ImportanceMatrix(Path("plan"), {"__ember_plan__": np.ones(1, dtype=np.float32)})
    params = _build_params(
        qtype,
        imatrix=im,
        output_tensor_type=output_tensor_type,
        token_embedding_type=token_embedding_type,
        tensor_types=tensor_types,
        pure=pure,
        allow_requantize=True,
        keep_split=False,
        leave_output_tensor=leave_output_tensor,
        nthread=1,
        dry_run=True,
    )
    state = _run_quantize(src, "", params, None, "")
    tensors: list[TensorPlan] = []
    requires = False
    for line in state.lines:
        m = _TENSOR_LINE.match(line.strip())
        if not m:
            if "will require an imatrix" in line:
                requires = True
            continue
        shape = tuple(int(x) for x in m.group(4).split(",") if x.strip())
        while len(shape) > 1 and shape[-1] == 1:
            shape = shape[:-1]
        cur = m.group(5).upper()
        t = _TARGET.search(m.group(6))
        target = t.group(1).upper() if t and "->" in m.group(6) else cur
        tensors.append(TensorPlan(m.group(3), shape, cur, target))
    if not tensors:
        raise QuantizationError(f"{src}: llama.cpp's dry run listed no tensors")
    return QuantPlan(qtype, tensors, requires)


def model_file_size_estimate(src: str | os.PathLike[str], plan: QuantPlan) -> int:
    """Tensor bytes of the plan plus the source's metadata and alignment padding
    (metadata is copied unchanged)."""
    shards = _validate_input(Path(src))
    data_bytes_src = sum(_nbytes(t.shape, t.current_type) for t in plan.tensors)
    overhead = max(0, sum(p.stat().st_size for p in shards) - data_bytes_src)
    return plan.tensor_bytes + overhead


def _nbytes(shape: tuple[int, ...], tname: str) -> int:
    _, block, size = GGML_TYPES.get(tname.upper(), (0, 1, 0))
    n = 1
    for d in shape:
        n *= d
    return n // block * size


# ---------------------------------------------------------------------------
# Recommendation
# ---------------------------------------------------------------------------

# Perplexity increase over F16 that llama.cpp's quantize tool publishes for
# each type (its QUANT_OPTIONS help text: "+0.1754 ppl @ Llama-3-8B"; F16/BF16
# are quoted for Mistral-7B). A typical figure for an 8B model, not a
# measurement of the model at hand: pass measured numbers to do better.
PUBLISHED_PPL_INCREASE: dict[str, float] = {
    "F16": 0.0020, "BF16": -0.0050, "Q8_0": 0.0026, "Q6_K": 0.0217, "Q5_K_M": 0.0569,
    "Q5_K_S": 0.1049, "Q5_1": 0.1062, "Q5_0": 0.1316, "Q4_K_M": 0.1754, "Q4_K_S": 0.2689,
    "Q4_1": 0.4511, "Q4_0": 0.4685, "Q3_K_L": 0.5562, "Q3_K_M": 0.6569, "Q3_K_S": 1.6321,
    "Q2_K_S": 3.1836, "Q2_K": 3.5199,
}
# Highest quality first; imatrix-free types with a published number.
_CANDIDATES = ["F16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q4_K_M", "Q4_K_S", "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K"]


@dataclass
class RecommendRow:
    qtype: str
    weights: int
    kv_cache: int
    compute: int
    fits: bool
    quality: str

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.compute


@dataclass
class Recommendation:
    model: Path
    memory: int
    num_ctx: int
    rows: list[RecommendRow]
    choice: RecommendRow | None
    quality_source: str

    def report_lines(self) -> list[str]:
        def gb(n: int) -> str:
            return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"

        lines = [f"{self.model.name}: memory budget {gb(self.memory)}, context {self.num_ctx} tokens (f16 KV cache)"]
        lines.append(f"{'type':8} {'weights':>10} {'KV cache':>10} {'compute':>10} {'total':>10}  fits  quality")
        for r in self.rows:
            mark = "yes" if r.fits else "no"
            lines.append(f"{r.qtype:8} {gb(r.weights):>10} {gb(r.kv_cache):>10} {gb(r.compute):>10} {gb(r.total):>10}  {mark:4}  {r.quality}")
        if self.choice is None:
            smallest = min(self.rows, key=lambda r: r.total)
            lines.append(
                f"nothing fits: the smallest, {smallest.qtype}, needs {gb(smallest.total)}; "
                "use a smaller --num-ctx, a smaller model, or an imatrix type (IQ2/IQ3) with --imatrix"
            )
        else:
            lines.append(f"recommended: {self.choice.qtype} ({gb(self.choice.total)} of {gb(self.memory)}; quality: {self.choice.quality})")
        lines.append(f"quality numbers: {self.quality_source}")
        lines.append("sizes: weights from llama.cpp's dry run of this model; KV cache and compute buffers are estimates")
        return lines


def _kv_and_compute(src: Path, num_ctx: int) -> tuple[int, int]:
    """Bytes of an f16 KV cache for ``num_ctx`` tokens (every layer full size,
    as Ember's engine allocates it) and an estimate of llama.cpp's compute
    buffers for a 512-token batch."""
    from ember.gguf import read_model

    h = read_model(src)[0]

    def val(key: str, default: Any = None) -> Any:
        v = h.get(key)
        if v is None:
            return default
        if isinstance(v, (list, tuple)):
            v = max(v) if v else default
        return v

    arch = val("general.architecture", "llama")
    n_layer = int(val(f"{arch}.block_count", 0))
    n_embd = int(val(f"{arch}.embedding_length", 0))
    n_head = int(val(f"{arch}.attention.head_count", 1) or 1)
    n_head_kv = int(val(f"{arch}.attention.head_count_kv", n_head) or n_head)
    k_len = int(val(f"{arch}.attention.key_length", n_embd // n_head if n_head else 0))
    v_len = int(val(f"{arch}.attention.value_length", k_len))
    n_ff = int(val(f"{arch}.feed_forward_length", 4 * n_embd) or 4 * n_embd)
    tokens = h.kv.get("tokenizer.ggml.tokens")
    n_vocab = tokens.count if tokens is not None else 32000
    kv = n_layer * num_ctx * n_head_kv * (k_len + v_len) * 2
    ubatch = 512
    # llama.cpp reserves its compute buffer for a full batch of outputs: the
    # logits of 512 tokens dominate for large vocabularies, the feed-forward
    # activations for the rest. Flash attention (on by default on CPUs) never
    # materializes the heads x context attention scores.
    compute = 4 * ubatch * (n_vocab + 3 * n_ff + 4 * n_embd) + 4 * n_vocab
    return kv, compute


def _source_ftype(src: Path) -> int | None:
    from ember.gguf import read_model

    v = read_model(src)[0].get("general.file_type")
    return None if v is None else int(v)


def recommend(
    src: str | os.PathLike[str],
    memory: int,
    *,
    num_ctx: int = 4096,
    quality_file: str | os.PathLike[str] | None = None,
) -> Recommendation:
    """The best-quality quant of ``src`` whose weights, KV cache for
    ``num_ctx`` tokens and compute buffers fit in ``memory`` bytes.

    Quality: measured numbers from ``quality_file`` (JSON written by
    bench/bench_quant_quality.py: {type: {"kld": .., "ppl": ..}}) when given,
    else llama.cpp's published perplexity increases for Llama-3-8B."""
    import json

    src = Path(src)
    shards = _validate_input(src)
    first = shards[0]
    if memory <= 0:
        raise QuantizationError("--memory must be positive, e.g. 8G")
    if num_ctx <= 0:
        raise QuantizationError("--num-ctx must be positive")
    measured: dict[str, dict[str, float]] = {}
    if quality_file is not None:
        qpath = Path(quality_file)
        try:
            data = json.loads(qpath.read_text(encoding="utf-8"))
            measured = {parse_quant_type(k): v for k, v in data.get("types", data).items() if isinstance(v, dict)}
        except (OSError, ValueError, AttributeError) as e:
            raise InvalidFileError(f"{qpath}: not a quality JSON from bench/bench_quant_quality.py ({e})") from None
    candidates = [c for c in _CANDIDATES if not measured or c in measured] if measured else list(_CANDIDATES)
    kv, compute = _kv_and_compute(first, num_ctx)
    src_ftype = _source_ftype(first)
    src_quantized = src_ftype not in (None, 0, 1, 32)
    src_name = next((k for k, v in QUANT_TYPES.items() if v[0] == src_ftype and k != "COPY"), None)
    overhead = max(0, sum(p.stat().st_size for p in shards))
    rows: list[RecommendRow] = []
    for qt in candidates:
        plan = plan_quantization(first, qt)
        data_src = sum(_nbytes(t.shape, t.current_type) for t in plan.tensors)
        weights = plan.tensor_bytes + max(0, overhead - data_src)
        if qt in measured:
            m = measured[qt]
            parts = []
            if "kld" in m:
                parts.append(f"KLD {m['kld']:.4f}")
            if "ppl" in m:
                parts.append(f"PPL {m['ppl']:.3f}")
            if "ppl_base" in m and "ppl" in m:
                parts.append(f"({100 * (m['ppl'] / m['ppl_base'] - 1):+.1f}% vs F16)")
            quality = " ".join(parts) or "measured"
        else:
            quality = f"{PUBLISHED_PPL_INCREASE[qt]:+.4f} PPL @Llama-3-8B" if qt in PUBLISHED_PPL_INCREASE else "n/a"
        if src_quantized:
            # Re-quantizing cannot add back what the source lost: offer only
            # smaller types, and the source's own type as it is.
            if qt == src_name:
                quality += " (the file as it is)"
            elif weights >= data_src + max(0, overhead - data_src):
                continue
            else:
                quality += " + requantization loss (--allow-requantize)"
        total = weights + kv + compute
        rows.append(RecommendRow(qt, weights, kv, compute, total <= memory, quality))
    if not rows:
        raise QuantizationError(f"{src}: no candidate type is smaller than the model as it is")
    choice = next((r for r in rows if r.fits), None)
    source = (
        f"measured on this machine ({quality_file})"
        if measured
        else "llama.cpp's published perplexity increase over F16 for Llama-3-8B (llama-quantize --help)"
    )
    return Recommendation(src, memory, num_ctx, rows, choice, source)


# ---------------------------------------------------------------------------
# Importance matrix from sample text (what llama-imatrix does)
# ---------------------------------------------------------------------------


class _GGMLTensor(ctypes.Structure):
    """``struct ggml_tensor`` of the vendored ggml (ggml.h); the layout is
    checked against ggml's own accessors before any field is trusted."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * 4),
        ("nb", ctypes.c_size_t * 4),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * 16),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * 10),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * 64),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


def _ggml_lib() -> Any:
    from llama_cpp import _ggml

    lib = _ggml.libggml
    lib.ggml_op_name.restype = ctypes.c_char_p
    lib.ggml_op_name.argtypes = [ctypes.c_int]
    lib.ggml_get_name.restype = ctypes.c_char_p
    lib.ggml_get_name.argtypes = [ctypes.c_void_p]
    lib.ggml_nelements.restype = ctypes.c_int64
    lib.ggml_nelements.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_tensor_get.restype = None
    lib.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    return lib


@dataclass
class ImatrixResult:
    path: Path
    n_entries: int
    n_chunks: int
    n_tokens: int


def compute_imatrix(
    model: str | os.PathLike[str],
    text_file: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    n_ctx: int = 512,
    max_chunks: int | None = None,
    threads: int | None = None,
    progress: ProgressCallback | None = None,
) -> ImatrixResult:
    """Write an importance matrix (llama-imatrix's GGUF format) for ``model``
    from sample text: for every matrix multiplication with a ``blk.*`` weight,
    the sum of squared input activations per input column and the number of
    tokens, collected through llama.cpp's eval callback on chunks of
    ``n_ctx`` tokens (BOS first, as llama-imatrix). Dense weights only
    (mixture-of-experts tensors are refused)."""
    import llama_cpp as lc
    import numpy as np

    from ember.engine import load_model

    text_path = Path(text_file)
    if not text_path.is_file():
        raise InvalidFileError(f"{text_path}: no such text file")
    try:
        text = text_path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InvalidFileError(f"{text_path}: not UTF-8 text (byte {e.start})") from None
    lib = _ggml_lib()
    op_mul_mat = next(i for i in range(200) if (lib.ggml_op_name(i) or b"") == b"MUL_MAT")
    op_mul_mat_id = next(i for i in range(200) if (lib.ggml_op_name(i) or b"") == b"MUL_MAT_ID")
    sums: dict[str, Any] = {}
    counts: dict[str, int] = {}
    errors: list[str] = []
    checked = [False]

    def weight_name(ptr: int) -> str:
        name = (lib.ggml_get_name(ptr) or b"").decode("utf-8", "replace")
        if "#" in name:  # backend copies: "CUDA0#blk.0.attn_q.weight#0"
            parts = name.split("#")
            name = parts[1] if len(parts) > 1 else name
        return name

    def on_eval(t_ptr: int, ask: bool, _ud: Any) -> bool:
        try:
            t = _GGMLTensor.from_address(t_ptr)
            if not checked[0]:
                if (lib.ggml_get_name(t_ptr) or b"") != t.name.split(b"\0")[0] or lib.ggml_nelements(t_ptr) != (
                    t.ne[0] * t.ne[1] * t.ne[2] * t.ne[3]
                ):
                    errors.append("ggml_tensor layout does not match this llama.cpp build")
                    return False
                checked[0] = True
            if t.op not in (op_mul_mat, op_mul_mat_id) or not t.src[0] or not t.src[1]:
                return False if ask else True
            wname = weight_name(t.src[0])
            if not wname.startswith("blk."):
                return False if ask else True
            if t.op == op_mul_mat_id:
                errors.append(f"{wname}: mixture-of-experts weights are not supported here; use llama-imatrix")
                return False
            s1 = _GGMLTensor.from_address(t.src[1])
            if ask:
                return bool(s1.ne[1] >= 16 and s1.type == 0)
            w = _GGMLTensor.from_address(t.src[0])
            n_mat = int(w.ne[2] * w.ne[3])
            if n_mat != 1 or s1.ne[2] * s1.ne[3] != 1 or s1.nb[0] != 4:
                errors.append(f"{wname}: batched matrix multiplication is not supported here")
                return False
            ne0, ntok = int(s1.ne[0]), int(s1.ne[1])
            nbytes = int(s1.nb[1]) * (ntok - 1) + 4 * ne0
            buf = np.empty(nbytes // 4 + 1, dtype=np.float32)
            lib.ggml_backend_tensor_get(t.src[1], buf.ctypes.data, 0, nbytes)
            x = np.lib.stride_tricks.as_strided(buf, shape=(ntok, ne0), strides=(int(s1.nb[1]), 4))
            acc = sums.get(wname)
            if acc is None:
                acc = sums[wname] = np.zeros(ne0, dtype=np.float64)
            elif acc.size != ne0:
                errors.append(f"{wname}: inconsistent input size ({acc.size} vs {ne0})")
                return False
            acc += (x.astype(np.float64) ** 2).sum(axis=0)
            counts[wname] = counts.get(wname, 0) + ntok
            return True
        except Exception as e:  # noqa: BLE001 - never let an exception cross into C
            errors.append(f"{type(e).__name__}: {e}")
            return False

    callback = lc.ggml_backend_sched_eval_callback(on_eval)
    m = load_model(model, {"num_thread": threads} if threads else None)
    try:
        tokens = m.tokenize(text, add_special=True, parse_special=False)
        if len(tokens) < n_ctx:
            raise QuantizationError(
                f"{text_path}: the text tokenizes to only {len(tokens)} tokens; an importance matrix with --ctx {n_ctx} needs at least {n_ctx}"
            )
        n_chunks = len(tokens) // n_ctx
        if max_chunks:
            n_chunks = min(n_chunks, max_chunks)
        params = lc.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_ctx
        params.n_ubatch = min(n_ctx, 512)
        params.n_seq_max = 1
        if threads:
            params.n_threads = params.n_threads_batch = threads
        params.cb_eval = callback
        params.cb_eval_user_data = None
        ctx = lc.llama_init_from_model(m.ptr, params)
        if not ctx:
            raise QuantizationError(f"llama.cpp could not create a context of {n_ctx} tokens")
        batch = lc.llama_batch_init(n_ctx, 0, 1)
        try:
            for c in range(n_chunks):
                chunk = list(tokens[c * n_ctx : (c + 1) * n_ctx])
                if m.add_bos:
                    chunk[0] = m.bos_id
                lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
                for i, tok in enumerate(chunk):
                    batch.token[i] = tok
                    batch.pos[i] = i
                    batch.n_seq_id[i] = 1
                    batch.seq_id[i][0] = 0
                    batch.logits[i] = True  # as llama-imatrix: the last layer then sees every token
                batch.n_tokens = n_ctx
                rc = lc.llama_decode(ctx, batch)
                if errors:
                    raise QuantizationError(f"importance matrix: {errors[0]}")
                if rc != 0:
                    raise QuantizationError(f"llama_decode failed ({rc}) while computing the importance matrix")
                if progress:
                    progress("importance matrix", c + 1, n_chunks)
        finally:
            lc.llama_batch_free(batch)
            lc.llama_free(ctx)
    finally:
        m.close()
    if not sums:
        raise QuantizationError("importance matrix: no blk.* matrix multiplication was seen")
    _write_imatrix(Path(output), sums, counts, text_path.name, n_chunks, n_ctx)
    return ImatrixResult(Path(output), len(sums), n_chunks, n_chunks * n_ctx)


def _write_imatrix(out: Path, sums: dict[str, Any], counts: dict[str, int], dataset: str, n_chunks: int, n_ctx: int) -> None:
    import numpy as np
    from gguf import GGUFWriter

    from ember.fsutil import atomic_path

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
        default_mode(tmp)
