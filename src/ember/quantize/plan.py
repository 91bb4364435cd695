"""What a quantization would do, from llama.cpp's own dry run: one target
type per tensor (nothing written, tensor data not read), and the sizes."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ember.errors import QuantizationError
from ember.ggml_types import find_ggml_type
from ember.quantize.imatrix import ImportanceMatrix
from ember.quantize.llamacpp import build_params, run_quantize, validate_source
from ember.quantize.quant_types import parse_quant_type


def tensor_bytes(shape: tuple[int, ...], type_name: str) -> int:
    """Bytes of a tensor of that shape and ggml type (0 for a type ggml lacks)."""
    t = find_ggml_type(type_name)
    return t.nbytes(math.prod(shape)) if t else 0


@dataclass
class TensorPlan:
    name: str
    shape: tuple[int, ...]  # ggml order (ne0 first)
    current_type: str
    target_type: str

    @property
    def current_bytes(self) -> int:
        return tensor_bytes(self.shape, self.current_type)

    @property
    def target_bytes(self) -> int:
        return tensor_bytes(self.shape, self.target_type)


@dataclass
class QuantPlan:
    """What llama.cpp would do (its own dry run): one type per tensor."""

    qtype: str
    tensors: list[TensorPlan]
    requires_imatrix: bool

    @property
    def n_elements(self) -> int:
        return sum(math.prod(t.shape) for t in self.tensors)

    @property
    def source_bytes(self) -> int:
        """Tensor data of the source as it is."""
        return sum(t.current_bytes for t in self.tensors)

    @property
    def tensor_bytes(self) -> int:
        return sum(t.target_bytes for t in self.tensors)

    @property
    def bits_per_weight(self) -> float:
        return self.tensor_bytes * 8 / max(1, self.n_elements)

    def output_file_bytes(self, source_file_bytes: int) -> int:
        """The planned tensors plus the source's metadata and alignment
        padding (llama.cpp copies the metadata unchanged)."""
        return self.tensor_bytes + max(0, source_file_bytes - self.source_bytes)


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
    first = validate_source(Path(src))[0]  # llama.cpp wants the first shard
    im = None
    if has_imatrix:
        # A tiny placeholder entry only flips llama.cpp's "has imatrix" switch,
        # which changes a few mix choices (IQ3_XXS, IQ4_NL/XS, Q4_0/Q5_0).
        im = ImportanceMatrix(Path("plan"), {"__ember_plan__": np.ones(1, dtype=np.float32)})
    params = build_params(
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
    log = run_quantize(first, "", params, None, "")
    if not log.tensors:
        raise QuantizationError(f"{first}: llama.cpp's dry run listed no tensors")
    tensors = [TensorPlan(t.name, t.shape, t.current_type, t.target_type) for t in log.tensors]
    requires = any("will require an imatrix" in line for line in log.lines)
    return QuantPlan(qtype, tensors, requires)


def model_file_size_estimate(src: str | os.PathLike[str], plan: QuantPlan) -> int:
    """The size of the file ``plan`` would write from ``src`` (all shards)."""
    return plan.output_file_bytes(sum(p.stat().st_size for p in validate_source(Path(src))))
