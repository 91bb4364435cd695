"""Speculative decoding from n-grams of the prompt and of the text so far
(prompt lookup): no second model, and drafts that pay where the output repeats
its input (summaries, rewrites, extraction, code edits, quoting answers).

A :class:`Drafter` proposes, for one sequence, the tokens that followed the
most recent earlier occurrence of its last few tokens, and sizes each draft
from its own acceptance rate so far: it drafts more while drafts are accepted,
less when they are not, and not at all where the expected gain is below the
cost of verifying the extra tokens (free-form text then runs as before).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

# N-gram lengths looked up, longest first.
NGRAM_MAX = 4
NGRAM_MIN = 2
# The cost of verifying one more token in a decode, as a fraction of a
# one-token decode, until the scheduler has measured it (RowCost): where
# decoding is bound by reading the weights extra rows are nearly free, on a
# few CPU cores they are not.
ROW_COST = 0.15
# Each verification's evidence fades by DECAY; while a sequence does not
# draft, its evidence fades by IDLE_DECAY a step towards the prior, so drafting
# is tried again later (the text may start quoting its input).
DECAY = 0.9
IDLE_DECAY = 0.97
EXPLORE_EVERY = 64  # steps without drafting between single-token trial drafts


class Drafter:
    """Prompt-lookup drafts for one sequence with an adaptive draft length."""

    def __init__(self, tokens: list[int], max_draft: int) -> None:
        self.tokens: list[int] = []
        self.index: dict[tuple[int, ...], int] = {}  # n-gram -> where its latest continuation starts
        self.max_draft = max_draft
        self.idle = 0  # steps without drafting
        self.hits = 1.0  # faded counts of accepted / rejected draft tokens (a weak prior of 1/2)
        self.misses = 1.0
        self.extend(tokens)

    def extend(self, tokens: Iterable[int]) -> None:
        """Append tokens of the sequence (prompt or output)."""
        seq = self.tokens
        for t in tokens:
            # Index the n-grams ending at the current last token: ``t`` continues them.
            end = len(seq)
            for n in range(NGRAM_MIN, NGRAM_MAX + 1):
                if end >= n:
                    self.index[tuple(seq[end - n : end])] = end
            seq.append(t)

    def length(self, row_cost: float = ROW_COST) -> int:
        """The draft length that maximizes expected tokens per unit of decode cost (0: do not draft)."""
        a = self.hits / (self.hits + self.misses)
        best, best_k, expected = 1.0, 0, 0.0
        for k in range(1, self.max_draft + 1):
            expected += a**k  # accepted tokens expected from a draft of k (geometric)
            rate = (1.0 + expected) / (1.0 + row_cost * k)
            if rate > best:
                best, best_k = rate, k
        return best_k

    def propose(self, limit: int, row_cost: float = ROW_COST) -> list[int]:
        """Up to ``limit`` drafted tokens to follow the sequence (maybe none)."""
        k = min(self.length(row_cost), limit)
        if k <= 0:
            # Not drafting: the evidence fades so that drafting is tried again,
            # and now and then one token is drafted anyway, so that the cost of
            # a row is measured again too.
            self.hits = self.hits * IDLE_DECAY + (1 - IDLE_DECAY)
            self.misses = self.misses * IDLE_DECAY + (1 - IDLE_DECAY)
            self.idle += 1
            if self.idle % EXPLORE_EVERY or limit <= 0:
                return []
            k = 1
        seq = self.tokens
        end = len(seq)
        for n in range(NGRAM_MAX, NGRAM_MIN - 1, -1):
            if end < n:
                continue
            start = self.index.get(tuple(seq[end - n :]))
            if start is not None:
                return seq[start : start + k]
        return []

    def record(self, drafted: int, accepted: int) -> None:
        """The outcome of verifying a draft: its first ``accepted`` tokens were kept."""
        self.hits = self.hits * DECAY + accepted
        self.misses = self.misses * DECAY + (1 if accepted < drafted else 0)


class RowCost:
    """What one more row costs in a decode, learnt from the scheduler's own
    generation steps: for each batch size a floor of its decode times (it
    drops to a faster sample at once and rises slowly, so a busy machine's
    slow outliers do not count but drift does), and a line through them."""

    RISE = 0.02
    MIN_SAMPLES = 4

    def __init__(self) -> None:
        self.floor: dict[int, float] = {}
        self.count: dict[int, int] = {}

    def add(self, rows: int, seconds: float) -> None:
        n = self.count.get(rows, 0)
        self.count[rows] = n + 1
        if n == 0:  # a batch size's first decode also builds its graph: not its cost
            return
        f = self.floor.get(rows)
        self.floor[rows] = seconds if f is None or seconds < f else f + (seconds - f) * self.RISE

    def _per_row(self) -> float:
        """A row's cost over the fixed cost of a decode."""
        pts = [(r, t) for r, t in self.floor.items() if self.count[r] > self.MIN_SAMPLES]
        if len(pts) < 2:  # one batch size only: nothing to learn from yet
            return ROW_COST / (1 - ROW_COST)
        mx = sum(r for r, _ in pts) / len(pts)
        my = sum(t for _, t in pts) / len(pts)
        slope = sum((r - mx) * (t - my) for r, t in pts) / sum((r - mx) ** 2 for r, _ in pts)
        base = my - slope * mx
        if slope <= 0:
            return 0.05
        if base <= 0:
            return 10.0
        return min(10.0, max(0.05, slope / base))

    def relative(self, rows: int = 1) -> float:
        """The cost of one drafted row against a decode of ``rows`` rows, per
        sequence in it: a draft in a busy batch must pay for slowing every
        sequence of it, so drafting needs more acceptance there."""
        r = self._per_row() * max(1, rows)
        return r / (1 + r)


def exact_rows(model: Any, options: dict[str, Any] | None, n_max: int) -> int:
    """How many consecutive positions of one sequence can be decoded in one batch
    with logits bit-identical to decoding them one at a time (at least 1).

    llama.cpp's kernels can pick different summation orders for different batch
    shapes; batch_invariant sequences verify drafts only in batches this small,
    so speculation leaves their output exactly as it is without it.
    """
    tokens = model.tokenize("The quick brown fox jumps over the lazy dog. " * 3, True, False)
    n_max = max(1, n_max)
    ctx = model.new_context(len(tokens) + n_max + 8, options=options)
    try:
        p = len(tokens)
        ctx.decode([(t, i, 0, i == p - 1) for i, t in enumerate(tokens)])
        rows, follow = [], []
        row = ctx.logits_row(p - 1)
        for j in range(n_max):
            tok = int(np.argmax(row))
            follow.append(tok)
            ctx.decode([(tok, p + j, 0, True)])
            row = ctx.logits_row(0)
            rows.append(row)
        for n in range(2, n_max + 1):
            ctx.seq_rm(0, p, -1)
            ctx.decode([(t, p + j, 0, True) for j, t in enumerate(follow[:n])])
            if not all(np.array_equal(ctx.logits_row(j), rows[j]) for j in range(n)):
                return n - 1
        return n_max
    finally:
        ctx.close()
