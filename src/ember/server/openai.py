"""OpenAI's API (``/v1``): chat completions, completions, embeddings and
models, with SSE streams ending in ``data: [DONE]``, as the ``openai`` client
libraries expect. Chat and completions are one translation (requests in,
choices out) over server/generation.py."""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, Request

from ember.errors import ModelNotFoundError, OptionError
from ember.registry.listing import list_models
from ember.request import GenerationRequest, Result
from ember.server import generation
from ember.server import schemas as s
from ember.server.common import manager, sse
from ember.server.ollama import fit_dimensions, messages_of

router = APIRouter(prefix="/v1", tags=["openai"])
FINGERPRINT = "fp_ember"


def _options(body: s._Sampling, max_tokens: int | None) -> dict[str, Any]:
    """OpenAI's sampling fields under Ollama's option names."""
    o: dict[str, Any] = {}
    for name in ("temperature", "top_p", "frequency_penalty", "presence_penalty", "seed"):
        if getattr(body, name) is not None:
            o[name] = getattr(body, name)
    if body.stop is not None:
        o["stop"] = [body.stop] if isinstance(body.stop, str) else list(body.stop)
    if max_tokens is not None:
        if max_tokens < 1:
            raise OptionError(f"max_tokens must be at least 1, got {max_tokens}")
        o["num_predict"] = max_tokens
    return o


def think_of_effort(effort: Any) -> bool | str | None:
    """OpenAI's reasoning effort as Ollama's ``think``: "none" turns thinking
    off, "minimal" is "low", "xhigh" and above "high"; unset leaves the model's default."""
    if effort is None or effort == "":
        return None
    table: dict[str, bool | str] = {"none": False, "minimal": "low", "low": "low", "medium": "medium", "high": "high",
             "xhigh": "high", "ultra": "high", "max": "high"}
    if not isinstance(effort, str) or effort not in table:
        raise OptionError(f'invalid reasoning value: {effort!r} (must be "minimal", "low", "medium", "high", '
                          '"xhigh", "ultra", "max", or "none")')
    return table[effort]


def _choices(requests: list[GenerationRequest], n: int) -> list[GenerationRequest]:
    """``n`` choices of each request; each choice its own seed, so they differ."""
    out = []
    for r in requests:
        for i in range(n):
            seed = r.options.get("seed")
            if i and isinstance(seed, int) and seed >= 0:
                out.append(replace(r, options={**r.options, "seed": (seed + i) & 0xFFFFFFFF}))
            else:
                out.append(r)
    return out


def _openai_messages(msgs: list[s.Message]) -> list[dict[str, Any]]:
    """OpenAI's messages -> Ollama's: tool-call arguments from JSON strings to
    objects, tool results named after the call they answer."""
    out = messages_of(msgs)
    names: dict[str, str] = {}
    for m in out:
        _image_parts(m)
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


def _image_parts(message: dict[str, Any]) -> None:
    """A message's ``image_url`` content parts -> its ``images`` (before its
    text, as Ollama's OpenAI API puts them). Only ``data:`` URLs: the server
    fetches nothing."""
    parts = message.get("content")
    if not isinstance(parts, list):
        return
    images = list(message.get("images") or [])
    for part in parts:
        if not isinstance(part, dict) or part.get("type") != "image_url":
            continue
        spec = part.get("image_url")
        url = spec.get("url") if isinstance(spec, dict) else spec
        if not isinstance(url, str) or not url:
            raise OptionError("image_url needs a 'url'")
        if not url.startswith("data:"):
            scheme = url.split(":", 1)[0] if ":" in url else "that"
            raise OptionError(f"image_url: the server does not fetch {scheme} URLs; send the image inline as a data: URL (data:image/png;base64,...)")
        images.append(url)
    if images:
        message["images"] = images
        message["content"] = [p for p in parts if not (isinstance(p, dict) and p.get("type") == "image_url")]


