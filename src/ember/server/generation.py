"""How one HTTP request runs on a model, whatever its API.

A route translates its request into :class:`GenerationRequest` objects and
calls :func:`start`, which checks their options, resolves the model name and
acquires the model from the manager (loading it in a runner when needed) and
submits them. The :class:`Generation` it returns gives the results
(:meth:`Generation.results`) or the chunks as they come
(:meth:`Generation.chunks`), which the route translates into its own wire
format; either way the generations are cancelled when the client goes away
and the model is released exactly once. Rendering and tokenizing happen in
the runner, never on the server's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from ember.errors import CancelledError, ModelNotFoundError, OptionError
from ember.images import base64_only
from ember.request import AsyncChunkStream, GenerationRequest, Result, StreamChunk
from ember.server.common import manager
from ember.server.manager import Entry, check_options, parse_keep_alive
from ember.server.runner import Runner

MAX_SEQUENCES = 64  # generations one HTTP request may ask for (OpenAI's n x prompts)


def _runner(entry: Entry) -> Runner:
    assert entry.runner is not None  # acquired entries are loaded
    return entry.runner


@dataclass
class Generation:
    """The generations of one HTTP request on one model, from acquire to release."""

    http: Request
    streams: list[AsyncChunkStream]
    load_duration: int  # ns spent getting the model (loading it when it was not)
    _stack: contextlib.AsyncExitStack = field(repr=False)

    async def results(self) -> list[Result]:
        """Every generation's result. The client hanging up meanwhile cancels them."""
        try:
            task = asyncio.ensure_future(asyncio.gather(*(s.result() for s in self.streams)))
            try:
                while True:
                    done, _ = await asyncio.wait({task}, timeout=0.5)
                    if done:
                        return [self._timed(r) for r in task.result()]
                    if await self.http.is_disconnected():
                        raise CancelledError("the client disconnected")
            finally:
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(BaseException):
                        await task
        finally:
            await self.close()

    async def chunks(self) -> AsyncIterator[tuple[int, StreamChunk]]:
        """(index of the generation, chunk) as they come; a closed stream
        (the client went away) cancels the generations."""
        try:
            async for i, c in _merge(self.streams):
                if c.result is not None:
                    c.result = self._timed(c.result)
                yield i, c
        finally:
            await self.close()

    async def close(self) -> None:
        """Cancel what still runs and release the model (once; then a no-op)."""
        await self._stack.aclose()

    def _timed(self, r: Result) -> Result:
        return r.with_load_duration(self.load_duration)


@contextlib.asynccontextmanager
async def _use(http: Request, model: str, options: dict[str, Any], keep_alive: Any) -> AsyncIterator[Entry]:
    """The manager's ``use``, with Ollama's not-found text for generation
    (clients match it to offer a pull; /api/show and friends keep theirs)."""
    entered = False
    try:
        async with manager(http).use(model, options, keep_alive) as entry:
            entered = True
            yield entry
    except ModelNotFoundError:
        if entered:
            raise
        raise ModelNotFoundError(f"model {json.dumps(model[:200], ensure_ascii=False)} not found, try pulling it first") from None


def _check_capabilities(model: str, entry: Entry, request: GenerationRequest) -> None:
    """Refuse what the model's template cannot take, in Ollama's words
    (clients match them to fall back, e.g. to prompting without tools)."""
    info = _runner(entry).info
    caps = info.capabilities if info is not None else []
    if request.tools and "tools" not in caps:
        raise OptionError(f"{entry.name} does not support tools")
    think = request.think
    # A request's own template is the runner's to judge (api.Model.think_of).
    if think not in (None, False, "", "false") and "thinking" not in caps and request.template is None:
        raise OptionError(f"{json.dumps(model, ensure_ascii=False)} does not support thinking")
    if request.suffix and request.template is None and "insert" not in caps:
        raise OptionError(f"{entry.name} does not support insert")


