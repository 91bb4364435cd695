"""OpenAI's API (``/v1``): chat completions, completions, embeddings and
models, with SSE streams ending in ``data: [DONE]``, as the ``openai`` client
libraries expect. Generation goes through the same scheduler as Ollama's API."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import struct
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from ember.errors import EmberError, ModelNotFoundError, OptionError
from ember.server import schemas as s
from ember.server.common import collect, dumps, error_body, manager, message_of
from ember.server.manager import check_options
from ember.server.ollama import _acquire, _resolve_or_404, embed_texts, messages_of

router = APIRouter(prefix="/v1", tags=["openai"])
FINGERPRINT = "fp_ember"


def _options(body: s._Sampling, max_tokens: int | None) -> dict[str, Any]:
    o: dict[str, Any] = {}
    if body.temperature is not None:
        o["temperature"] = body.temperature
    if body.top_p is not None:
        o["top_p"] = body.top_p
    if body.frequency_penalty is not None:
        o["frequency_penalty"] = body.frequency_penalty
    if body.presence_penalty is not None:
        o["presence_penalty"] = body.presence_penalty
    if body.seed is not None:
        o["seed"] = body.seed
    if body.stop is not None:
        o["stop"] = [body.stop] if isinstance(body.stop, str) else list(body.stop)
    if max_tokens is not None:
        if max_tokens < 1:
            raise OptionError(f"max_tokens must be at least 1, got {max_tokens}")
        o["num_predict"] = max_tokens
    return check_options(o)


def _seeded(options: dict[str, Any], i: int) -> dict[str, Any]:
    """Choice ``i`` of ``n``: a different seed, so the choices differ."""
    if i and options.get("seed") is not None and options["seed"] >= 0:
        return {**options, "seed": (options["seed"] + i) & 0xFFFFFFFF}
    return options


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _sse_error(e: Exception) -> bytes:
    """An error after the headers went out: OpenAI's error object as an event."""
    status = e.status if isinstance(e, EmberError) else 500
    return _sse(error_body("/v1", message_of(e), status))


async def _close_streams(streams: list[Any]) -> None:
    for st in streams:
        with contextlib.suppress(Exception):
            await st.aclose()


def _sse(obj: Any) -> bytes:
    return f"data: {dumps(obj)}\n\n".encode()


def _openai_messages(msgs: list[s.Message]) -> list[dict[str, Any]]:
    """OpenAI's messages -> Ollama's: tool-call arguments from JSON strings to
    objects, tool results named after the call they answer."""
    out = messages_of(msgs)
    names: dict[str, str] = {}
    for m in out:
        for call in m.get("tool_calls") or []:
            fn = call.get("function") if isinstance(call, dict) else None
            if not isinstance(fn, dict):
                raise OptionError("tool_calls[].function must be an object")
            args = fn.get("arguments")
            if isinstance(args, str):
                try:
                    fn["arguments"] = json.loads(args) if args.strip() else {}
                except json.JSONDecodeError:
                    raise OptionError(f"tool_calls: arguments of {fn.get('name')!r} are not valid JSON") from None
            if call.get("id") and fn.get("name"):
                names[str(call["id"])] = str(fn["name"])
        if m.get("role") == "tool" and m.get("tool_call_id") in names and "tool_name" not in m:
            m["tool_name"] = names[m["tool_call_id"]]
    return out


def _tool_calls(message: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for i, call in enumerate(message.get("tool_calls") or []):
        fn = call.get("function", {})
        args = fn.get("arguments", {})
        out.append({"id": f"call_{uuid.uuid4().hex[:24]}", "index": i, "type": "function",
                    "function": {"name": fn.get("name", ""),
                                 "arguments": args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)}})
    return out


def _format(rf: s.ResponseFormat | None) -> Any:
    if rf is None or rf.type == "text":
        return None
    if rf.type == "json_object":
        return "json"
    if rf.json_schema is None or not isinstance(rf.json_schema.schema_, dict):
        raise OptionError("response_format: json_schema needs a 'json_schema': {'name', 'schema'} object")
    return rf.json_schema.schema_


