"""Samplers built from Ollama's option names, with llama.cpp's default order:
penalties, top-k, typical, top-p, min-p, temperature, then a random draw (or
greedy at temperature 0, or Mirostat).

The common case (no grammar, no Mirostat, a top-k) never walks the whole
vocabulary in C: the penalties touch only the tokens of the repeat window (in
place, on the logits), the top k are found from per-group maxima in numpy,
and llama.cpp's own samplers (typical, top-p, min-p, temperature, its seeded
draw) then run over those k candidates, sorted as its top-k would leave them.
That is the same computation as llama.cpp's chain, at a fraction of the cost
over a 262k-token vocabulary. Other cases run llama.cpp's whole chain.

``verify`` is speculative sampling for a deterministic draft: the drafted
token is kept with probability p(token) under the target distribution, else a
token is drawn from the target with that token removed, which leaves the
distribution of the output exactly the target's.
"""

from __future__ import annotations

import collections
import ctypes
import random
from typing import Any

import llama_cpp as lc
import numpy as np

from ember.engine.model import LoadedModel
from ember.errors import OptionError

# llama_token_data as numpy sees it (int32 id, float logit, float p).
_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])
# The fast path handles top_k up to this; larger ones (or 0: all) use the chain.
FAST_TOP_K_MAX = 4096
TOP_K_GROUPS = 64


def top_k_indices(logits: np.ndarray, k: int) -> np.ndarray:
    """The indices of the ``k`` largest values, largest first.

    The row is cut into TOP_K_GROUPS strided groups ({j, j+w, j+2w, ...}); a
    maximum per group is one vectorized pass, and each of the k largest values
    lies in a group whose maximum is among the k largest maxima, so the exact
    selection runs over k groups only: several times faster than a selection
    over the whole row.
    """
    n = logits.shape[0]
    w = n // TOP_K_GROUPS
    if k >= n:
        idx = np.arange(n)
    elif w <= 2 * k:
        idx = np.argpartition(logits, -k)[-k:]
    else:
        group_max = logits[: TOP_K_GROUPS * w].reshape(TOP_K_GROUPS, w).max(axis=0)
        top = np.argpartition(group_max, -k)[-k:]
        cand = (top[None, :] + w * np.arange(TOP_K_GROUPS)[:, None]).ravel()
        if TOP_K_GROUPS * w < n:  # the tail belongs to no group
            cand = np.concatenate([cand, np.arange(TOP_K_GROUPS * w, n)])
        idx = cand[np.argpartition(logits[cand], -k)[-k:]]
    return idx[np.argsort(-logits[idx], kind="stable")]