async def start(http: Request, model: str, requests: list[GenerationRequest], keep_alive: Any = None) -> Generation:
    """Acquire ``model`` and submit ``requests`` to it. Bad input raises here,
    before a response starts, and releases the model."""
    if len(requests) > MAX_SEQUENCES:
        raise OptionError(f"this request asks for {len(requests)} generations; at most {MAX_SEQUENCES} are allowed")
    for r in requests:
        r.options = check_options(r.options)
        _wire_images(r)
    stack = contextlib.AsyncExitStack()
    t0 = time.perf_counter()
    try:
        entry = await stack.enter_async_context(_use(http, model, requests[0].options, keep_alive))
        load_ns = int((time.perf_counter() - t0) * 1e9)
        for r in requests:
            _check_capabilities(model, entry, r)
        streams = []
        for r in requests:
            s = await _runner(entry).submit(r)
            stack.push_async_callback(s.aclose)
            streams.append(s)
    except BaseException:
        await stack.aclose()
        raise
    return Generation(http, streams, load_ns, stack)


async def render(http: Request, model: str, request: GenerationRequest, keep_alive: Any = None) -> str:
    """The prompt text ``request`` produces on ``model`` (``_debug_render_only``)."""
    request.options = check_options(request.options)
    _wire_images(request)
    async with _use(http, model, request.options, keep_alive) as entry:
        _check_capabilities(model, entry, request)
        return await _runner(entry).render(request)


def _wire_images(request: GenerationRequest) -> None:
    """A client's images are base64 (or base64 ``data:`` URLs), never paths:
    each becomes a ``data:`` URL, which the runner reads as base64 only."""
    if request.images:
        request.images = [base64_only(x, f"images[{i}]") for i, x in enumerate(request.images)]
    for j, m in enumerate(request.messages or []):
        if isinstance(m, dict) and m.get("images"):
            if not isinstance(m["images"], list):
                raise OptionError(f"messages[{j}].images must be a list of base64 images")
            m["images"] = [base64_only(x, f"messages[{j}].images[{i}]") for i, x in enumerate(m["images"])]


async def count_tokens(http: Request, model: str, request: GenerationRequest) -> int:
    """How many tokens ``request``'s prompt has on ``model`` (nothing is generated)."""
    request.options = check_options(request.options)
    _wire_images(request)
    async with _use(http, model, request.options, None) as entry:
        return await _runner(entry).count_tokens(request)


async def embed(
    http: Request, model: str, inputs: list[Any], *, truncate: bool, normalize: bool = True,
    options: Any = None, keep_alive: Any = None,
) -> tuple[list[list[float]], int, int, int]:
    """(vectors, tokens read, load ns, total ns) for texts or token id lists."""
    t0 = time.perf_counter()
    async with _use(http, model, check_options(options), keep_alive) as entry:
        load_ns = int((time.perf_counter() - t0) * 1e9)
        vecs, n = await _runner(entry).embed(inputs, truncate=truncate, normalize=normalize)
    return vecs, n, load_ns, int((time.perf_counter() - t0) * 1e9)


async def load_or_unload(http: Request, model: str, options: Any, keep_alive: Any) -> str:
    """A request without a prompt: load the model ("load"), or with
    keep_alive 0 unload it ("unload"), as Ollama does."""
    mgr = manager(http)
    checked = check_options(options)
    if parse_keep_alive(keep_alive) == 0:
        await mgr.unload(model)
        return "unload"
    async with _use(http, model, checked, keep_alive):
        return "load"


async def _merge(streams: list[AsyncChunkStream]) -> AsyncIterator[tuple[int, StreamChunk]]:
    """Interleave chunk streams as (index, chunk), as they arrive."""
    if len(streams) == 1:
        async for c in streams[0]:
            yield 0, c
        return
    q: asyncio.Queue[tuple[int, StreamChunk | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, stream: AsyncChunkStream) -> None:
        try:
            async for c in stream:
                await q.put((i, c))
        except BaseException as e:  # noqa: BLE001 - forwarded to the consumer
            await q.put((i, e))
        finally:
            await q.put((i, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            i, item = await q.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(BaseException):
                await t
