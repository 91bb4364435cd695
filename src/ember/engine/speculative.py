"""Speculative decoding: drafts from n-grams of the prompt and of the text so
far (prompt lookup: no second model, and drafts that pay where the output
repeats its input: summaries, rewrites, extraction, code edits, quoting
answers), or from a small draft model of the same family (``draft``).

A :class:`Drafter` sizes each draft of one sequence from its own acceptance
rate so far: it drafts more while drafts are accepted, less when they are not,
and not at all where the expected gain is below the cost of the extra tokens
(free-form text then runs as before). With n-grams it also proposes the tokens
that followed the most recent earlier occurrence of the sequence's last few
tokens; a :class:`DraftModel` drafts for all sequences of a step at once, a
token per ``llama_decode``, greedily, on a context of its own.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

from ember.errors import OptionError

if TYPE_CHECKING:
    from ember.engine.model import LoadedModel

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


# llama.cpp's limit on how much a draft model's vocabulary may differ in size
# (Qwen2.5's small and large models: 151,936 and 152,064 tokens).
VOCAB_SIZE_SLACK = 128


class Drafter:
    """The adaptive draft length of one sequence, and its prompt-lookup drafts
    (``ngrams=False``: the length only, for a draft model's drafts)."""

    def __init__(self, tokens: list[int], max_draft: int, *, ngrams: bool = True) -> None:
        self.tokens: list[int] = []
        self.index: dict[tuple[int, ...], int] = {}  # n-gram -> where its latest continuation starts
        self.ngrams = ngrams
        self.max_draft = max_draft
        self.idle = 0  # steps without drafting
        self.hits = 1.0  # faded counts of accepted / rejected draft tokens (a weak prior of 1/2)
        self.misses = 1.0
        self.extend(tokens)

    def extend(self, tokens: Iterable[int]) -> None:
        """Append tokens of the sequence (prompt or output)."""
        if not self.ngrams:
            return
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

    def want(self, limit: int, row_cost: float = ROW_COST) -> int:
        """How many tokens to draft this step, at most ``limit`` (maybe none)."""
        k = min(self.length(row_cost), limit)
        if k <= 0:
            # Not drafting: the evidence fades so that drafting is tried again,
            # and now and then one token is drafted anyway, so that the cost of
            # a row is measured again too.
            self.hits = self.hits * IDLE_DECAY + (1 - IDLE_DECAY)
            self.misses = self.misses * IDLE_DECAY + (1 - IDLE_DECAY)
            self.idle += 1
            if self.idle % EXPLORE_EVERY or limit <= 0:
                return 0
            k = 1
        return k

    def propose(self, limit: int, row_cost: float = ROW_COST) -> list[int]:
        """Up to ``limit`` tokens drafted from n-grams to follow the sequence (maybe none)."""
        k = self.want(limit, row_cost)
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

    def record(self, drafted: int, accepted: int) -> None:
        """The outcome of verifying a draft: its first ``accepted`` tokens were kept."""
        self.hits = self.hits * DECAY + accepted
        self.misses = self.misses * DECAY + (1 if accepted < drafted else 0)


class DraftModel:
    """A small model of the target's family that drafts greedily for every
    drafting sequence of a step: one ``llama_decode`` per drafted position,
    all sequences in it, on its own context with one KV stream per sequence.

    Its cache follows each sequence's tokens lazily: what a sequence has
    gained since it last drafted (its prompt, accepted drafts, the token to
    be verified) is evaluated before it drafts again; what was rejected is
    dropped (:meth:`trim`), and a new request keeps the prefix it shares with
    the sequence's last one (:meth:`keep`).
    """

    def __init__(self, model: LoadedModel, target: LoadedModel, n_ctx: int, n_seq: int,
                 options: dict[str, Any] | None) -> None:
        check_vocabulary(target, model)
        self.model = model
        self.ctx = model.new_context(n_ctx, n_seq_max=n_seq, options=options)
        self.n_vocab = min(model.n_vocab, target.n_vocab)  # ids the target knows too
        self.cached: list[list[int]] = [[] for _ in range(n_seq)]  # tokens in the cache, per sequence
        # A drafted token against a decode of the target: decoding on a CPU
        # reads every weight once, so it costs about what the weights weigh.
        self.cost = model.size_bytes / max(1, target.size_bytes)

    def keep(self, seq: int, tokens: list[int]) -> None:
        """Keep only the longest prefix of ``seq``'s cache that ``tokens`` starts with."""
        cached = self.cached[seq]
        n = min(len(cached), len(tokens))
        if cached[:n] != tokens[:n]:
            n = next(i for i, (a, b) in enumerate(zip(cached, tokens)) if a != b)
        if n < len(cached):
            self.ctx.seq_rm(seq, n, -1)
            del cached[n:]

    def trim(self, seq: int, n: int) -> None:
        """Drop what follows the first ``n`` tokens of ``seq`` (rejected drafts)."""
        if n < len(self.cached[seq]):
            self.ctx.seq_rm(seq, n, -1)
            del self.cached[seq][n:]

    def propose(self, wants: list[tuple[int, list[int], int]]) -> list[list[int]]:
        """Drafts for ``(seq, tokens so far, length)`` requests, in order.
        Each ``tokens`` must extend what that sequence's cache holds."""
        entries: list[tuple[int, int, int, bool]] = []
        for seq, tokens, _ in wants:
            cached = self.cached[seq]
            new = tokens[len(cached) :]
            entries.extend((t, len(cached) + j, seq, j == len(new) - 1) for j, t in enumerate(new))
            cached.extend(new)
        drafts: dict[int, list[int]] = {}
        n_batch = self.ctx.n_batch
        for start in range(0, len(entries), n_batch):
            chunk = entries[start : start + n_batch]
            self.ctx.decode(chunk)
            for i, (_, _, seq, want) in enumerate(chunk):
                if want:
                    drafts[seq] = [self._greedy(i)]
        live = [(seq, k) for seq, _, k in wants if self._usable(drafts[seq]) and k > 1]
        while live:
            self.ctx.decode([(drafts[seq][-1], len(self.cached[seq]), seq, True) for seq, _ in live])
            for i, (seq, _) in enumerate(live):
                self.cached[seq].append(drafts[seq][-1])
                drafts[seq].append(self._greedy(i))
            live = [(seq, k) for seq, k in live if self._usable(drafts[seq]) and len(drafts[seq]) < k]
        out = []
        for seq, _, _ in wants:
            d = drafts[seq]
            while d and d[-1] >= self.n_vocab:  # a token the target does not have
                d.pop()
            out.append(d)
        return out

    def _greedy(self, row: int) -> int:
        return int(np.argmax(self.ctx.logits_view(row)))

    def _usable(self, draft: list[int]) -> bool:
        """Whether drafting may go on after ``draft``: not past the end of the text."""
        t = draft[-1]
        return t < self.n_vocab and not self.model.is_eog(t)

    def close(self) -> None:
        self.ctx.close()


def check_vocabulary(target: LoadedModel, draft: LoadedModel) -> None:
    """A draft model must tokenize as the target does: the same special tokens
    and the same text for every token id both have (an OptionError otherwise)."""
    where = f"draft: {draft.paths[0].name} cannot draft for {target.paths[0].name}"
    if abs(target.n_vocab - draft.n_vocab) > VOCAB_SIZE_SLACK:
        raise OptionError(f"{where}: their vocabularies have {draft.n_vocab} and {target.n_vocab} tokens")
    if (draft.add_bos, draft.bos_id, draft.eos_id) != (target.add_bos, target.bos_id, target.eos_id):
        raise OptionError(f"{where}: their beginning and end tokens differ")
    for i in range(min(target.n_vocab, draft.n_vocab)):
        if target.token_text(i) != draft.token_text(i):
            raise OptionError(f"{where}: token {i} is {draft.token_text(i)!r} in one and {target.token_text(i)!r} in the other")


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
