"""Mistral: the Llama layout (q/k permutation, SentencePiece or BPE tokenizer);
sliding-window configs are written as the context llama.cpp uses."""

from __future__ import annotations

from ember.convert.core import register
from ember.convert.llama import LlamaModel


@register("MistralForCausalLM")
class MistralModel(LlamaModel):
    pass
