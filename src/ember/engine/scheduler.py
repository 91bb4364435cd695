"""Continuous batching: many sequences share one llama.cpp context.

Each step decodes, in a single ``llama_decode``, one token for every sequence
that is generating plus chunks of prompt for sequences that are starting
(chunked prefill: a long prompt never stalls running streams for more than one
batch). Every request has its own sampler chain. When a request starts, the
slot whose cached tokens share the longest prefix with its prompt is reused
(or that prefix is copied from a busy slot), so only the rest is evaluated.

A prompt with images (a :class:`~ember.engine.vision.VisionPrompt`) is runs of
text tokens and image chunks. Image chunks are encoded by the vision tower on
a worker thread while the other sequences keep decoding; when its encoding is
ready, a chunk's embeddings are decoded for its sequence alone, in a step of
their own (``vision.decode_image``), and the text after it joins the shared
batch again. The prefix cache compares one key per KV cell: token ids, and
the image's hash for its cells, so only the same image is reused.

Speculative decoding: a generating sequence may carry drafted tokens (from
n-grams of its prompt and output, or from a draft model: engine/speculative.py)
after its next token; all of them are verified in the same ``llama_decode``,
and the KV entries of rejected drafts are removed.
"""

from __future__ import annotations

import asyncio
import codecs
import collections
import queue
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from ember.engine.logprobs import token_logprob
from ember.engine.model import Context, LoadedModel, MemoryReport
from ember.engine.sampling import Sampler
from ember.engine.speculative import Drafter, DraftModel, RowCost, exact_rows
from ember.engine.vision import ImageChunk, Piece, VisionProjector, VisionPrompt, decode_image
from ember.errors import CancelledError, ContextOverflowError, EmberError, EngineError, QueueFullError
from ember.options import SPECS

# batch_invariant prompts are evaluated in chunks aligned to this many tokens.
INVARIANT_CHUNK = 64
DEFAULT_DRAFT = SPECS["num_draft"].default  # probe exact batch shapes at least this far


@dataclass
class Chunk:
    """A piece of streamed output; the last one has ``done=True`` and the stats."""

    text: str
    done: bool = False
    done_reason: str | None = None  # "stop" (end token or stop string), "length", "cancel"
    prompt_tokens: int = 0  # tokens in the prompt
    prompt_eval_count: int = 0  # prompt tokens actually evaluated (the rest came from the cache)
    prompt_eval_duration: int = 0  # ns
    eval_count: int = 0  # generated tokens
    eval_duration: int = 0  # ns
    tokens: list[int] = field(default_factory=list)  # generated token ids (on the last chunk)
    draft_count: int = 0  # tokens drafted for speculative decoding
    draft_accepted: int = 0  # drafted tokens the model accepted
    # With logprobs asked for: an entry for each token generated since the previous chunk.
    logprobs: list[dict[str, Any]] | None = None


class Handle:
    """The consumer's side of one request: iterate (sync or async) over chunks."""

    def __init__(self, scheduler: Scheduler, loop: asyncio.AbstractEventLoop | None) -> None:
        self._scheduler = scheduler
        self._loop = loop
        self._sync: queue.SimpleQueue[Chunk | BaseException] = queue.SimpleQueue()
        self._async: asyncio.Queue[Chunk | BaseException] | None = asyncio.Queue() if loop else None
        self.cancelled = False

    def _put(self, item: Chunk | BaseException) -> None:
        if self._loop is None:
            self._sync.put(item)
            return
        try:
            self._loop.call_soon_threadsafe(self._async.put_nowait, item)  # type: ignore[union-attr]
        except RuntimeError:  # the consumer's event loop is gone
            self.cancelled = True

    def cancel(self) -> None:
        """Stop generating; the sequence is freed at the next step."""
        self.cancelled = True
        self._scheduler._wake()

    def __iter__(self) -> Iterator[Chunk]:
        if self._loop is not None:
            raise TypeError("this request was submitted for async iteration")
        try:
            while True:
                item = self._sync.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.done:
                    return
        finally:
            self.cancel()

    async def __aiter__(self) -> AsyncIterator[Chunk]:
        assert self._async is not None, "submit(loop=...) for async iteration"
        try:
            while True:
                item = await self._async.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.done:
                    return
        finally:
            self.cancel()


