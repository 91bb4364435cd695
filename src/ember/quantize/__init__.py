"""Quantize GGUF models through llama.cpp's own ``llama_model_quantize``.

Why through llama.cpp: the K-quant mixes (which tensor gets which type) and
the quantization kernels live in llama.cpp; calling the library gives files
identical to what its ``llama-quantize`` tool writes, for every type it knows.

This package adds what the C call lacks, one module per concern:

- ``quant_types``: type names with aliases and a clear error for bad ones;
- ``imatrix``: importance matrix files (llama-imatrix's GGUF or legacy
  ``.dat``), handed to llama.cpp as its ``llama_model_imatrix_data`` array;
- ``llamacpp``: the call itself, with tensor-type overrides, run in a worker
  thread whose log gives progress by tensor count and the reason for a failure;
- ``write``: ``quantize_model``, atomic output (a temporary file in the
  destination folder, renamed when complete), one file or one per shard;
- ``plan``: per-tensor types and sizes from llama.cpp's dry run;
- ``recommendation``: the best type that fits a memory budget;
- ``imatrix_compute``: an importance matrix from sample text (``ember imatrix``).

The type names load with the package (the CLI, the converter and the registry
check names early); the rest loads llama.cpp, numpy and gguf-py, so it is
imported on first use of one of its names.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ember.quantize.quant_types import (
    QUANT_TYPES,
    QuantType,
    needs_imatrix,
    parse_ggml_type,
    parse_quant_type,
    quant_type_for_ftype,
)

if TYPE_CHECKING:
    from ember.quantize.imatrix import ImportanceMatrix, load_imatrix, write_imatrix
    from ember.quantize.imatrix_compute import ImatrixResult, compute_imatrix
    from ember.quantize.plan import QuantPlan, TensorPlan, model_file_size_estimate, plan_quantization
    from ember.quantize.recommendation import (
        PUBLISHED_PPL_INCREASE,
        Recommendation,
        RecommendRow,
        kv_and_compute,
        recommend,
    )
    from ember.quantize.write import default_mode, quantize_model

# name -> the module (of this package) that defines it, imported on first use.
_LAZY = {
    "ImportanceMatrix": "imatrix",
    "load_imatrix": "imatrix",
    "write_imatrix": "imatrix",
    "ImatrixResult": "imatrix_compute",
    "compute_imatrix": "imatrix_compute",
    "QuantPlan": "plan",
    "TensorPlan": "plan",
    "model_file_size_estimate": "plan",
    "plan_quantization": "plan",
    "PUBLISHED_PPL_INCREASE": "recommendation",
    "Recommendation": "recommendation",
    "RecommendRow": "recommendation",
    "kv_and_compute": "recommendation",
    "recommend": "recommendation",
    "default_mode": "write",
    "quantize_model": "write",
}

__all__ = [
    "PUBLISHED_PPL_INCREASE",
    "QUANT_TYPES",
    "ImatrixResult",
    "ImportanceMatrix",
    "QuantPlan",
    "QuantType",
    "RecommendRow",
    "Recommendation",
    "TensorPlan",
    "compute_imatrix",
    "default_mode",
    "kv_and_compute",
    "load_imatrix",
    "model_file_size_estimate",
    "needs_imatrix",
    "parse_ggml_type",
    "parse_quant_type",
    "plan_quantization",
    "quant_type_for_ftype",
    "quantize_model",
    "recommend",
    "write_imatrix",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ember.quantize' has no attribute {name!r}")
    return getattr(importlib.import_module(f"ember.quantize.{module}"), name)
