"""Speculative decoding from n-grams of the prompt and of the text so far
(prompt lookup): no second model, and drafts that pay where the output repeats
its input (summaries, rewrites, extraction, code edits, quoting answers).

A :class:`Drafter` proposes, for one sequence, the tokens that followed the
most recent earlier occurrence of its last few tokens, and keeps an estimate
of how often its drafted tokens are accepted. Its draft ceiling starts at
START_DRAFT and doubles while whole drafts are accepted (a long copied span),
up to the request's ``num_draft``; a rejection halves it again.

:func:`allocate` decides, for one decode of the whole batch, how many drafted
rows each sequence gets: rows are added best first (the j-th token of a draft
is kept with probability a**j) while the expected tokens per unit of decode
time still rise, with the decode time of the batch size actually proposed
(:class:`RowCost`). A lone sequence drafts as long as the expected gain beats
a row's cost; in a full batch, where every row slows every sequence, only
sequences with high acceptance draft, and free-form text runs as before.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

# N-gram lengths looked up, longest first.
NGRAM_MAX = 4
NGRAM_MIN = 2
# A sequence's first draft ceiling; it doubles while whole drafts are accepted.
START_DRAFT = 8
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
# Steps without drafting between single-token trial drafts: few after an
# accepted draft (a sequence in a busy batch learns soon that it copies its
# input), doubling after each rejected one.
EXPLORE_MIN = 4
EXPLORE_MAX = 64


class Drafter:
    """Prompt-lookup drafts for one sequence, with its acceptance estimate and draft ceiling."""

    def __init__(self, tokens: list[int], max_draft: int) -> None:
        self.tokens: list[int] = []
        self.index: dict[tuple[int, ...], int] = {}  # n-gram -> where its latest continuation starts
        self.max_draft = max_draft  # the request's cap (num_draft)
        self.ceiling = min(START_DRAFT, max_draft)
        self.idle = 0  # steps without drafting since the last trial
        self.explore = EXPLORE_MIN  # steps between trial drafts
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

    def acceptance(self) -> float:
        """The estimated chance that a drafted token is kept, given the one before it was."""
        return self.hits / (self.hits + self.misses)

    def lookup(self, limit: int) -> list[int]:
        """Up to ``limit`` tokens (and the ceiling) that followed the latest match of the last n-gram."""
        k = min(limit, self.ceiling)
        if k <= 0:
            return []
        seq = self.tokens
        end = len(seq)
        for n in range(NGRAM_MAX, NGRAM_MIN - 1, -1):
            if end < n:
                continue
            start = self.index.get(tuple(seq[end - n :]))
            if start is not None:
                return seq[start : start + k]
        return []

    def skip(self) -> bool:
        """A step without drafting: the evidence fades, so that drafting is
        tried again; True when a one-token trial draft is due anyway (it also
        measures the cost of a row again)."""
        self.hits = self.hits * IDLE_DECAY + (1 - IDLE_DECAY)
        self.misses = self.misses * IDLE_DECAY + (1 - IDLE_DECAY)
        self.idle += 1
        if self.idle < self.explore:
            return False
        self.idle = 0
        return True

    def record(self, drafted: int, accepted: int) -> None:
        """The outcome of verifying a draft: its first ``accepted`` tokens were kept."""
        self.hits = self.hits * DECAY + accepted
        self.misses = self.misses * DECAY + (1 if accepted < drafted else 0)
        if accepted < drafted:
            self.ceiling = max(min(START_DRAFT, self.max_draft), self.ceiling // 2)
            self.explore = min(EXPLORE_MAX, 2 * self.explore)
        else:
            self.explore = EXPLORE_MIN
            if drafted >= self.ceiling:
                self.ceiling = min(self.max_draft, 2 * self.ceiling)


def allocate(offers: list[tuple[float, int]], rows: int, value: float, time: Callable[[int], float],
             limit: int) -> list[int]:
    """Drafted rows per sequence for one decode: ``offers`` are (acceptance,
    tokens available) per sequence; the decode already holds ``rows`` rows
    worth ``value`` tokens; ``time(n)`` is the decode time of ``n`` rows; at
    most ``limit`` rows are added. A row is added, best expected gain first,
    only if it raises the expected tokens per unit of time."""
    counts = [0] * len(offers)
    heap = [(-a, i, 1) for i, (a, n) in enumerate(offers) if n > 0 and a > 0]
    heapq.heapify(heap)
    t = time(rows)
    while heap and limit > 0:
        neg, i, j = heapq.heappop(heap)
        gain = -neg
        t1 = time(rows + 1)
        if (value + gain) * t <= value * t1:
            break
        value, rows, t, limit = value + gain, rows + 1, t1, limit - 1
        counts[i] = j
        a, n = offers[i]
        if j < n:
            heapq.heappush(heap, (-gain * a, i, j + 1))
    return counts


class RowCost:
    """Decode time against rows in the batch, learnt from the scheduler's own
    generation steps: for each batch size a floor of its decode times (it
    drops to a faster sample at once and rises slowly, so a busy machine's
    slow outliers do not count but drift does), and a line through the floors
    of batch sizes near the one asked about (a CPU's cost per row differs
    between small and full batches; a line through all would carry one to the
    other)."""

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

    def line(self, rows: int) -> tuple[float, float]:
        """(fixed cost, cost per row) near a batch of ``rows`` rows; with too
        few measures, ROW_COST of a one-row decode per row."""
        pts = [(r, t) for r, t in self.floor.items() if self.count[r] > self.MIN_SAMPLES]
        near = [(r, t) for r, t in pts if rows // 2 <= r <= 2 * rows + 8]
        if len({r for r, _ in near}) >= 3:
            pts = near
        if len(pts) < 2:  # one batch size only: nothing to learn from yet
            return 1 - ROW_COST, ROW_COST
        mx = sum(r for r, _ in pts) / len(pts)
        my = sum(t for _, t in pts) / len(pts)
        slope = sum((r - mx) * (t - my) for r, t in pts) / sum((r - mx) ** 2 for r, _ in pts)
        # Keep the line sensible where the floors are noisy: a row costs
        # something, and a decode of ``rows`` rows costs at least half its rows.
        slope = max(slope, 0.02 * my / mx)
        return max(my - slope * mx, -slope * rows / 2), slope


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