async def _merge(streams: list[AsyncIterator[Any]]) -> AsyncIterator[tuple[int, Any]]:
    """Interleave several chunk streams as (index, chunk), as they arrive."""
    q: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
    done = object()

    async def pump(i: int, st: AsyncIterator[Any]) -> None:
        try:
            async for c in st:
                await q.put((i, c))
        except BaseException as e:  # noqa: BLE001 - forwarded to the consumer
            await q.put((i, e))
        finally:
            await q.put((i, done))

    tasks = [asyncio.ensure_future(pump(i, st)) for i, st in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            i, item = await q.get()
            if item is done:
                remaining -= 1
                continue
            if isinstance(item, BaseException):
                raise item
            yield i, item
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(BaseException):
                await t
        for st in streams:
            with contextlib.suppress(Exception):
                await st.aclose()  # type: ignore[attr-defined]


# --- chat completions --------------------------------------------------------------------
@router.post("/chat/completions")
async def chat_completions(body: s.ChatCompletionRequest, request: Request) -> Any:
    """OpenAI chat completions (SSE when ``stream``)."""
    if not body.model:
        raise OptionError("model is required")
    options = _options(body, body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens)
    fmt = _format(body.response_format)
    messages = _openai_messages(body.messages)
    tools = body.tools if body.tools and body.tool_choice != "none" else None
    if not messages:
        raise OptionError("messages must not be empty")
    entry, ka, _ = await _acquire(request, body.model, options, None)
    mgr = manager(request)
    streams: list[AsyncIterator[Any]] = []
    try:
        if body.debug_render_only:
            text = entry.model.render_chat(messages, tools=tools)
            mgr.release(entry, ka)
            return {"model": body.model, "_debug_info": {"rendered_template": text}}
        for i in range(body.n):
            streams.append(await entry.model.achat(messages, tools=tools, format=fmt, options=_seeded(options, i),
                                                   stream=True))
    except BaseException:
        for st in streams:
            with contextlib.suppress(Exception):
                await st.aclose()  # type: ignore[attr-defined]
        mgr.release(entry, ka)
        raise
    cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    created = int(time.time())

    def finish(r: Any) -> str:
        if r.tool_calls:
            return "tool_calls"
        return "length" if r.done_reason == "length" else "stop"

    if not body.stream:
        try:
            results = await asyncio.gather(*(collect(request, st) for st in streams))
        finally:
            mgr.release(entry, ka)
        choices = []
        for i, r in enumerate(results):
            msg: dict[str, Any] = {"role": "assistant", "content": r.text}
            if r.tool_calls:
                msg = {"role": "assistant", "content": None, "tool_calls": _tool_calls(r.message or {})}
                for c in msg["tool_calls"]:
                    c.pop("index", None)
            choices.append({"index": i, "message": msg, "logprobs": None, "finish_reason": finish(r)})
        return {"id": cid, "object": "chat.completion", "created": created, "model": body.model,
                "system_fingerprint": FINGERPRINT, "choices": choices,
                "usage": _usage(results[0].prompt_tokens, sum(r.eval_count for r in results))}

    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(choices: list[dict[str, Any]], usage: Any = None) -> dict[str, Any]:
        out = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": body.model,
               "system_fingerprint": FINGERPRINT, "choices": choices}
        if include_usage:
            out["usage"] = usage
        return out

    async def events() -> AsyncIterator[bytes]:
        prompt_tokens = completion_tokens = 0
        try:
            for i in range(body.n):
                yield _sse(chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                   "finish_reason": None}]))
            async for i, c in _merge(streams):
                r = c.result if c.done else None
                if c.text and not tools:
                    yield _sse(chunk([{"index": i, "delta": {"content": c.text}, "logprobs": None, "finish_reason": None}]))
                if r is not None:
                    prompt_tokens = r.prompt_tokens
                    completion_tokens += r.eval_count
                    if tools:  # buffered: a call or plain text is known only at the end
                        delta: dict[str, Any] = {"tool_calls": _tool_calls(r.message or {})} if r.tool_calls \
                            else {"content": r.text}
                        yield _sse(chunk([{"index": i, "delta": delta, "logprobs": None, "finish_reason": None}]))
                    yield _sse(chunk([{"index": i, "delta": {}, "logprobs": None, "finish_reason": finish(r)}]))
            if include_usage:
                yield _sse(chunk([], _usage(prompt_tokens, completion_tokens)))
            yield b"data: [DONE]\n\n"
        except Exception as e:  # noqa: BLE001 - headers are sent: report in-stream
            yield _sse_error(e)
        finally:
            await _close_streams(streams)
            mgr.release(entry, ka)

    return StreamingResponse(events(), media_type="text/event-stream")


# --- completions ---------------------------------------------------------------------------
@router.post("/completions")
async def completions(body: s.CompletionRequest, request: Request) -> Any:
    """OpenAI (legacy) completions: one choice per prompt and per ``n``."""
    if not body.model:
        raise OptionError("model is required")
    options = _options(body, body.max_tokens)
    prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
    if not prompts:
        raise OptionError("prompt must not be empty")
    entry, ka, _ = await _acquire(request, body.model, options, None)
    mgr = manager(request)
    streams: list[AsyncIterator[Any]] = []
    try:
        for p in prompts:
            for i in range(body.n):
                streams.append(await entry.model.agenerate(p, suffix=body.suffix or "", options=_seeded(options, i),
                                                           stream=True))
    except BaseException:
        for st in streams:
            with contextlib.suppress(Exception):
                await st.aclose()  # type: ignore[attr-defined]
        mgr.release(entry, ka)
        raise
    cid = f"cmpl-{uuid.uuid4().hex[:24]}"
    created = int(time.time())

    def prefix(idx: int) -> str:
        return prompts[idx // body.n] if body.echo else ""

    if not body.stream:
        try:
            results = await asyncio.gather(*(collect(request, st) for st in streams))
        finally:
            mgr.release(entry, ka)
        choices = [{"text": prefix(i) + r.text, "index": i, "logprobs": None,
                    "finish_reason": "length" if r.done_reason == "length" else "stop"} for i, r in enumerate(results)]
        return {"id": cid, "object": "text_completion", "created": created, "model": body.model,
                "system_fingerprint": FINGERPRINT, "choices": choices,
                "usage": _usage(sum(r.prompt_tokens for r in results[:: body.n]), sum(r.eval_count for r in results))}

    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(choices: list[dict[str, Any]], usage: Any = None) -> dict[str, Any]:
        out = {"id": cid, "object": "text_completion", "created": created, "model": body.model,
               "system_fingerprint": FINGERPRINT, "choices": choices}
        if include_usage:
            out["usage"] = usage
        return out

    async def events() -> AsyncIterator[bytes]:
        prompt_tokens = completion_tokens = 0
        started: set[int] = set()
        try:
            async for i, c in _merge(streams):
                text = c.text
                if i not in started:
                    started.add(i)
                    text = prefix(i) + text
                if text:
                    yield _sse(chunk([{"text": text, "index": i, "logprobs": None, "finish_reason": None}]))
                if c.done and c.result is not None:
                    r = c.result
                    if i % body.n == 0:
                        prompt_tokens += r.prompt_tokens
                    completion_tokens += r.eval_count
                    yield _sse(chunk([{"text": "", "index": i, "logprobs": None,
                                       "finish_reason": "length" if r.done_reason == "length" else "stop"}]))
            if include_usage:
                yield _sse(chunk([], _usage(prompt_tokens, completion_tokens)))
            yield b"data: [DONE]\n\n"
        except Exception as e:  # noqa: BLE001 - headers are sent: report in-stream
            yield _sse_error(e)
        finally:
            await _close_streams(streams)
            mgr.release(entry, ka)

    return StreamingResponse(events(), media_type="text/event-stream")


# --- embeddings ------------------------------------------------------------------------------
@router.post("/embeddings")
async def embeddings(body: s.EmbeddingRequest, request: Request) -> Any:
    """OpenAI embeddings (L2-normalized; ``encoding_format`` float or base64)."""
    if not body.model:
        raise OptionError("model is required")
    raw = body.input
    if isinstance(raw, str):
        items: list[Any] = [raw]
    elif raw and all(isinstance(x, int) for x in raw):
        items = [raw]
    else:
        items = list(raw)
    if not items:
        raise OptionError("input must not be empty")
    texts: list[str] = []
    needs_model = any(not isinstance(x, str) for x in items)
    if needs_model:
        entry, ka, _ = await _acquire(request, body.model, {}, None)
        try:
            n_vocab = entry.model.engine.n_vocab
            for x in items:
                if isinstance(x, str):
                    texts.append(x)
                    continue
                if any(not 0 <= t < n_vocab for t in x):
                    raise OptionError(f"input: a token id is out of range (vocabulary size {n_vocab})")
                texts.append(entry.model.detokenize(list(x)))
        finally:
            manager(request).release(entry, ka)
    else:
        texts = list(items)
    vecs, n_tokens, _, _ = await embed_texts(request, body.model, texts, truncate=True, options={}, keep_alive=None)
    from ember.server.ollama import _fit_dimensions

    data = []
    for i, v in enumerate(vecs):
        v = _fit_dimensions(v, body.dimensions)
        emb: Any = v
        if body.encoding_format == "base64":
            emb = base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode()
        data.append({"object": "embedding", "embedding": emb, "index": i})
    return {"object": "list", "data": data, "model": body.model,
            "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}


# --- models ------------------------------------------------------------------------------------
def _model_obj(name: str, created: Any) -> dict[str, Any]:
    ts = int(created.timestamp()) if created is not None else int(time.time())
    return {"id": name, "object": "model", "created": ts, "owned_by": "library"}


@router.get("/models")
async def models() -> Any:
    """Models in the registry."""
    from ember.registry import list_models

    entries = await asyncio.to_thread(list_models)
    return {"object": "list", "data": [_model_obj(e.name, e.modified_at) for e in entries]}


@router.get("/models/{model:path}")
async def model(model: str) -> Any:
    """One model (404 when unknown)."""
    try:
        r = await _resolve_or_404(model)
    except (ModelNotFoundError, OptionError):
        raise ModelNotFoundError(f"model '{model}' not found") from None
    return _model_obj(model if ":" in model or "/" in model else r.name, r.modified_at)
