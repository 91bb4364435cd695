"""Anthropic's Messages API (``POST /v1/messages``), as Ollama serves it, so
the ``anthropic`` SDK and the tools built on it work against Ember.

A translator over server/generation.py: content blocks (text, tool_use,
tool_result, thinking) become Ollama-style messages, and the chunks become
Anthropic's message object or its named SSE events (message_start,
content_block_start/delta/stop, message_delta, message_stop). Errors have
Anthropic's shape (server/common.error_body). ``count_tokens`` counts the
rendered prompt with the model's tokenizer (Ollama estimates it).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request

from ember.errors import OptionError
from ember.request import GenerationRequest, Result
from ember.server import generation
from ember.server import schemas as s
from ember.server.common import function_tool, sse

router = APIRouter(prefix="/v1", tags=["anthropic"])


def _text_of(blocks: Any, where: str) -> str:
    """The text of a string or of a list of blocks (only text blocks count)."""
    if isinstance(blocks, str):
        return blocks
    if blocks is None:
        return ""
    if not isinstance(blocks, list):
        raise OptionError(f"{where} must be a string or a list of content blocks")
    parts = []
    for b in blocks:
        if isinstance(b, dict) and b.get("type") == "text":
            parts.append(str(b.get("text") or ""))
        elif isinstance(b, dict) and b.get("type") == "image":
            raise OptionError(f"{where}: image blocks are not supported here")
    return "".join(parts)


def _image(block: dict[str, Any], where: str) -> str:
    source = block.get("source")
    if not isinstance(source, dict) or source.get("type") != "base64" or not isinstance(source.get("data"), str):
        raise OptionError(f"{where}: an image block needs a base64 source ({{'type': 'base64', 'data': ...}})")
    return source["data"]


def messages_of(body: s.MessagesRequest) -> list[dict[str, Any]]:
    """Anthropic's system and messages as Ollama's messages: tool_use blocks
    become tool calls, tool_result blocks ``tool`` messages named after the
    call they answer, thinking blocks the message's thinking."""
    out: list[dict[str, Any]] = []
    system = _text_of(body.system, "system")
    if system:
        out.append({"role": "system", "content": system})
    names: dict[str, str] = {}
    for i, m in enumerate(body.messages):
        where = f"messages[{i}]"
        blocks = [{"type": "text", "text": m.content}] if isinstance(m.content, str) else m.content
        text, images, calls, results, thinking = [], [], [], [], ""
        for j, b in enumerate(blocks):
            kind = b.get("type") if isinstance(b, dict) else None
            at = f"{where}.content[{j}]"
            if kind == "text":
                text.append(str(b.get("text") or ""))
            elif kind == "image":
                images.append(_image(b, at))
            elif kind == "tool_use":
                if not b.get("id") or not b.get("name"):
                    raise OptionError(f"{at}: a tool_use block needs 'id' and 'name'")
                args = b.get("input") if b.get("input") is not None else {}
                if not isinstance(args, dict):
                    raise OptionError(f"{at}: tool_use input must be an object")
                names[str(b["id"])] = str(b["name"])
                calls.append({"id": str(b["id"]), "function": {"name": str(b["name"]), "arguments": args}})
            elif kind == "tool_result":
                call_id = str(b.get("tool_use_id") or "")
                result: dict[str, Any] = {"role": "tool", "content": _text_of(b.get("content"), f"{at}.content"),
                                          "tool_call_id": call_id}
                if call_id in names:
                    result["tool_name"] = names[call_id]
                results.append(result)
            elif kind in ("thinking", "redacted_thinking"):
                thinking = str(b.get("thinking") or "")
            else:
                raise OptionError(f"{at}: unknown content block type {kind!r}")
        if m.role == "user":
            out.extend(results)  # the results answer the previous turn's calls: they come first
        if text or images or calls or thinking:
            msg: dict[str, Any] = {"role": m.role, "content": "".join(text)}
            if images:
                msg["images"] = images
            if calls:
                msg["tool_calls"] = calls
            if thinking:
                msg["thinking"] = thinking
            out.append(msg)
        if m.role != "user":
            out.extend(results)
    return out


def _tools(body: s.MessagesRequest) -> list[dict[str, Any]] | None:
    if not body.tools or (body.tool_choice or {}).get("type") == "none":
        return None
    return [function_tool(i, t.get("name"), t.get("description"), t.get("input_schema")) for i, t in enumerate(body.tools)]


def _think(body: s.MessagesRequest) -> bool | None:
    """Anthropic's ``thinking``: "disabled" turns it off; "enabled" leaves the
    model's default, which is on for models that think and off (instead of
    an error, as Ollama relaxes it here) for those that cannot."""
    kind = (body.thinking or {}).get("type")
    return False if kind == "disabled" else None


def _format(body: s.MessagesRequest) -> dict[str, Any] | None:
    """Structured output: ``output_config.format`` ``{"type": "json_schema", "schema": ...}``."""
    fmt = (body.output_config or {}).get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
        raise OptionError("output_config.format must be {'type': 'json_schema', 'schema': {...}}")
    return fmt["schema"]