class Reasoning(Protocol):
    """Follows a reply's reasoning (templates.thinking.ThinkingParser)."""

    @property
    def undecided(self) -> bool: ...  # nothing shows yet whether the reply reasons

    @property
    def answering(self) -> bool: ...  # the reasoning is over (or there was none)

    def add(self, text: str) -> Any: ...


@dataclass
class _Request:
    tokens: list[int]  # the prompt's text tokens
    options: dict[str, Any]
    grammar: str | None
    handle: Handle
    keys: list[int | str]  # one per KV cell: token ids, image cell keys (prefix matching)
    pieces: list[Piece]  # text token runs and image chunks, in order
    logprobs: int | None = None  # None: not asked for; else how many top alternatives
    reasoning: Reasoning | None = None  # the grammar constrains only what follows the reasoning
    submitted: float = field(default_factory=time.perf_counter)


def _image_start(pieces: list[Piece], n: int) -> int:
    """``n`` cells, moved back to the start of the image it falls inside: an
    image's KV is reused whole or not at all."""
    cells = 0
    for p in pieces:
        size = len(p) if isinstance(p, list) else p.n_tokens
        if cells + size > n:
            return n if isinstance(p, list) else cells
        cells += size
    return n


def _split(pieces: list[Piece], n: int) -> tuple[int, list[Piece]]:
    """(the position of cell ``n``, the pieces from cell ``n`` on); ``n`` is
    never inside an image. Positions and cells differ after an M-RoPE image."""
    cells = pos = 0
    for i, p in enumerate(pieces):
        if isinstance(p, list):
            if cells + len(p) > n:
                return pos + n - cells, [p[n - cells :], *pieces[i + 1 :]]
            cells, pos = cells + len(p), pos + len(p)
        else:
            if cells + p.n_tokens > n:
                return pos, pieces[i:]
            cells, pos = cells + p.n_tokens, pos + p.n_pos
    return pos, []


class _Slot:
    def __init__(self, seq: int) -> None:
        self.seq = seq
        self.cached: list[int | str] = []  # keys of the KV cells in the cache for this sequence
        self.last_used = 0.0
        self.req: _Request | None = None
        self.pending: list[int] = []
        self.later: list[Piece] = []
        self.encoded: dict[int, Future[Any]] = {}
        self.drafter: Drafter | None = None
        self.draft: list[int] = []  # drafted tokens after next_token, in this step's batch
        self.reasoning: Reasoning | None = None
        self.answer_sampler: Sampler | None = None  # the grammar's, once the reasoning is over

    def start(
        self, req: _Request, n_keep: int, sampler: Sampler, stops: list[str], encoded: dict[int, Future[Any]],
        drafter: Drafter | None, answer_sampler: Sampler | None = None,
    ) -> None:
        self.req = req
        self.n_past, self.later = _split(req.pieces, n_keep)  # n_past: the next position
        self.pending = []  # the text run being evaluated; later: what follows it
        self.encoded = encoded  # id(image chunk) -> its embeddings, being encoded
        self.drafter = drafter
        self.draft = []
        self.draft_count = 0
        self.draft_accepted = 0
        self.sampler = sampler
        self.answer_sampler = answer_sampler
        self.reasoning = req.reasoning if answer_sampler is not None else None
        self.stops = stops
        self.max_stop = max((len(s) for s in stops), default=0)
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.text = ""
        self.emitted = 0
        self.generated: list[int] = []
        self.logprobs: list[dict[str, Any]] = []  # entries not yet sent
        self.next_token: int | None = None
        self.batch_row = -1
        self.t_start = time.perf_counter()
        self.t_first: float | None = None
        self.n_evaluated = len(req.keys) - n_keep
        self.taken = 0


