"""Llama (1, 2, 3.x): q/k rows permuted to GGML's rotary layout; Llama 3.x
rope scaling written as the ``rope_freqs`` tensor llama.cpp multiplies in."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import gguf
import numpy as np

from ember.convert.base import Model, Planned, lazy, permute_qk
from ember.convert.source import TensorRef


class LlamaModel(Model):
    gguf_arch = gguf.MODEL_ARCH.LLAMA

    def modify(self, name: str, ref: TensorRef) -> Iterable[Planned]:
        if name.endswith(("q_proj.weight", "q_proj.bias")):
            n_head, n_kv = self.n_head, self.n_head
        elif name.endswith(("k_proj.weight", "k_proj.bias")):
            n_head, n_kv = self.n_head, self.n_head_kv
        else:
            yield from super().modify(name, ref)
            return
        yield Planned(self.map_name(name), ref.shape, ref.dtype, lazy(lambda a: permute_qk(a, n_head, n_kv), ref))

    def extra_tensors(self) -> Iterable[Planned]:
        rp = self.rope_params()
        if str(rp.get("rope_type", "")).lower() != "llama3":
            return
        factors = llama3_rope_factors(rp, self.head_dim)
        yield Planned(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", factors.shape, np.dtype(np.float32), lambda: factors)

    def set_parameters(self, w: gguf.GGUFWriter) -> None:
        super().set_parameters(w)
        w.add_vocab_size(int(self.hp("vocab_size")))
        w.add_rope_dimension_count(self.head_dim)


def llama3_rope_factors(rp: dict[str, Any], dim: int) -> np.ndarray[Any, Any]:
    """Per-frequency divisors of Llama 3.1+ rope scaling (transformers' _compute_llama3_parameters)."""
    base = float(rp.get("rope_theta", 10000.0))
    factor = float(rp.get("factor", 8.0))
    low = float(rp.get("low_freq_factor", 1.0))
    high = float(rp.get("high_freq_factor", 4.0))
    old_ctx = float(rp.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    f32 = np.float32
    # float32 arithmetic throughout, as transformers (and llama.cpp's converter) compute it
    freqs = f32(1.0) / (f32(base) ** (np.arange(0, dim, 2, dtype=np.float32) / f32(dim)))
    out = []
    for f in freqs:
        wavelen = f32(2 * math.pi) / f
        if wavelen < high_wavelen:
            out.append(f32(1.0))
        elif wavelen > low_wavelen:
            out.append(f32(factor))
        else:
            smooth = (f32(old_ctx) / wavelen - f32(low)) / (f32(high) - f32(low))
            out.append(f32(1.0) / ((f32(1.0) - smooth) / f32(factor) + smooth))
    return np.asarray(out, dtype=np.float32)