def request_of(body: s.MessagesRequest, *, counting: bool = False) -> GenerationRequest:
    if not counting and (body.max_tokens is None or body.max_tokens < 1):
        raise OptionError("max_tokens is required and must be positive")
    if not body.messages:
        raise OptionError("messages is required")
    options: dict[str, Any] = {} if counting else {"num_predict": body.max_tokens}
    for name in ("temperature", "top_p", "top_k"):
        if getattr(body, name) is not None:
            options[name] = getattr(body, name)
    if body.stop_sequences:
        options["stop"] = list(body.stop_sequences)
    return GenerationRequest(messages=messages_of(body), tools=_tools(body), think=_think(body), format=_format(body),
                             options=options)


def _stop_reason(r: Result, called: bool) -> str:
    if called:
        return "tool_use"
    return "max_tokens" if r.done_reason == "length" else "end_turn"


def _usage(r: Result) -> dict[str, int]:
    return {"input_tokens": r.prompt_tokens, "output_tokens": r.eval_count}


def _tool_use(call: dict[str, Any]) -> dict[str, Any]:
    fn = call.get("function") or {}
    args = fn.get("arguments")
    if isinstance(args, str):
        args = json.loads(args) if args.strip() else {}
    return {"type": "tool_use", "id": str(call.get("id") or f"toolu_{uuid.uuid4().hex[:24]}"),
            "name": str(fn.get("name") or ""), "input": args or {}}


def _message(msg_id: str, model: str, content: list[dict[str, Any]], stop: str | None,
             usage: dict[str, int]) -> dict[str, Any]:
    return {"id": msg_id, "type": "message", "role": "assistant", "model": model, "content": content,
            "stop_reason": stop, "stop_sequence": None, "usage": usage}


class _Blocks:
    """The content blocks of one streamed reply: each started, filled by
    deltas and stopped before the next begins, numbered in order."""

    def __init__(self) -> None:
        self.index = -1
        self.open: str | None = None  # "thinking" or "text"
        self.called = False

    def stop(self) -> list[dict[str, Any]]:
        if self.open is None:
            return []
        self.open = None
        return [{"type": "content_block_stop", "index": self.index}]

    def _start(self, block: dict[str, Any]) -> list[dict[str, Any]]:
        events = self.stop()
        self.index += 1
        return [*events, {"type": "content_block_start", "index": self.index, "content_block": block}]

    def delta(self, kind: str, text: str) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        if self.open != kind:
            start = {"type": "thinking", "thinking": "", "signature": ""} if kind == "thinking" \
                else {"type": "text", "text": ""}
            events = self._start(start)
            self.open = kind
        delta = {"type": "thinking_delta", "thinking": text} if kind == "thinking" else {"type": "text_delta", "text": text}
        return [*events, {"type": "content_block_delta", "index": self.index, "delta": delta}]

    def tool_use(self, call: dict[str, Any]) -> list[dict[str, Any]]:
        block = _tool_use(call)
        self.called = True
        events = self._start({**block, "input": {}})
        delta = {"type": "input_json_delta", "partial_json": json.dumps(block["input"], ensure_ascii=False)}
        return [*events, {"type": "content_block_delta", "index": self.index, "delta": delta},
                {"type": "content_block_stop", "index": self.index}]


@router.post("/messages/count_tokens")
async def count_tokens(body: s.MessagesRequest, request: Request) -> Any:
    """The prompt's tokens, exactly as the model's template and tokenizer make them."""
    return {"input_tokens": await generation.count_tokens(request, body.model, request_of(body, counting=True))}


@router.post("/messages")
async def messages(body: s.MessagesRequest, request: Request) -> Any:
    """Anthropic's Messages API: a message object, or its SSE events with ``stream``."""
    gen = await generation.start(request, body.model, [request_of(body)])
    msg_id = f"msg_{uuid.uuid4().hex[:24]}"
    if not body.stream:
        (r,) = await gen.results()
        content: list[dict[str, Any]] = []
        if r.thinking:
            content.append({"type": "thinking", "thinking": r.thinking, "signature": ""})
        text = str((r.message or {}).get("content") or "")
        if text:
            content.append({"type": "text", "text": text})
        content.extend(_tool_use(c) for c in r.tool_calls)
        return _message(msg_id, body.model, content, _stop_reason(r, bool(r.tool_calls)), _usage(r))

    async def events() -> AsyncIterator[dict[str, Any]]:
        yield {"type": "message_start",
               "message": _message(msg_id, body.model, [], None, {"input_tokens": 0, "output_tokens": 0})}
        blocks = _Blocks()
        async for _, c in gen.chunks():
            if c.thinking:
                for e in blocks.delta("thinking", c.thinking):
                    yield e
            if c.text:
                for e in blocks.delta("text", c.text):
                    yield e
            for call in c.tool_calls:
                for e in blocks.tool_use(call):
                    yield e
            if c.result is not None:
                for e in blocks.stop():
                    yield e
                yield {"type": "message_delta",
                       "delta": {"stop_reason": _stop_reason(c.result, blocks.called), "stop_sequence": None},
                       "usage": _usage(c.result)}
                yield {"type": "message_stop"}

    return sse(events(), path=request.url.path, named=True)
