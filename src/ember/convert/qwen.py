"""Qwen2 / Qwen2.5 (q/k/v biases, BPE) and Qwen3 (per-head q/k RMS norms).
llama.cpp rotates in the HF (neox) layout for these, so no permutation."""

from __future__ import annotations

import gguf

from ember.convert.base import Model


class Qwen2Model(Model):
    gguf_arch = gguf.MODEL_ARCH.QWEN2


class Qwen3Model(Model):
    gguf_arch = gguf.MODEL_ARCH.QWEN3
