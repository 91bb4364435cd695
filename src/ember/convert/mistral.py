"""Mistral (HF transformers layout): the Llama layout and rules (q/k
permutation, SentencePiece or BPE tokenizer); llama.cpp runs it as "llama"."""

from __future__ import annotations

from ember.convert.llama import LlamaModel


class MistralModel(LlamaModel):
    pass
