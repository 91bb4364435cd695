"""llama.cpp sampler chains built from Ollama's option names, in llama.cpp's
default order: penalties, top-k, typical, top-p, min-p, temperature, then a
random draw (or greedy at temperature 0, or Mirostat)."""

from __future__ import annotations

import random
from typing import Any

import llama_cpp as lc
import numpy as np

from ember.engine.model import LoadedModel
from ember.errors import OptionError


class Sampler:
    """One request's sampler chain (owns the C object)."""

    def __init__(self, model: LoadedModel, options: dict[str, Any], grammar: str | None = None) -> None:
        o = options
        self.chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        self.penalty_index: int | None = None
        add = self._add
        repeat_last_n = o["repeat_last_n"]
        if repeat_last_n < 0:
            repeat_last_n = int(o.get("num_ctx") or 4096)
        if repeat_last_n and (o["repeat_penalty"] != 1.0 or o["frequency_penalty"] or o["presence_penalty"]):
            self.penalty_index = 0
            add(lc.llama_sampler_init_penalties(
                model.n_vocab, repeat_last_n, o["repeat_penalty"], o["frequency_penalty"], o["presence_penalty"]
            ))
        if grammar:
            g = lc.llama_sampler_init_grammar(model.vocab, grammar.encode(), b"root")
            if not g:
                lc.llama_sampler_free(self.chain)
                raise OptionError("the JSON grammar for 'format' could not be compiled")
            add(g)
        # Plain greedy (no penalties, no grammar) needs no chain: an argmax over the
        # logits in place skips building a candidate array of the whole vocabulary.
        self.plain_greedy = self.penalty_index is None and not grammar and o["temperature"] <= 0
        self.n_vocab = model.n_vocab
        seed = o["seed"]
        if seed is None or seed < 0:
            seed = random.getrandbits(32)
        seed &= 0xFFFFFFFF  # llama.cpp seeds are 32-bit
        temperature = o["temperature"]
        if temperature <= 0:
            add(lc.llama_sampler_init_greedy())
        elif o["mirostat"] == 1:
            add(lc.llama_sampler_init_temp(temperature))
            add(lc.llama_sampler_init_mirostat(model.n_vocab, seed, o["mirostat_tau"], o["mirostat_eta"], 100))
        elif o["mirostat"] == 2:
            add(lc.llama_sampler_init_temp(temperature))
            add(lc.llama_sampler_init_mirostat_v2(seed, o["mirostat_tau"], o["mirostat_eta"]))
        else:
            if o["top_k"] > 0:
                add(lc.llama_sampler_init_top_k(o["top_k"]))
            if o["typical_p"] < 1.0:
                add(lc.llama_sampler_init_typical(o["typical_p"], 1))
            if o["top_p"] < 1.0:
                add(lc.llama_sampler_init_top_p(o["top_p"], 1))
            if o["min_p"] > 0.0:
                add(lc.llama_sampler_init_min_p(o["min_p"], 1))
            add(lc.llama_sampler_init_temp(temperature))
            add(lc.llama_sampler_init_dist(seed))

    def _add(self, sampler: Any) -> None:
        lc.llama_sampler_chain_add(self.chain, sampler)

    def accept_prompt(self, tokens: list[int]) -> None:
        """Feed prompt tokens to the repetition penalties only (not the grammar)."""
        if self.penalty_index is None:
            return
        pen = lc.llama_sampler_chain_get(self.chain, self.penalty_index)
        for t in tokens:
            lc.llama_sampler_accept(pen, t)

    def sample(self, ctx_ptr: Any, index: int) -> int:
        """Sample from the logits of batch row ``index`` (and accept the token)."""
        if self.plain_greedy:
            logits = np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx_ptr, index), shape=(self.n_vocab,))
            return int(logits.argmax())
        return int(lc.llama_sampler_sample(self.chain, ctx_ptr, index))

    def close(self) -> None:
        if self.chain:
            lc.llama_sampler_free(self.chain)
            self.chain = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass


