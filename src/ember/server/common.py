"""Helpers shared by the Ollama and OpenAI routes: timestamps, streaming
responses that stop generating when the client goes away, progress streams."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timezone
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from ember.errors import CancelledError, EmberError
from ember.server.manager import ModelManager


def manager(request: Request) -> ModelManager:
    return request.app.state.manager  # type: ignore[no-any-return]


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def iso(t: datetime | None) -> str:
    if t is None:
        return now_iso()
    return t.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def ndjson(lines: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    async def body() -> AsyncIterator[bytes]:
        async for obj in lines:
            yield (dumps(obj) + "\n").encode()

    return StreamingResponse(body(), media_type="application/x-ndjson")


def message_of(e: BaseException) -> str:
    if isinstance(e, EmberError):
        return e.message
    return f"internal error: {type(e).__name__}: {e}"


async def collect(request: Request, chunks: AsyncIterator[Any]) -> Any:
    """The final Result of a (non-streamed) generation. If the client hangs up
    meanwhile, the generation is cancelled and its sequence freed."""

    async def run() -> Any:
        async for c in chunks:
            if c.done and c.result is not None:
                return c.result
        raise EmberError("generation ended without a result")

    task = asyncio.ensure_future(run())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise CancelledError("the client disconnected")
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        with contextlib.suppress(Exception):
            await chunks.aclose()  # type: ignore[attr-defined]


async def with_progress(fn: Callable[[Any], Any]) -> AsyncIterator[dict[str, Any]]:
    """Run ``fn(progress)`` in a thread; yield Ollama-style status objects
    (``{"status", "total", "completed"}``), then ``{"status": "success"}`` or
    ``{"error": ...}``."""
    loop = asyncio.get_running_loop()
    q: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    last: dict[str, Any] = {"desc": None, "pct": -1, "t": 0.0}

    def progress(desc: str, completed: int, total: int) -> None:
        pct = int(completed * 100 / total) if total else 0
        now = time.monotonic()
        if desc == last["desc"] and pct == last["pct"] and now - last["t"] < 1.0:
            return
        last.update(desc=desc, pct=pct, t=now)
        item: dict[str, Any] = {"status": desc}
        if total:
            item.update(total=int(total), completed=int(completed))
        loop.call_soon_threadsafe(q.put_nowait, item)

    task = asyncio.ensure_future(asyncio.to_thread(fn, progress))
    try:
        while not task.done() or not q.empty():
            getter = asyncio.ensure_future(q.get())
            done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if getter in done:
                yield getter.result()
            else:
                getter.cancel()
        exc = task.exception()
        if exc is not None:
            yield {"error": message_of(exc)}
        else:
            yield {"status": "success"}
    finally:
        if not task.done():
            # A thread cannot be interrupted; let it finish in the background.
            task.add_done_callback(lambda t: t.exception())


def error_body(path: str, message: str, status: int) -> dict[str, Any]:
    """``{"error": "..."}`` (Ollama) or OpenAI's ``{"error": {"message", "type", ...}}`` under /v1."""
    if path.startswith("/v1"):
        kind = "invalid_request_error" if status < 500 else "api_error"
        if status == 404:
            kind = "not_found_error"
        return {"error": {"message": message, "type": kind, "param": None, "code": None}}
    return {"error": message}
