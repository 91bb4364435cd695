"""Ollama's generation API (generate, chat, embed, embeddings): the same
paths, fields and NDJSON streams, so the ``ollama`` client libraries and the
apps built on them work unchanged. Requests become GenerationRequests and
chunks become Ollama's lines; server/generation.py runs them."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request

from ember.errors import OptionError
from ember.request import GenerationRequest, Result
from ember.server import generation
from ember.server import schemas as s
from ember.server.common import manager, ndjson, now_iso

router = APIRouter(tags=["ollama"])


def _line(model: str, result: Result | None = None, **fields: Any) -> dict[str, Any]:
    """One line of a reply; the last (with ``result``) carries the metrics."""
    out = {"model": model, "created_at": now_iso(), **fields, "done": result is not None}
    if result is not None:
        out.update(done_reason=result.done_reason, total_duration=result.total_duration,
                   load_duration=result.load_duration, prompt_eval_count=result.prompt_eval_count,
                   prompt_eval_duration=result.prompt_eval_duration, eval_count=result.eval_count,
                   eval_duration=result.eval_duration, draft_count=result.draft_count,
                   draft_accepted=result.draft_accepted)
    return out


async def _loaded(request: Request, model: str, options: Any, keep_alive: Any, empty: dict[str, Any]) -> Any:
    reason = await generation.load_or_unload(request, model, options, keep_alive)
    return {"model": model, "created_at": now_iso(), **empty, "done": True, "done_reason": reason}


def _debug(model: str, text: str, empty: dict[str, Any]) -> dict[str, Any]:
    return {"model": model, "created_at": now_iso(), **empty, "done": False, "_debug_info": {"rendered_template": text}}


@router.post("/api/generate")
async def generate(body: s.GenerateRequest, request: Request) -> Any:
    """Complete a prompt (NDJSON stream unless ``"stream": false``)."""
    req = GenerationRequest(
        prompt=body.prompt or "", suffix=body.suffix or "", system=body.system, template=body.template,
        context=body.context, raw=body.raw, format=body.format or None, think=body.think,
        truncate=bool(body.truncate), images=body.images, options=body.options or {},
        logprobs=bool(body.logprobs), top_logprobs=body.top_logprobs or 0,
    )
    empty = {"response": ""}
    if body.debug_render_only:
        return _debug(body.model, await generation.render(request, body.model, req, body.keep_alive), empty)
    if not req.prompt and not req.suffix and not req.images:
        return await _loaded(request, body.model, body.options, body.keep_alive, empty)
    gen = await generation.start(request, body.model, [req], body.keep_alive)
    if not body.stream:
        (r,) = await gen.results()
        return _line(body.model, r, response=r.text, **_thinking(r.thinking), context=r.context,
                     **_logprobs(r.logprobs))

    async def lines() -> AsyncIterator[dict[str, Any]]:
        async for _, c in gen.chunks():
            if c.text or c.thinking or c.logprobs:
                yield _line(body.model, response=c.text, **_thinking(c.thinking), **_logprobs(c.logprobs))
            if c.result is not None:
                yield _line(body.model, c.result, response="", context=c.result.context)

    return ndjson(lines())


def messages_of(msgs: list[s.Message] | None) -> list[dict[str, Any]]:
    return [m.model_dump(exclude_none=True) for m in msgs or []]


def _thinking(text: str) -> dict[str, str]:
    """The ``thinking`` field, present only when there is reasoning (as Ollama's omitempty)."""
    return {"thinking": text} if text else {}


def _logprobs(entries: list[dict[str, Any]] | None) -> dict[str, Any]:
    """The ``logprobs`` field, present only when there are entries (Ollama's omitempty)."""
    return {"logprobs": entries} if entries else {}


def _message(text: str, tool_calls: list[dict[str, Any]] | None = None, thinking: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {"role": "assistant", "content": text, **_thinking(thinking)}
    if tool_calls:
        out["tool_calls"] = tool_calls
    return out


@router.post("/api/chat")
async def chat(body: s.ChatRequest, request: Request) -> Any:
    """Answer a conversation (NDJSON stream unless ``"stream": false``)."""
    req = GenerationRequest(
        messages=messages_of(body.messages), tools=body.tools or None, format=body.format or None, think=body.think,
        truncate=bool(body.truncate), options=body.options or {},
        logprobs=bool(body.logprobs), top_logprobs=body.top_logprobs or 0,
    )
    empty = {"message": _message("")}
    if body.debug_render_only:
        return _debug(body.model, await generation.render(request, body.model, req, body.keep_alive), empty)
    if not req.messages:
        return await _loaded(request, body.model, body.options, body.keep_alive, empty)
    gen = await generation.start(request, body.model, [req], body.keep_alive)
    if not body.stream:
        (r,) = await gen.results()
        return _line(body.model, r, message=r.message or _message(r.text), **_logprobs(r.logprobs))

    async def lines() -> AsyncIterator[dict[str, Any]]:
        async for _, c in gen.chunks():
            if c.text or c.thinking or c.tool_calls or c.logprobs:
                yield _line(body.model, message=_message(c.text, c.tool_calls, c.thinking), **_logprobs(c.logprobs))
            if c.result is not None:
                yield _line(body.model, c.result, **empty)

    return ndjson(lines())


def fit_dimensions(vec: list[float], dims: int | None) -> list[float]:
    """The first ``dims`` values, normalized again (Matryoshka-style truncation)."""
    if not dims:
        return vec
    if dims < 0 or dims > len(vec):
        raise OptionError(f"dimensions must be between 1 and {len(vec)}, got {dims}")
    cut = vec[:dims]
    n = math.sqrt(sum(x * x for x in cut))
    return [x / n for x in cut] if n > 0 else cut


@router.post("/api/embed")
async def embed(body: s.EmbedRequest, request: Request) -> Any:
    """Embeddings of one text or a list (L2-normalized)."""
    texts = ([body.input] if body.input != "" else []) if isinstance(body.input, str) else list(body.input)
    vecs, n, load_ns, total = await generation.embed(request, body.model, texts, truncate=body.truncate,
                                                     options=body.options, keep_alive=body.keep_alive)
    return {"model": body.model, "embeddings": [fit_dimensions(v, body.dimensions) for v in vecs],
            "total_duration": total, "load_duration": load_ns, "prompt_eval_count": n}


@router.post("/api/embeddings")
async def embeddings(body: s.EmbeddingsRequest, request: Request) -> Any:
    """The older endpoint: one prompt, an unnormalized embedding."""
    if not body.prompt:
        await manager(request).resolve(body.model)  # an unknown model is still a 404
        return {"embedding": []}
    vecs, _, _, _ = await generation.embed(request, body.model, [body.prompt], truncate=True, normalize=False,
                                           options=body.options, keep_alive=body.keep_alive)
    return {"embedding": vecs[0]}
