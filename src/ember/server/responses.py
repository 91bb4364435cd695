"""OpenAI's Responses API (``POST /v1/responses``), as Ollama serves it, so
the ``openai`` SDK's ``responses.create`` works against Ember.

A translator over server/generation.py: input items (messages,
function_call, function_call_output, reasoning) become Ollama-style
messages, ``instructions`` the system message; the chunks become the
response object with its output items (reasoning, message, function_call),
or the named SSE events of a streamed response. Nothing is stored:
``previous_response_id`` is refused. With ``include``
``message.output_text.logprobs``, the message text carries the entries of
the tokens generated; those of tokens outside it (reasoning, a tool call)
go with the message text that follows them.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request

from ember.errors import OptionError
from ember.request import GenerationRequest, Result
from ember.server import generation
from ember.server import schemas as s
from ember.server.common import function_tool, sse
from ember.server.openai import openai_logprobs, think_of_effort

router = APIRouter(prefix="/v1", tags=["openai"])


def _content(content: Any, where: str) -> tuple[str, list[str]]:
    """(text, base64 images) of a message's content: a string or content parts."""
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise OptionError(f"{where}.content must be a string or a list of content parts")
    text, images = [], []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text"):
            text.append(str(part.get("text") or ""))
        elif kind == "input_image":
            url = part.get("image_url")
            if not isinstance(url, str) or not url.startswith("data:") or "," not in url:
                raise OptionError(f"{where}.content[{j}]: only base64 data: URLs are supported for images")
            images.append(url.split(",", 1)[1])
        elif kind == "refusal":
            text.append(str(part.get("refusal") or ""))
        else:
            raise OptionError(f"{where}.content[{j}]: content type {kind!r} is not supported")
    return "".join(text), images