def _tool_calls(calls: list[dict[str, Any]], *, indexed: bool) -> list[dict[str, Any]]:
    """Ollama's calls (id, function.index) in OpenAI's shape: arguments as a JSON string."""
    out = []
    for i, call in enumerate(calls):
        fn = call.get("function", {})
        args = fn.get("arguments", {})
        out.append({"id": call.get("id") or f"call_{uuid.uuid4().hex[:24]}",
                    **({"index": fn.get("index", i)} if indexed else {}), "type": "function",
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


def _finish(r: Result) -> str:
    if r.tool_calls:
        return "tool_calls"
    return "length" if r.done_reason == "length" else "stop"


def openai_logprobs(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Logprob entries as OpenAI's chat and Responses APIs give them (``top_logprobs`` always a list)."""
    return [{**e, "top_logprobs": e.get("top_logprobs", [])} for e in entries]


def _chat_logprobs(entries: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    """A choice's ``logprobs`` in chat completions."""
    if entries is None:
        return None
    return {"content": openai_logprobs(entries), "refusal": None}


def _completion_logprobs(entries: list[dict[str, Any]] | None, offset: int) -> tuple[dict[str, Any] | None, int]:
    """A choice's ``logprobs`` in (legacy) completions: parallel lists, the
    alternatives as token -> logprob, each token's offset in the choice's
    text (from ``offset``); and the offset after these tokens."""
    if entries is None:
        return None, offset
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e.get("top_logprobs", [])} for e in entries],
            "text_offset": offsets}, offset


def _usage(results: list[Result], n: int) -> dict[str, int]:
    prompt = sum(r.prompt_tokens for r in results[::n])  # each prompt once, not once per choice
    completion = sum(r.eval_count for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _complete(http: Request, body: s._Sampling, requests: list[GenerationRequest], *, chat: bool,
                    echo: list[str]) -> Any:
    """Run a chat completion or a completion: ``body.n`` choices of each
    request, as one JSON object or an SSE stream of chunks."""
    gen = await generation.start(http, body.model, _choices(requests, body.n))
    kind = "chat.completion" if chat else "text_completion"
    head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", "object": kind,
            "created": int(time.time()), "model": body.model, "system_fingerprint": FINGERPRINT}

    offsets = [len(e) for e in echo]  # completions: where each choice's next token starts in its text

    def choice(i: int, text: str, finish: str | None, calls: list[dict[str, Any]], *, delta: bool,
               reasoning: str = "", logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        if not chat:
            lp, offsets[i] = _completion_logprobs(logprobs, offsets[i])
            return {"text": text, "index": i, "logprobs": lp, "finish_reason": finish}
        thought = {"reasoning": reasoning} if reasoning else {}  # Ollama's name for the thinking
        lp = _chat_logprobs(logprobs)
        if delta:
            part: dict[str, Any] = {"content": text} if text else {}
            if calls:
                part["tool_calls"] = _tool_calls(calls, indexed=True)
            return {"index": i, "delta": {**part, **thought}, "logprobs": lp, "finish_reason": finish}
        message = {"role": "assistant", "content": None, "tool_calls": _tool_calls(calls, indexed=False)} if calls \
            else {"role": "assistant", "content": text}
        return {"index": i, "message": {**message, **thought}, "logprobs": lp, "finish_reason": finish}

    if not body.stream:
        results = await gen.results()
        return {**head, "choices": [choice(i, echo[i] + r.text, _finish(r), r.tool_calls, delta=False,
                                           reasoning=r.thinking, logprobs=r.logprobs)
                                    for i, r in enumerate(results)], "usage": _usage(results, body.n)}
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    head["object"] = kind + ".chunk" if chat else kind

    def chunk(*choices: dict[str, Any]) -> dict[str, Any]:
        return {**head, "choices": list(choices), **({"usage": None} if include_usage else {})}

    async def events() -> AsyncIterator[dict[str, Any]]:
        if chat:
            for i in range(len(gen.streams)):
                yield chunk({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None})
        results: list[Result] = [Result("", "", "")] * len(gen.streams)
        started: set[int] = set()
        async for i, c in gen.chunks():
            text = c.text if i in started else echo[i] + c.text
            started.add(i)
            if text or c.thinking or c.tool_calls or c.logprobs:
                yield chunk(choice(i, text, None, c.tool_calls, delta=True, reasoning=c.thinking, logprobs=c.logprobs))
            if c.result is not None:
                results[i] = c.result
                yield chunk(choice(i, "", _finish(c.result), [], delta=True))
        if include_usage:
            yield {**chunk(), "usage": _usage(results, body.n)}

    return sse(events())


@router.post("/chat/completions")
async def chat_completions(body: s.ChatCompletionRequest, request: Request) -> Any:
    """OpenAI chat completions (SSE when ``stream``)."""
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    req = GenerationRequest(
        messages=_openai_messages(body.messages), format=_format(body.response_format),
        tools=body.tools if body.tools and body.tool_choice != "none" else None, options=_options(body, max_tokens),
        think=think_of_effort(body.reasoning_effort or (body.reasoning or {}).get("effort")),
        logprobs=bool(body.logprobs), top_logprobs=body.top_logprobs or 0,
    )
    if not req.messages:
        raise OptionError("messages must not be empty")
    if body.debug_render_only:
        return {"model": body.model, "_debug_info": {"rendered_template": await generation.render(request, body.model, req)}}
    return await _complete(request, body, [req], chat=True, echo=[""] * body.n)


@router.post("/completions")
async def completions(body: s.CompletionRequest, request: Request) -> Any:
    """OpenAI (legacy) completions: one choice per prompt and per ``n``."""
    options = _options(body, body.max_tokens)
    prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
    if not prompts:
        raise OptionError("prompt must not be empty")
    reqs = [GenerationRequest(prompt=p, suffix=body.suffix or "", options=options, logprobs=body.logprobs is not None,
                              top_logprobs=body.logprobs or 0) for p in prompts]
    echo = [p if body.echo else "" for p in prompts for _ in range(body.n)]
    return await _complete(request, body, reqs, chat=False, echo=echo)


@router.post("/embeddings")
async def embeddings(body: s.EmbeddingRequest, request: Request) -> Any:
    """OpenAI embeddings (L2-normalized; ``encoding_format`` float or base64)."""
    raw = body.input
    inputs: list[Any] = [raw] if isinstance(raw, str) or (raw and all(isinstance(x, int) for x in raw)) else list(raw)
    if not inputs:
        raise OptionError("input must not be empty")
    vecs, n, _, _ = await generation.embed(request, body.model, inputs, truncate=True)
    data = []
    for i, v in enumerate(vecs):
        v = fit_dimensions(v, body.dimensions)
        emb: Any = base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode() if body.encoding_format == "base64" else v
        data.append({"object": "embedding", "embedding": emb, "index": i})
    return {"object": "list", "data": data, "model": body.model, "usage": {"prompt_tokens": n, "total_tokens": n}}


def _model_obj(name: str, created: Any) -> dict[str, Any]:
    ts = int(created.timestamp()) if created is not None else int(time.time())
    return {"id": name, "object": "model", "created": ts, "owned_by": "library"}


@router.get("/models")
async def models() -> Any:
    """Models in the registry."""
    entries = await asyncio.to_thread(list_models)
    return {"object": "list", "data": [_model_obj(e.name, e.modified_at) for e in entries]}


@router.get("/models/{model:path}")
async def model(model: str, request: Request) -> Any:
    """One model (404 when unknown)."""
    try:
        r = await manager(request).resolve(model)
    except (ModelNotFoundError, OptionError):
        raise ModelNotFoundError(f"model '{model}' not found") from None
    return _model_obj(model, r.modified_at)  # the name as asked for, as Ollama echoes it