class Sampler:
    """One request's sampler (owns its llama.cpp objects)."""

    def __init__(self, model: LoadedModel, options: dict[str, Any], grammar: str | None = None) -> None:
        o = options
        self.n_vocab = model.n_vocab
        self.row_type = ctypes.c_float * self.n_vocab
        self.chain: Any = None
        self.filters: Any = None
        self.dist: Any = None
        seed = o["seed"]
        if seed is None or seed < 0:
            seed = random.getrandbits(32)
        seed &= 0xFFFFFFFF  # llama.cpp seeds are 32-bit
        temperature = o["temperature"]
        self.greedy = temperature <= 0
        top_k = o["top_k"]
        repeat_last_n = o["repeat_last_n"]
        if repeat_last_n < 0:
            repeat_last_n = int(o.get("num_ctx") or 4096)
        penalized = bool(repeat_last_n) and (o["repeat_penalty"] != 1.0 or o["frequency_penalty"] or o["presence_penalty"])
        # The fast path: everything but grammars, Mirostat and a top-k of the whole vocabulary.
        self.fast = not grammar and o["mirostat"] == 0 and (self.greedy or 0 < top_k <= min(FAST_TOP_K_MAX, self.n_vocab))
        # Speculative drafts can be verified where the target distribution is known.
        self.can_verify = self.fast
        if self.fast:
            self.window: collections.deque[int] | None = collections.deque() if penalized else None
            self.window_n = repeat_last_n
            self.counts: dict[int, int] = {}
            self.repeat = np.float32(o["repeat_penalty"])
            self.freq = np.float32(o["frequency_penalty"])
            self.presence = np.float32(o["presence_penalty"])
            self.shifted = bool(o["frequency_penalty"] or o["presence_penalty"])
            self.rng = np.random.default_rng(seed)
            if not self.greedy:
                self.top_k = top_k
                self.buf = np.zeros(top_k, dtype=_TOKEN_DATA)
                self.arr = lc.llama_token_data_array(
                    data=self.buf.ctypes.data_as(ctypes.POINTER(lc.llama_token_data)), size=0, selected=-1, sorted=True
                )
                self.filters = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
                self._add_filters(self.filters, o)
                lc.llama_sampler_chain_add(self.filters, lc.llama_sampler_init_temp(temperature))
                self.dist = lc.llama_sampler_init_dist(seed)
            return
        # llama.cpp's whole chain.
        self.chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        self.penalty_index: int | None = None
        add = self._add
        if penalized:
            self.penalty_index = 0
            add(lc.llama_sampler_init_penalties(
                model.n_vocab, repeat_last_n, o["repeat_penalty"], o["frequency_penalty"], o["presence_penalty"]
            ))
        if grammar:
            g = lc.llama_sampler_init_grammar(model.vocab, grammar.encode(), b"root")
            if not g:
                lc.llama_sampler_free(self.chain)
                self.chain = None
                raise OptionError("the JSON grammar for 'format' could not be compiled")
            add(g)
        if self.greedy:
            add(lc.llama_sampler_init_greedy())
        elif o["mirostat"] == 1:
            add(lc.llama_sampler_init_temp(temperature))
            add(lc.llama_sampler_init_mirostat(model.n_vocab, seed, o["mirostat_tau"], o["mirostat_eta"], 100))
        elif o["mirostat"] == 2:
            add(lc.llama_sampler_init_temp(temperature))
            add(lc.llama_sampler_init_mirostat_v2(seed, o["mirostat_tau"], o["mirostat_eta"]))
        else:
            if top_k > 0:
                add(lc.llama_sampler_init_top_k(top_k))
            self._add_filters(self.chain, o)
            add(lc.llama_sampler_init_temp(temperature))
            add(lc.llama_sampler_init_dist(seed))

    @staticmethod
    def _add_filters(chain: Any, o: dict[str, Any]) -> None:
        if o["typical_p"] < 1.0:
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_typical(o["typical_p"], 1))
        if o["top_p"] < 1.0:
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_p(o["top_p"], 1))
        if o["min_p"] > 0.0:
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_min_p(o["min_p"], 1))

    def _add(self, sampler: Any) -> None:
        lc.llama_sampler_chain_add(self.chain, sampler)

    # --- the repeat window (fast path) --------------------------------------
    def accept(self, token: int) -> None:
        """Record a chosen token in the repeat window (llama.cpp's ring buffer)."""
        if not self.fast or self.window is None:
            return
        counts = self.counts
        counts[token] = counts.get(token, 0) + 1
        if len(self.window) >= self.window_n:
            old = self.window.popleft()
            if counts[old] == 1:
                del counts[old]
            else:
                counts[old] -= 1
        self.window.append(token)

    def accept_prompt(self, tokens: list[int]) -> None:
        """Feed prompt tokens to the repetition penalties only (not the grammar)."""
        if self.fast:
            if self.window is not None:
                for t in tokens[-self.window_n :]:
                    self.accept(t)
            return
        if self.penalty_index is None:
            return
        pen = lc.llama_sampler_chain_get(self.chain, self.penalty_index)
        for t in tokens:
            lc.llama_sampler_accept(pen, t)

    def _logits(self, ctx_ptr: Any, index: int) -> np.ndarray:
        """Row ``index`` of the logits, penalized in place (tokens of the window only)."""
        ptr = lc.llama_get_logits_ith(ctx_ptr, index)
        row = np.frombuffer(self.row_type.from_address(ctypes.addressof(ptr.contents)), dtype=np.float32)
        if self.counts:
            ids = np.fromiter(self.counts.keys(), dtype=np.int64, count=len(self.counts))
            v = row[ids]
            v = np.where(v <= 0, v * self.repeat, v / self.repeat)
            if self.shifted:
                c = np.fromiter(self.counts.values(), dtype=np.float32, count=len(self.counts))
                v = v - (c * self.freq + self.presence)
            row[ids] = v
        return row

    def _candidates(self, row: np.ndarray) -> None:
        """The top k of ``row``, sorted, through typical/top-p/min-p/temperature."""
        idx = top_k_indices(row, self.top_k)
        n = idx.shape[0]
        self.buf["id"][:n] = idx
        self.buf["logit"][:n] = row[idx]
        self.buf["p"][:n] = 0.0
        self.arr.size = n
        self.arr.selected = -1
        self.arr.sorted = True
        lc.llama_sampler_apply(self.filters, ctypes.byref(self.arr))

    def _draw(self) -> int:
        lc.llama_sampler_apply(self.dist, ctypes.byref(self.arr))
        return int(self.buf["id"][self.arr.selected])

    # --- sampling -------------------------------------------------------------
    def sample(self, ctx_ptr: Any, index: int) -> int:
        """Sample from the logits of batch row ``index`` (and accept the token)."""
        if not self.fast:
            return int(lc.llama_sampler_sample(self.chain, ctx_ptr, index))
        row = self._logits(ctx_ptr, index)
        if self.greedy:
            tok = int(row.argmax())
        else:
            self._candidates(row)
            tok = self._draw()
        self.accept(tok)
        return tok

    def verify(self, ctx_ptr: Any, index: int, draft: int) -> tuple[int, bool]:
        """Speculative sampling of row ``index`` against a drafted token: the token
        chosen (and accepted), and whether it is the draft. Needs ``can_verify``."""
        row = self._logits(ctx_ptr, index)
        if self.greedy:
            tok = int(row.argmax())
            self.accept(tok)
            return tok, tok == draft
        self._candidates(row)
        n = self.arr.size
        ids = self.buf["id"][:n]
        where = np.flatnonzero(ids == draft)
        if where.shape[0]:
            logits = self.buf["logit"][:n].astype(np.float64)
            p = np.exp(logits - logits.max())
            j = int(where[0])
            if self.rng.random() < p[j] / p.sum():
                self.accept(draft)
                return draft, True
            # Rejected: draw from the target with the drafted token taken out.
            self.buf[j : n - 1] = self.buf[j + 1 : n].copy()
            self.arr.size = n - 1
        tok = self._draw()
        self.accept(tok)
        return tok, False

    def close(self) -> None:
        for name in ("chain", "filters", "dist"):
            obj = getattr(self, name, None)
            if obj:
                lc.llama_sampler_free(obj)
                setattr(self, name, None)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass
