"""Baichuan / Baichuan2: q, k, v packed in ``W_pack`` (split and q/k permuted
here). Baichuan2 uses a NormHead: its lm_head rows are L2-normalised at run
time, so the stored weights must be normalised before conversion (llama.cpp's
converter forgets this and the model talks nonsense). Detected from the
Baichuan2 vocabulary size (125696) or a ``norm_head`` config flag. The 13B
models use ALiBi instead of rope; llama.cpp picks that from the layer count."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import gguf
import numpy as np

from ember.convert.base import Model, Planned, check_divisible, lazy, permute_qk
from ember.convert.source import TensorRef, to_float32
from ember.errors import ConversionError

BAICHUAN2_VOCAB = 125696


def normalize_rows(a: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """NormHead: each output row divided by its L2 norm (as torch's F.normalize, eps 1e-12)."""
    x = to_float32(a).astype(np.float32, copy=True)
    norms = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64)).astype(np.float32)
    x /= np.maximum(norms, np.float32(1e-12))[:, None]
    return x


class BaichuanModel(Model):
    gguf_arch = gguf.MODEL_ARCH.BAICHUAN

    @property
    def norm_head(self) -> bool:
        flag = self.hparams.get("norm_head")
        if flag is not None:
            return bool(flag)
        return int(self.hparams.get("vocab_size", 0)) == BAICHUAN2_VOCAB

    def modify(self, name: str, ref: TensorRef) -> Iterable[Planned]:
        if name.endswith("self_attn.W_pack.weight"):
            n_embd = int(self.hp("hidden_size"))
            check_divisible(self, "hidden_size / num_attention_heads", n_embd, self.n_head)
            if len(ref.shape) != 2 or ref.shape[0] != 3 * n_embd:
                raise ConversionError(f"{ref.file}: {name} has shape {list(ref.shape)}, expected {[3 * n_embd, n_embd]} from hidden_size {n_embd} in config.json; the config does not match the weights")
            bid = int(name.split(".")[2])
            n_head = self.n_head
            fmt = gguf.TENSOR_NAMES
            parts = (
                (gguf.MODEL_TENSOR.ATTN_Q, 0, True),
                (gguf.MODEL_TENSOR.ATTN_K, 1, True),
                (gguf.MODEL_TENSOR.ATTN_V, 2, False),
            )
            for key, i, perm in parts:

                def load(i: int = i, perm: bool = perm) -> np.ndarray[Any, Any]:
                    w = ref.load()[i * n_embd : (i + 1) * n_embd]
                    return permute_qk(w, n_head, n_head) if perm else np.ascontiguousarray(w)

                yield Planned(fmt[key].format(bid=bid) + ".weight", (n_embd, ref.shape[1]), ref.dtype, load)
        elif name == "lm_head.weight" and self.norm_head:
            yield Planned(self.map_name(name), ref.shape, np.dtype(np.float32), lazy(normalize_rows, ref))
        else:
            yield from super().modify(name, ref)

    def set_parameters(self, w: gguf.GGUFWriter) -> None:
        super().set_parameters(w)
        w.add_tensor_data_layout("Meta AI original pth")
        w.add_rope_dimension_count(self.head_dim)
        if self.hparams.get("model_max_length") and not self.hparams.get("max_position_embeddings"):
            w.add_context_length(int(self.hparams["model_max_length"]))