class Scheduler:
    """Runs one model's requests on ``num_parallel`` sequences of one context.

    ``num_ctx`` is per sequence (as in Ollama); the context holds
    ``num_ctx * num_parallel`` tokens, one KV stream per sequence.
    """

    def __init__(
        self,
        model: LoadedModel,
        *,
        num_ctx: int,
        num_parallel: int = 1,
        max_queue: int = 512,
        options: dict[str, Any] | None = None,
        projector: VisionProjector | None = None,
        draft_model: LoadedModel | None = None,
        draft_cost: float | None = None,
    ) -> None:
        """``draft_model``: drafts come from it (sharing the model's vocabulary)
        instead of n-grams, for text-only prompts. ``draft_cost``: a fixed cost
        of a drafted token against a decode (0: drafts are free), for
        measurements; None: measured on this machine's decodes."""
        self.model = model
        self.projector = projector
        # The vision tower runs here, beside the decoding loop (one encode at a time per projector).
        self._encoder = ThreadPoolExecutor(1, thread_name_prefix="ember-vision") if projector else None
        self.draft_cost = draft_cost
        self.num_ctx = num_ctx
        self.num_parallel = num_parallel
        self.max_queue = max_queue
        self.ctx: Context = model.new_context(num_ctx * num_parallel, n_seq_max=num_parallel, options=options)
        self.ctx_options = options
        self.drafts: DraftModel | None = None
        if draft_model is not None:
            try:
                self.drafts = DraftModel(draft_model, model, num_ctx * num_parallel, num_parallel, options)
            except BaseException:
                self.ctx.close()
                raise
        self._exact_rows: int | None = None  # see speculative.exact_rows; probed when first needed
        self.row_cost = RowCost()
        self.batch_invariant = bool((options or {}).get("batch_invariant", model.options.get("batch_invariant")))
        self.n_batch = self.ctx.n_batch
        self.slots = [_Slot(i) for i in range(num_parallel)]
        self._queue: collections.deque[_Request] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"ember-scheduler-{model.paths[0].name}", daemon=True)
        self._thread.start()

    # --- public ----------------------------------------------------------
    def submit(
        self,
        tokens: list[int] | VisionPrompt,
        options: dict[str, Any],
        *,
        grammar: str | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        logprobs: int | None = None,
        reasoning: Reasoning | None = None,
    ) -> Handle:
        """Queue a prompt (token ids, or a VisionPrompt of text and images);
        ``options`` is a complete options dict (see ember.options.merged).
        ``logprobs``: the chunks carry each token's log probability and that
        many most likely alternatives (None: not computed). ``reasoning``: a
        fresh parser of the reply's reasoning, which ``grammar`` then leaves
        free: it constrains the answer after it, as Ollama's ``format`` does."""
        if isinstance(tokens, VisionPrompt):
            if tokens.chunks and self.projector is None:
                raise EmberError("this model has no vision projector for the prompt's images")
            pieces = [p for p in tokens.pieces if not isinstance(p, list) or p]
            keys = tokens.cache_keys()
            tokens = [t for p in pieces if isinstance(p, list) for t in p]
        else:
            pieces, keys = [list(tokens)], list(tokens)
        if not keys:
            raise EmberError("the prompt is empty after tokenization")
        if len(keys) >= self.num_ctx:
            raise ContextOverflowError(
                f"the prompt has {len(keys)} tokens but the context holds {self.num_ctx} (num_ctx); "
                "shorten it or raise num_ctx"
            )
        handle = Handle(self, loop)
        with self._cond:
            if self._closed:
                raise CancelledError("the model is being unloaded")
            # Only requests that wait count: those a free slot will take at the
            # next step are running already, whatever the timing of this thread.
            free = sum(1 for slot in self.slots if slot.req is None)
            if len(self._queue) - free >= self.max_queue:
                raise QueueFullError("the server is busy (request queue full); retry later")
            self._queue.append(_Request(list(tokens), options, grammar, handle, keys, pieces, logprobs, reasoning))
            self._cond.notify()
        return handle

    def generate(self, tokens: list[int], options: dict[str, Any], grammar: str | None = None) -> Iterator[Chunk]:
        return iter(self.submit(tokens, options, grammar=grammar))

    @property
    def active(self) -> int:
        return sum(1 for s in self.slots if s.req is not None) + len(self._queue)

    def memory_report(self) -> MemoryReport:
        report = self.ctx.memory_report()
        return report if self.drafts is None else report.plus(self.drafts.ctx.memory_report())

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=30)
        if self._encoder is not None:
            self._encoder.shutdown(wait=True, cancel_futures=True)
        if self.drafts is not None:
            self.drafts.close()
        self.ctx.close()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    # --- the loop --------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._queue and not any(s.req for s in self.slots):
                    self._cond.wait()
                if self._closed:
                    break
                self._admit()
            try:
                self._step()
            except EmberError as e:
                self._fail_all(e)
            except Exception as e:  # noqa: BLE001 - never let the loop die silently
                self._fail_all(EngineError(f"generation failed: {e}"))
        for s in self.slots:
            if s.req:
                s.req.handle._put(CancelledError("the model was unloaded"))
                self._free(s)
        while self._queue:
            self._queue.popleft().handle._put(CancelledError("the model was unloaded"))

    def _admit(self) -> None:
        """Move queued requests into free slots, reusing the longest cached prefix."""
        while self._queue:
            free = [s for s in self.slots if s.req is None]
            if not free:
                return
            req = self._queue.popleft()
            if req.handle.cancelled:
                continue
            try:
                self._start(req, free)
            except EmberError as e:
                req.handle._put(e)
            except Exception as e:  # noqa: BLE001 - one bad request must not stop the loop
                req.handle._put(EngineError(f"could not start the request: {e}"))

    def _invariant(self, req: _Request) -> bool:
        return self.batch_invariant or bool(req.options.get("batch_invariant"))

    def _start(self, req: _Request, free: list[_Slot]) -> None:
        tokens = req.keys
        limit = len(tokens) - 1  # the last prompt token is always evaluated (it gives the logits)
        invariant = self._invariant(req)

        def common(s: _Slot) -> int:
            n = 0
            for a, b in zip(s.cached, tokens[:limit]):
                if a != b:
                    break
                n += 1
            # A batch_invariant prompt is evaluated in chunks that start at
            # multiples of INVARIANT_CHUNK, so only whole chunks are reused:
            # every token is then computed in the same batch shape, whatever
            # the cache held before.
            return _image_start(req.pieces, n - n % INVARIANT_CHUNK if invariant else n)

        best_free = max(free, key=lambda s: (common(s), -s.last_used if common(s) == 0 else 0))
        n_free = common(best_free)
        busy = [s for s in self.slots if s.req is not None]
        best_busy = max(busy, key=common, default=None)
        n_busy = common(best_busy) if best_busy else 0
        if n_busy > n_free and best_busy is not None:
            # Take the least recently used free slot and copy the prefix into it.
            # (Per-sequence KV streams copy whole; the tail is then dropped.)
            slot = min(free, key=lambda s: s.last_used)
            self.ctx.seq_rm(slot.seq)
            self.ctx.seq_cp(best_busy.seq, slot.seq)
            self.ctx.seq_rm(slot.seq, _split(req.pieces, n_busy)[0], -1)
            slot.cached = tokens[:n_busy]
            n_keep = n_busy
        else:
            slot, n_keep = best_free, n_free
            if not self.ctx.seq_rm(slot.seq, _split(req.pieces, n_keep)[0], -1):
                self.ctx.seq_rm(slot.seq)
                n_keep = 0
            slot.cached = slot.cached[:n_keep]
        if self.drafts is not None:
            self.drafts.keep(slot.seq, req.tokens)
        sampler = Sampler(self.model, req.options, req.grammar)  # a bad grammar fails here, before anything runs
        sampler.accept_prompt(req.tokens)
        answer_sampler = None
        if req.grammar and req.reasoning is not None:
            answer_sampler, sampler = sampler, Sampler(self.model, req.options)
            sampler.accept_prompt(req.tokens)
        stops = [s for s in req.options.get("stop") or [] if s]
        slot.start(req, n_keep, sampler, stops, {}, self._drafter(req, sampler, invariant), answer_sampler)
        for piece in slot.later:
            if isinstance(piece, ImageChunk):
                assert self._encoder is not None and self.projector is not None
                fut = self._encoder.submit(self.projector.encode, piece)
                fut.add_done_callback(lambda _: self._wake())
                slot.encoded[id(piece)] = fut

    def _drafter(self, req: _Request, sampler: Sampler, invariant: bool) -> Drafter | None:
        """Speculative drafts for this request, where they can be verified exactly."""
        max_draft = int(req.options.get("num_draft") or 0)
        if max_draft <= 0 or not sampler.can_verify:
            return None
        if invariant:
            if self._exact_rows is None:
                self._exact_rows = exact_rows(self.model, self.ctx_options, max(max_draft, DEFAULT_DRAFT) + 1)
            max_draft = min(max_draft, self._exact_rows - 1)
            if max_draft <= 0:
                return None
        text_only = all(isinstance(p, list) for p in req.pieces)
        return Drafter(req.tokens, max_draft, ngrams=self.drafts is None or not text_only)

    def _step(self) -> None:
        active = [s for s in self.slots if s.req is not None]
        for s in active:
            if s.req.handle.cancelled:  # type: ignore[union-attr]
                self._finish(s, "cancel", notify=False)
        active = [s for s in active if s.req is not None]
        waiting = [s for s in active if not self._advance(s)]
        active = [s for s in active if s.req is not None and s not in waiting]
        if waiting and not active:  # only image encodings are running: wait for one
            with self._cond:
                if not self._queue and not self._closed and not any(s.encoded[id(s.later[0])].done() for s in waiting):
                    self._cond.wait(1.0)
            return
        # llama.cpp's kernels pick different summation orders for different
        # batch shapes; decoding a batch_invariant sequence on its own keeps its
        # numbers exactly those of a lone request. It is the request's option
        # (a Modelfile's PARAMETER or the request's own), or the whole model's.
        alone = [s for s in active if self._invariant(s.req)]  # type: ignore[arg-type]
        for s in alone:
            self._decode_group([s])
        together = [s for s in active if s not in alone]
        if together:
            self._decode_group(together)

    def _decode_group(self, active: list[_Slot]) -> None:
        entries: list[tuple[int, int, int, bool]] = []
        generating = [s for s in active if s.next_token is not None]
        self._draft(generating)
        for s in active:
            s.batch_row = -1
            s.taken = 0
            if s.next_token is not None:
                entries.append((s.next_token, s.n_past, s.seq, True))
                s.batch_row = len(entries) - 1
                entries.extend((t, s.n_past + 1 + j, s.seq, True) for j, t in enumerate(s.draft))
        budget = self.n_batch - len(entries)
        # Prefill in arrival order so the oldest prompt finishes first.
        for s in sorted((s for s in active if s.pending), key=lambda s: s.req.submitted):  # type: ignore[union-attr]
            if budget <= 0:
                break
            take = s.pending[:budget]
            if self._invariant(s.req):  # type: ignore[arg-type]
                take = take[: INVARIANT_CHUNK - len(s.cached) % INVARIANT_CHUNK]
            finishes = len(take) == len(s.pending) and not s.later  # the prompt's end: its logits
            for j, tok in enumerate(take):
                entries.append((tok, s.n_past + j, s.seq, finishes and j == len(take) - 1))
            if finishes:
                s.batch_row = len(entries) - 1
            s.taken = len(take)
            budget -= len(take)
        if not entries:
            return
        t0 = time.perf_counter()
        self.ctx.decode(entries)
        if generating and not any(s.taken for s in active):  # a generation step (no prefill): its cost per row
            self.row_cost.add(len(entries), time.perf_counter() - t0)
        # Book-keeping after a successful decode.
        for s in active:
            if s.next_token is not None:
                s.cached.append(s.next_token)
                s.n_past += 1
                s.next_token = None
        for s in active:
            if s.taken:
                s.cached.extend(s.pending[: s.taken])
                s.n_past += s.taken
                s.pending = s.pending[s.taken :]
        for s in active:
            if s.batch_row >= 0 and not s.pending:
                self._sample(s)

    def _draft(self, generating: list[_Slot]) -> None:
        """Set the drafted tokens of each generating sequence for this step."""
        spare = self.n_batch - len(generating)  # rows left for drafts (prefill waits a step at worst)
        row_cost = self.row_cost.relative(len(generating)) if self.draft_cost is None else self.draft_cost
        by_model: list[_Slot] = []
        wants: list[tuple[int, list[int], int]] = []
        for s in generating:
            if s.drafter is None or spare <= 0 or (s.reasoning is not None and s.reasoning.undecided):
                continue
            limit = min(spare, self._draft_room(s))
            if s.drafter.ngrams:
                s.draft = s.drafter.propose(limit, row_cost)
                spare -= len(s.draft)
                continue
            assert self.drafts is not None and s.next_token is not None
            cost = row_cost if self.draft_cost is not None else row_cost + self.drafts.cost
            k = s.drafter.want(limit, cost)
            if k > 0:
                by_model.append(s)
                wants.append((s.seq, [*s.cached, s.next_token], k))  # type: ignore[list-item]
                spare -= k
        if wants:
            assert self.drafts is not None
            for s, draft in zip(by_model, self.drafts.propose(wants)):
                s.draft = draft

    def _advance(self, s: _Slot) -> bool:
        """Bring the slot's next text run into ``pending``, decoding the image
        chunks before it whose embeddings are ready (each for this sequence
        alone); False while an image it needs next is still being encoded."""
        while s.req is not None and not s.pending and s.later and s.next_token is None:
            piece = s.later[0]
            if isinstance(piece, list):
                s.pending = piece
                s.later.pop(0)
                continue
            fut = s.encoded[id(piece)]
            if not fut.done():
                return False
            s.later.pop(0)
            del s.encoded[id(piece)]
            last = not s.later
            assert self.projector is not None
            try:
                s.n_past = decode_image(self.ctx, self.projector, piece, fut.result(), s.seq, s.n_past, logits_last=last)
            except Exception as e:  # noqa: BLE001 - the request fails, not the loop
                err = e if isinstance(e, EmberError) else EngineError(f"the image could not be evaluated: {e}")
                s.req.handle._put(err)
                self._free(s)
                self._forget(s)
                return True
            n = len(s.cached)
            s.cached.extend(s.req.keys[n : n + piece.n_tokens])
            if last:  # a prompt that ends with an image: its last embedding gives the logits
                s.batch_row = -1
                self._sample(s)
        return True

    def _draft_room(self, s: _Slot) -> int:
        """How many drafted tokens could still be used: the output's and the context's room."""
        assert s.req is not None
        room = self.num_ctx - len(s.cached) - 2  # KV cells left
        n_predict = s.req.options.get("num_predict", -1)
        if n_predict is not None and n_predict >= 0:
            room = min(room, n_predict - len(s.generated) - 1)
        return max(0, room)

    def _sample(self, s: _Slot) -> None:
        """Choose the next token from the sequence's row, or verify its drafts
        row by row: every accepted draft is a token already in the cache."""
        req = s.req
        assert req is not None
        now = time.perf_counter()
        if s.t_first is None:
            s.t_first = now
        if req.options.get("num_predict", -1) == 0:
            self._finish(s, "length")
            return
        draft, s.draft = s.draft, []
        s.draft_count += len(draft)
        accepted = 0
        for j in range(len(draft) + 1):
            index = s.batch_row + j
            # The row as llama.cpp returned it: the sampler penalizes it in place.
            row = self.ctx.logits_row(index) if req.logprobs is not None else None
            undecided = s.reasoning is not None and s.reasoning.undecided
            if undecided and row is None:
                row = self.ctx.logits_row(index)  # kept: the token may have to be chosen again
            if j < len(draft) and s.sampler.can_verify:
                tok, hit = s.sampler.verify(self.ctx.ptr, index, draft[j])
            else:
                tok, hit = s.sampler.sample(self.ctx.ptr, index), False
            if s.reasoning is not None:
                tok, hit = self._follow_reasoning(s, tok, hit, index, row if undecided else None)
            if hit:
                accepted += 1
                s.draft_accepted += 1
            if self._take(s, tok, row):
                break
            if not hit:
                s.next_token = tok
                break
            s.cached.append(tok)
            s.n_past += 1
        if draft:
            if s.drafter is not None:
                s.drafter.record(len(draft), accepted)
            if accepted < len(draft) or s.req is None:
                self.ctx.seq_rm(s.seq, s.n_past, -1)  # the rejected drafts' KV entries
                if self.drafts is not None:
                    self.drafts.trim(s.seq, len(s.cached))

    def _follow_reasoning(self, s: _Slot, tok: int, hit: bool, index: int, row: Any) -> tuple[int, bool]:
        """The grammar of a reasoning reply waits for the reasoning to end; then
        its sampler takes over (and drafts stop: a grammar cannot verify them).
        A token that shows the reply does not reason at all is chosen again, under
        the grammar, from ``row`` (the logits before the sampler penalized them)."""
        assert s.reasoning is not None and s.answer_sampler is not None
        undecided = s.reasoning.undecided
        s.reasoning.add(self.model.token_bytes(tok).decode("utf-8", "replace"))
        if not s.reasoning.answering:
            return tok, hit
        s.answer_sampler.accept_prompt(s.generated)  # the penalties count the reply so far
        s.sampler.close()
        s.sampler, s.answer_sampler, s.reasoning, s.drafter = s.answer_sampler, None, None, None
        if not undecided:
            return tok, hit
        self.ctx.logits_view(index)[:] = row
        return s.sampler.sample(self.ctx.ptr, index), False

    def _take(self, s: _Slot, tok: int, row: Any) -> bool:
        """Add a chosen token (from logits ``row`` when logprobs are asked
        for) to the output; True if the request finished."""
        req = s.req
        assert req is not None
        if self.model.is_eog(tok):
            self._finish(s, "stop")
            return True
        s.generated.append(tok)
        if row is not None and req.logprobs is not None:
            s.logprobs.append(token_logprob(self.model, row, tok, req.logprobs))
        if s.drafter is not None:
            s.drafter.extend((tok,))
        s.text += s.decoder.decode(self.model.token_bytes(tok))
        if self._emit(s):
            return True
        n_predict = req.options.get("num_predict", -1)
        if (n_predict is not None and 0 <= n_predict <= len(s.generated)) or len(s.cached) + 1 >= self.num_ctx:
            self._finish(s, "length")
            return True
        return False

    def _emit(self, s: _Slot) -> bool:
        """Send the text that can no longer be part of a stop string; True if stopped."""
        assert s.req is not None
        if s.stops:
            start = max(0, s.emitted - s.max_stop)
            hits = [i for i in (s.text.find(st, start) for st in s.stops) if i >= 0]
            if hits:
                cut = min(hits)
                if cut > s.emitted:
                    s.req.handle._put(Chunk(s.text[s.emitted : cut], logprobs=self._logprobs(s)))
                s.text = s.text[:cut]
                s.emitted = cut
                self._finish(s, "stop", flush=False)
                return True
            safe = len(s.text)
            for st in s.stops:
                for k in range(min(len(st) - 1, len(s.text)), 0, -1):
                    if s.text.endswith(st[:k]):
                        safe = min(safe, len(s.text) - k)
                        break
        else:
            safe = len(s.text)
        if safe > s.emitted:
            s.req.handle._put(Chunk(s.text[s.emitted : safe], logprobs=self._logprobs(s)))
            s.emitted = safe
        return False

    @staticmethod
    def _logprobs(s: _Slot) -> list[dict[str, Any]] | None:
        """The entries of the tokens since the last chunk (None: not asked for)."""
        assert s.req is not None
        if s.req.logprobs is None:
            return None
        out, s.logprobs = s.logprobs, []
        return out

    def _finish(self, s: _Slot, reason: str, *, notify: bool = True, flush: bool = True) -> None:
        req = s.req
        assert req is not None
        if notify:
            if flush:
                s.text += s.decoder.decode(b"", final=True)
            tail = s.text[s.emitted :] if flush else ""
            now = time.perf_counter()
            first = s.t_first or now
            req.handle._put(
                Chunk(
                    tail,
                    done=True,
                    done_reason=reason,
                    prompt_tokens=len(req.keys),
                    prompt_eval_count=s.n_evaluated,
                    prompt_eval_duration=int((first - s.t_start) * 1e9),
                    eval_count=len(s.generated),
                    eval_duration=int((now - first) * 1e9),
                    tokens=list(s.generated),
                    draft_count=s.draft_count,
                    draft_accepted=s.draft_accepted,
                    logprobs=self._logprobs(s),
                )
            )
        self._free(s)

    def _free(self, s: _Slot) -> None:
        s.sampler.close()
        if s.answer_sampler is not None:
            s.answer_sampler.close()
            s.answer_sampler = None
        s.reasoning = None
        s.req = None
        s.pending = []
        s.later = []
        for fut in s.encoded.values():
            fut.cancel()
        s.encoded = {}
        s.next_token = None
        s.draft = []
        s.drafter = None
        s.last_used = time.monotonic()

    def _fail_all(self, error: EmberError) -> None:
        for s in self.slots:
            if s.req is not None:
                s.req.handle._put(error)
                self._free(s)
                self._forget(s)

    def _forget(self, s: _Slot) -> None:
        """Empty the sequence's cache (and its draft model's): after a failure its KV is not trusted."""
        self.ctx.seq_rm(s.seq)
        s.cached = []
        if self.drafts is not None:
            self.drafts.trim(s.seq, 0)
