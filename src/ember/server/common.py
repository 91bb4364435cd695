"""Helpers shared by the API routes: timestamps, the two stream framings
(NDJSON for Ollama, server-sent events for OpenAI), progress streams and
error bodies."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from ember.errors import EmberError, OptionError
from ember.progress import BlobLabel
from ember.server.manager import ModelManager


def manager(request: Request) -> ModelManager:
    return request.app.state.manager  # type: ignore[no-any-return]


def now_iso() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def iso(t: datetime | None) -> str:
    if t is None:
        return now_iso()
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z")


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def ndjson(lines: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    """Ollama's stream: one JSON object per line; an error after the headers
    went out is an ``{"error": ...}`` line."""

    async def body() -> AsyncIterator[bytes]:
        try:
            async for obj in lines:
                yield (dumps(obj) + "\n").encode()
        except Exception as e:  # noqa: BLE001 - the status line is already sent: report in-stream
            yield (dumps({"error": message_of(e)}) + "\n").encode()

    return StreamingResponse(body(), media_type="application/x-ndjson")


def sse(events: AsyncIterator[dict[str, Any]], *, path: str = "/v1", named: bool = False) -> StreamingResponse:
    """Server-sent events. OpenAI's chat stream: ``data: {json}`` events, then
    ``data: [DONE]``. ``named`` (Anthropic's and the Responses API's streams):
    each event also named by its ``type`` (``event: message_start``), no
    ``[DONE]``. An error after the headers went out is an error event in the
    shape of ``path``'s API."""

    async def body() -> AsyncIterator[bytes]:
        try:
            async for obj in events:
                name = f"event: {obj['type']}\n" if named else ""
                yield f"{name}data: {dumps(obj)}\n\n".encode()
            if not named:
                yield b"data: [DONE]\n\n"
        except Exception as e:  # noqa: BLE001 - the status line is already sent: report in-stream
            status = e.status if isinstance(e, EmberError) else 500
            err = error_body(path, message_of(e), status)
            name = "event: error\n" if named else ""
            yield f"{name}data: {dumps({'type': 'error', **err} if named else err)}\n\n".encode()

    return StreamingResponse(body(), media_type="text/event-stream")


def message_of(e: BaseException) -> str:
    if isinstance(e, EmberError):
        return e.message
    return f"internal error: {type(e).__name__}: {e}"


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
        if isinstance(desc, BlobLabel):
            item["digest"] = desc.digest
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


ANTHROPIC_ERRORS = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                    503: "overloaded_error", 529: "overloaded_error"}


def error_body(path: str, message: str, status: int) -> dict[str, Any]:
    """``{"error": "..."}`` (Ollama), Anthropic's ``{"type": "error", "error":
    {"type", "message"}}`` under /v1/messages, or OpenAI's ``{"error":
    {"message", "type", ...}}`` elsewhere under /v1."""
    if path.startswith("/v1/messages"):
        kind = ANTHROPIC_ERRORS.get(status, "invalid_request_error" if status < 500 else "api_error")
        return {"type": "error", "error": {"type": kind, "message": message}}
    if path.startswith("/v1"):
        kind = "invalid_request_error" if status < 500 else "api_error"
        if status == 404:
            kind = "not_found_error"
        return {"error": {"message": message, "type": kind, "param": None, "code": None}}
    return {"error": message}


def function_tool(i: int, name: Any, description: Any, parameters: Any) -> dict[str, Any]:
    """A tool of a flat-tool API (Anthropic's, OpenAI Responses') as Ollama's
    function tool, which the chat templates render."""
    if not isinstance(name, str) or not name:
        raise OptionError(f"tools[{i}] needs a 'name'")
    return {"type": "function", "function": {
        "name": name, "description": description or "", "parameters": parameters or {"type": "object", "properties": {}}}}
