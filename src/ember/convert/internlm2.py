"""InternLM2: attention weights packed in one ``wqkv`` tensor, grouped per
key/value head as [q_per_kv query heads, key, value]; split into q, k, v here
and q/k permuted to GGML's rotary layout. Its chat models end turns with
``<|im_end|>``, which becomes the EOS token."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import gguf
import numpy as np

from ember.convert.base import Model, Planned, check_divisible, permute_qk
from ember.convert.source import TensorRef
from ember.errors import ConversionError


class InternLM2Model(Model):
    gguf_arch = gguf.MODEL_ARCH.INTERNLM2

    def modify(self, name: str, ref: TensorRef) -> Iterable[Planned]:
        if not name.endswith("attention.wqkv.weight"):
            yield from super().modify(name, ref)
            return
        n_head, n_kv = self.n_head, self.n_head_kv
        n_embd = int(self.hp("hidden_size"))
        cols = ref.shape[-1]  # n_embd, or the rank for a LoRA B matrix
        check_divisible(self, "num_attention_heads / num_key_value_heads", n_head, n_kv)
        q_per_kv = n_head // n_kv
        head_dim = n_embd // n_head
        rows = n_kv * (q_per_kv + 2) * head_dim
        if len(ref.shape) != 2 or ref.shape[0] != rows:
            raise ConversionError(
                f"{ref.file}: {name} has shape {list(ref.shape)} but config.json (heads {n_head}, kv heads {n_kv}, hidden {n_embd}) needs {[rows, n_embd]}; the config does not match the weights"
            )
        bid = int(name.split(".")[2])
        cache: dict[str, np.ndarray[Any, Any]] = {}

        def part(which: str) -> np.ndarray[Any, Any]:
            if which not in cache:
                cache.clear()
                qkv = ref.load().reshape(n_kv, q_per_kv + 2, head_dim, cols)
                cache["q"] = permute_qk(qkv[:, :q_per_kv].reshape(-1, cols), n_head, n_head)
                cache["k"] = permute_qk(qkv[:, -2].reshape(-1, cols), n_head, n_kv)
                cache["v"] = np.ascontiguousarray(qkv[:, -1].reshape(-1, cols))
            return cache.pop(which)

        fmt = gguf.TENSOR_NAMES
        for which, key, r in (("q", gguf.MODEL_TENSOR.ATTN_Q, n_head), ("k", gguf.MODEL_TENSOR.ATTN_K, n_kv), ("v", gguf.MODEL_TENSOR.ATTN_V, n_kv)):

            def load(which: str = which) -> np.ndarray[Any, Any]:
                return part(which)

            yield Planned(fmt[key].format(bid=bid) + ".weight", (r * head_dim, cols), ref.dtype, load)

    def set_parameters(self, w: gguf.GGUFWriter) -> None:
        super().set_parameters(w)
        w.add_vocab_size(int(self.hp("vocab_size")))
        w.add_rope_dimension_count(self.head_dim)

    def vocab_options(self) -> dict[str, Any]:
        return {"eos_override": "<|im_end|>", "null_piece": "\U0001f409"}
