"""The call into llama.cpp's ``llama_model_quantize``: its parameters filled
from Python values, the call run in a worker thread, and its log parsed for
progress, the per-tensor plan and the reason it failed (llama.cpp logs one
line per tensor; there is no callback)."""

from __future__ import annotations

import ctypes
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import llama_cpp as lc
import numpy as np

from ember.engine import llama as engine_llama
from ember.errors import InvalidFileError, QuantizationError
from ember.ggml_types import GGML_TYPE_COUNT
from ember.gguf import validate_model
from ember.progress import ProgressCallback
from ember.quantize.imatrix import ImportanceMatrix
from ember.quantize.quant_types import QUANT_TYPES, parse_ggml_type


def validate_source(src: Path) -> list[Path]:
    """Validate the whole model (every shard) before llama.cpp opens it;
    return its shards, first one first (llama.cpp wants the first)."""
    if not src.exists():
        raise InvalidFileError(f"{src}: no such file")
    if src.is_dir():
        raise InvalidFileError(f"{src}: is a folder; give the .gguf file (the first shard of a split model)")
    return [Path(p) for p in validate_model(src)] or [src]


@dataclass
class QuantizeParams:
    """A filled ``llama_model_quantize_params`` plus the buffers it points to
    (kept alive until llama.cpp returns)."""

    params: Any
    keep: list[Any]


def build_params(
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
) -> QuantizeParams:
    p = lc.llama_model_quantize_default_params()
    p.ftype = QUANT_TYPES[qtype].ftype
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
    return QuantizeParams(p, keep)


# "[  12/  75] blk.1.attn_q.weight - [  256,   256,     1,     1], type =    f16, " then "converting to q4_K .. size = ..."
# when quantizing, or in a dry run "size = 0.12 MiB -> 0.04 MiB (q4_K)" (the target) or "size = 0.12 MiB" (unchanged).
_TENSOR_LINE = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]\s+(\S+)\s+-\s+\[([\d,\s]+)\],\s+type\s*=\s*(\S+),(.*)$")
_TARGET = re.compile(r"\(\s*(\w+)\s*\)\s*$")


@dataclass
class TensorLine:
    """One tensor as llama.cpp's quantize log reports it."""

    index: int  # 1-based
    total: int
    name: str
    shape: tuple[int, ...]  # ggml order (ne0 first), trailing 1s dropped
    current_type: str  # upper case, as gguf-py names types
    target_type: str


def _parse_tensor_line(line: str) -> TensorLine | None:
    m = _TENSOR_LINE.match(line.strip())
    if not m:
        return None
    shape = tuple(int(x) for x in m.group(4).split(",") if x.strip())
    while len(shape) > 1 and shape[-1] == 1:
        shape = shape[:-1]
    current = m.group(5).upper()
    t = _TARGET.search(m.group(6))
    target = t.group(1).upper() if t and "->" in m.group(6) else current
    return TensorLine(int(m.group(1)), int(m.group(2)), m.group(3), shape, current, target)


@dataclass
class QuantizeLog:
    """llama.cpp's quantize log, line by line: tensor progress, the tensors
    it reported, and its reason for failing."""

    lines: list[str] = field(default_factory=list)
    tensors: list[TensorLine] = field(default_factory=list)
    _partial: str = field(default="", repr=False)  # text after the last newline

    @property
    def done(self) -> int:
        return self.tensors[-1].index - 1 if self.tensors else 0  # the last one is under way

    @property
    def total(self) -> int:
        return self.tensors[-1].total if self.tensors else 0

    def feed(self, text: str) -> None:
        self._partial += text
        while "\n" in self._partial:
            line, self._partial = self._partial.split("\n", 1)
            self._add(line)

    def flush(self) -> None:
        if self._partial:
            self._add(self._partial)
            self._partial = ""

    def _add(self, line: str) -> None:
        self.lines.append(line)
        tensor = _parse_tensor_line(line)
        if tensor is not None:
            self.tensors.append(tensor)

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


def run_quantize(src: Path, dst: str, params: QuantizeParams, progress: ProgressCallback | None, label: str) -> QuantizeLog:
    """Run llama_model_quantize in a worker thread; its log lines (captured for
    that thread only, so a server's log is untouched) give progress and errors."""
    engine_llama.ensure_backend()
    log = QuantizeLog()
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
            log.feed(text)
        seen = n
        if progress is not None and log.total:
            progress(label, log.done, log.total)
        if not alive:
            break
        worker.join(0.1)
    log.flush()
    if progress is not None and log.total and result and result[0] == 0:
        progress(label, log.total, log.total)
    if not result or result[0] != 0:
        raise QuantizationError(_explain_failure(src, log))
    return log


def _explain_failure(src: Path, log: QuantizeLog) -> str:
    reason = log.error() or "llama.cpp gave no reason"
    if "requires an imatrix" in reason or "Missing importance matrix" in reason:
        tensor = ""
        for line in log.lines:
            if "offending tensor:" in line:
                tensor = " (first tensor: " + line.split("offending tensor:", 1)[1].strip() + ")"
        return (
            f"{src}: this quantization type needs an importance matrix{tensor}; "
            "pass --imatrix FILE (make one with `ember imatrix MODEL --file TEXT -o FILE`), or choose a type that does not need one"
        )
    if "requantizing from type" in reason:
        return f"{src}: {reason}: the model is already quantized; pass --allow-requantize (quality suffers) or start from an F16/F32 model"
    return f"{src}: llama.cpp could not quantize: {reason}"
