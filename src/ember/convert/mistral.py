"""Mistral (HF transformers layout): the Llama layout and rules (q/k
permutation, SentencePiece or BPE tokenizer); llama.cpp runs it as "llama"."""

from __future__ import annotations

from ember.convert.core import register
from ember.convert.llama import LlamaModel


@register("MistralForCausalLM")
class MistralModel(LlamaModel):
    pass