def messages_of(body: s.ResponsesRequest) -> list[dict[str, Any]]:
    """``instructions`` and ``input`` as Ollama's messages. A function_call
    joins the assistant message before it; its output becomes a ``tool``
    message named after the call; reasoning goes with the next assistant turn."""
    out: list[dict[str, Any]] = []
    if body.instructions:
        out.append({"role": "system", "content": body.instructions})
    if isinstance(body.input, str):
        return [*out, {"role": "user", "content": body.input}]
    names: dict[str, str] = {}
    thinking = ""
    for i, item in enumerate(body.input):
        where = f"input[{i}]"
        kind = item.get("type") or ("message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise OptionError(f"{where}: unknown role {role!r}")
            text, images = _content(item.get("content"), where)
            msg: dict[str, Any] = {"role": "system" if role == "developer" else role, "content": text}
            if images:
                msg["images"] = images
            if role == "assistant" and thinking:
                msg["thinking"], thinking = thinking, ""
            out.append(msg)
        elif kind == "function_call":
            name, call_id, raw = item.get("name"), str(item.get("call_id") or ""), item.get("arguments") or ""
            if not isinstance(name, str) or not name:
                raise OptionError(f"{where}: a function_call needs a 'name'")
            try:
                args = json.loads(raw) if isinstance(raw, str) and raw.strip() else {}
            except json.JSONDecodeError:
                raise OptionError(f"{where}: the arguments of {name!r} are not valid JSON") from None
            names[call_id] = name
            call = {"id": call_id, "function": {"name": name, "arguments": args}}
            if not out or out[-1]["role"] != "assistant":
                out.append({"role": "assistant", "content": ""})
            out[-1].setdefault("tool_calls", []).append(call)
            if thinking:
                out[-1]["thinking"], thinking = thinking, ""
        elif kind == "function_call_output":
            call_id = str(item.get("call_id") or "")
            output = item.get("output")
            text = output if isinstance(output, str) else _content(output, where)[0]
            msg = {"role": "tool", "content": text, "tool_call_id": call_id}
            if call_id in names:
                msg["tool_name"] = names[call_id]
            out.append(msg)
        elif kind == "reasoning":
            summary = item.get("summary") or []
            thinking = item.get("encrypted_content") or "".join(
                str(p.get("text") or "") for p in summary if isinstance(p, dict))
        else:
            raise OptionError(f"{where}: input item type {kind!r} is not supported")
    return out


def _tools(body: s.ResponsesRequest) -> list[dict[str, Any]] | None:
    if not body.tools or body.tool_choice == "none":
        return None
    out = []
    for i, t in enumerate(body.tools):
        if t.get("type") != "function":
            raise OptionError(f"tools[{i}]: tool type {t.get('type')!r} is not supported (only 'function')")
        out.append(function_tool(i, t.get("name"), t.get("description"), t.get("parameters")))
    return out


def _format(body: s.ResponsesRequest) -> Any:
    fmt = (body.text or {}).get("format") or {}
    kind = fmt.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return "json"
    if kind == "json_schema" and isinstance(fmt.get("schema"), dict):
        return fmt["schema"]
    raise OptionError("text.format must be {'type': 'text'}, {'type': 'json_object'} or "
                      "{'type': 'json_schema', 'name', 'schema'}")


def request_of(body: s.ResponsesRequest) -> GenerationRequest:
    if body.previous_response_id:
        raise OptionError("previous_response_id is not supported: responses are not stored; send the whole input")
    options: dict[str, Any] = {}
    for name in ("temperature", "top_p"):
        if getattr(body, name) is not None:
            options[name] = getattr(body, name)
    if body.max_output_tokens is not None:
        if body.max_output_tokens < 1:
            raise OptionError(f"max_output_tokens must be at least 1, got {body.max_output_tokens}")
        options["num_predict"] = body.max_output_tokens
    msgs = messages_of(body)
    if not msgs:
        raise OptionError("input must not be empty")
    return GenerationRequest(messages=msgs, tools=_tools(body), format=_format(body),
                             think=think_of_effort((body.reasoning or {}).get("effort")), options=options,
                             logprobs=LOGPROBS in (body.include or []), top_logprobs=body.top_logprobs or 0)


def _usage(r: Result) -> dict[str, Any]:
    return {"input_tokens": r.prompt_tokens, "output_tokens": r.eval_count,
            "total_tokens": r.prompt_tokens + r.eval_count,
            "input_tokens_details": {"cached_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0}}


LOGPROBS = "message.output_text.logprobs"  # what ``include`` names to get them


def _text_part(text: str, logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": openai_logprobs(logprobs or [])}


def _function_call(call: dict[str, Any], item_id: str, status: str = "completed") -> dict[str, Any]:
    fn = call.get("function") or {}
    args = fn.get("arguments", {})
    return {"id": item_id, "type": "function_call", "status": status,
            "call_id": str(call.get("id") or f"call_{uuid.uuid4().hex[:24]}"), "name": str(fn.get("name") or ""),
            "arguments": args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)}


def _reasoning(item_id: str, text: str) -> dict[str, Any]:
    return {"id": item_id, "type": "reasoning", "summary": [{"type": "summary_text", "text": text}],
            "encrypted_content": text}


def _message(item_id: str, text: str, status: str = "completed",
             logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"id": item_id, "type": "message", "status": status, "role": "assistant",
            "content": [_text_part(text, logprobs)]}


class _Response:
    """The response object of one request, and its streamed events in order."""

    def __init__(self, body: s.ResponsesRequest) -> None:
        self.body = body
        self.id = f"resp_{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.output: list[dict[str, Any]] = []
        self.seq = 0
        self.open: dict[str, Any] | None = None  # the reasoning or message item being streamed
        self.logprobs: list[dict[str, Any]] = []  # entries not yet given to a message text

    def _item_id(self, prefix: str) -> str:
        return f"{prefix}_{self.id.removeprefix('resp_')}_{len(self.output)}"

    def obj(self, status: str, usage: dict[str, Any] | None = None) -> dict[str, Any]:
        b = self.body
        fmt = (b.text or {}).get("format") or {"type": "text"}
        reasoning = {k: v for k, v in (b.reasoning or {}).items() if k in ("effort", "summary")} or None
        return {
            "id": self.id, "object": "response", "created_at": self.created,
            "completed_at": int(time.time()) if status == "completed" else None, "status": status,
            "incomplete_details": None, "model": b.model, "previous_response_id": None,
            "instructions": b.instructions, "output": list(self.output), "error": None,
            "tools": b.tools or [], "tool_choice": b.tool_choice or "auto", "truncation": b.truncation or "disabled",
            "parallel_tool_calls": True, "text": {"format": fmt},
            "top_p": 1.0 if b.top_p is None else b.top_p, "presence_penalty": 0, "frequency_penalty": 0,
            "top_logprobs": b.top_logprobs or 0, "temperature": 1.0 if b.temperature is None else b.temperature,
            "reasoning": reasoning, "usage": usage, "max_output_tokens": b.max_output_tokens,
            "max_tool_calls": None, "store": False, "background": False, "service_tier": "default",
            "metadata": b.metadata or {}, "safety_identifier": None, "prompt_cache_key": None,
        }

    def complete(self, r: Result) -> dict[str, Any]:
        """The whole response of a finished generation (not streamed)."""
        if r.thinking:
            self.output.append(_reasoning(self._item_id("rs"), r.thinking))
        text = str((r.message or {}).get("content") or "")
        if text or not r.tool_calls:
            self.output.append(_message(self._item_id("msg"), text, logprobs=r.logprobs))
        for call in r.tool_calls:
            self.output.append(_function_call(call, self._item_id("fc")))
        return self.obj("completed", _usage(r))

    # --- streaming ---------------------------------------------------------------
    def event(self, kind: str, **data: Any) -> dict[str, Any]:
        self.seq += 1
        return {"type": kind, "sequence_number": self.seq - 1, **data}

    def start(self) -> list[dict[str, Any]]:
        return [self.event("response.created", response=self.obj("in_progress")),
                self.event("response.in_progress", response=self.obj("in_progress"))]

    def close(self) -> list[dict[str, Any]]:
        """Finish the open reasoning or message item."""
        item, self.open = self.open, None
        if item is None:
            return []
        at = len(self.output)
        if item["type"] == "reasoning":
            done = _reasoning(item["id"], item["text"])
            events = [self.event("response.reasoning_summary_text.done", item_id=item["id"], output_index=at,
                                 summary_index=0, text=item["text"])]
        else:
            item["logprobs"] += self.logprobs  # the entries of tokens after its last text
            self.logprobs = []
            done = _message(item["id"], item["text"], logprobs=item["logprobs"])
            ids = {"item_id": item["id"], "output_index": at, "content_index": 0}
            events = [self.event("response.output_text.done", **ids, text=item["text"],
                                 logprobs=openai_logprobs(item["logprobs"])),
                      self.event("response.content_part.done", **ids, part=_text_part(item["text"], item["logprobs"]))]
        self.output.append(done)
        return [*events, self.event("response.output_item.done", output_index=at, item=done)]

    def delta(self, kind: str, text: str) -> list[dict[str, Any]]:
        """Reasoning or message text as it comes."""
        events: list[dict[str, Any]] = []
        if self.open is None or self.open["type"] != kind:
            events = self.close()
            at = len(self.output)
            if kind == "reasoning":
                self.open = {"type": kind, "id": self._item_id("rs"), "text": ""}
                events.append(self.event("response.output_item.added", output_index=at,
                                         item={"id": self.open["id"], "type": "reasoning", "summary": []}))
            else:
                self.open = {"type": kind, "id": self._item_id("msg"), "text": "", "logprobs": []}
                ids = {"item_id": self.open["id"], "output_index": at, "content_index": 0}
                events += [self.event("response.output_item.added", output_index=at,
                                      item={**_message(self.open["id"], "", "in_progress"), "content": []}),
                           self.event("response.content_part.added", **ids, part=_text_part(""))]
        self.open["text"] += text
        at = len(self.output)
        if kind == "reasoning":
            return [*events, self.event("response.reasoning_summary_text.delta", item_id=self.open["id"],
                                        output_index=at, summary_index=0, delta=text)]
        entries, self.logprobs = self.logprobs, []
        self.open["logprobs"] += entries
        return [*events, self.event("response.output_text.delta", item_id=self.open["id"], output_index=at,
                                    content_index=0, delta=text, logprobs=openai_logprobs(entries))]

    def function_call(self, call: dict[str, Any]) -> list[dict[str, Any]]:
        events = self.close()
        at = len(self.output)
        item = _function_call(call, self._item_id("fc"))
        self.output.append(item)
        ids = {"item_id": item["id"], "output_index": at}
        return [*events,
                self.event("response.output_item.added", output_index=at,
                           item={**item, "status": "in_progress", "arguments": ""}),
                self.event("response.function_call_arguments.delta", **ids, delta=item["arguments"]),
                self.event("response.function_call_arguments.done", **ids, arguments=item["arguments"]),
                self.event("response.output_item.done", output_index=at, item=item)]

    def finish(self, r: Result) -> list[dict[str, Any]]:
        events = self.close()
        return [*events, self.event("response.completed", response=self.obj("completed", _usage(r)))]


@router.post("/responses")
async def responses(body: s.ResponsesRequest, request: Request) -> Any:
    """OpenAI's Responses API: a response object, or its SSE events with ``stream``."""
    gen = await generation.start(request, body.model, [request_of(body)])
    resp = _Response(body)
    if not body.stream:
        (r,) = await gen.results()
        return resp.complete(r)

    async def events() -> AsyncIterator[dict[str, Any]]:
        for e in resp.start():
            yield e
        async for _, c in gen.chunks():
            out: list[dict[str, Any]] = []
            resp.logprobs += c.logprobs or []
            if c.thinking:
                out += resp.delta("reasoning", c.thinking)
            if c.text:
                out += resp.delta("message", c.text)
            for call in c.tool_calls:
                out += resp.function_call(call)
            if c.result is not None:
                out += resp.finish(c.result)
            for e in out:
                yield e

    return sse(events(), path=request.url.path, named=True)
