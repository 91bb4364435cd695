"""Recognise tool calls in a model's output, as Ollama does.

Each model family writes tool calls its own way: Qwen/Hermes wrap JSON in
``<tool_call>...</tool_call>``, Llama 3.x writes ``{"name": ..., "parameters":
...}`` (sometimes after ``<|python_tag|>``), Mistral writes ``[TOOL_CALLS]
[...]`` (or ``[TOOL_CALLS]name[ARGS]{...}`` in newer tokenizers). Like Ollama,
the tag that opens a call is learned from the model's own template: it is
rendered with a probe tool call and the text the template writes before the
call's JSON is the tag. Known tags and a bare JSON answer are recognised too.
Calls come back in Ollama's shape: ``[{"function": {"name": str, "arguments":
dict}}]``.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

from ember.errors import TemplateError

if TYPE_CHECKING:
    from . import ChatTemplate

__all__ = ["parse_tool_calls", "split_tool_calls", "tool_call_tag"]

KNOWN_TAGS = ("<tool_call>", "[TOOL_CALLS]", "<|python_tag|>", "<function_call>", "<|tool_call_begin|>")
_PROBE_NAME = "ember_probe_fn"
_PROBE_CONTENT = "ember_probe_content"
_MISTRAL_ARGS = re.compile(r"\s*([A-Za-z_][\w.\-]*)\s*\[ARGS\]")
_FENCE = re.compile(r"^```(?:json)?\s*\n?(.*?)\n?```$", re.DOTALL)
_tag_cache: dict[tuple[str, str], str | None] = {}


def tool_call_tag(template: "ChatTemplate | None") -> str | None:
    """The text a model writes before a tool call's JSON, as its template
    shows it: ``<tool_call>`` for Qwen, ``[TOOL_CALLS]`` for Mistral, ``""``
    when calls are bare JSON (Llama 3.x); None when the template renders no
    tool calls (or there is no template)."""
    if template is None:
        return None
    key = (template.kind, template.text)
    if key not in _tag_cache:
        if len(_tag_cache) >= 64:  # requests may bring their own templates
            _tag_cache.clear()
        _tag_cache[key] = _derive_tag(template)
    return _tag_cache[key]


def _derive_tag(template: "ChatTemplate") -> str | None:
    tool = {
        "type": "function",
        "function": {"name": _PROBE_NAME, "description": "", "parameters": {"type": "object", "properties": {}}},
    }
    user = {"role": "user", "content": "ember_probe_user"}
    with_call = {"role": "assistant", "content": "",
                 "tool_calls": [{"function": {"name": _PROBE_NAME, "arguments": {"x": 1}}}]}
    with_text = {"role": "assistant", "content": _PROBE_CONTENT}
    try:
        a = template.render_messages([user, with_call], tools=[tool], add_generation_prompt=False)
        b = template.render_messages([user, with_text], tools=[tool], add_generation_prompt=False)
    except TemplateError:
        return None
    start = 0
    while start < min(len(a), len(b)) and a[start] == b[start]:
        start += 1
    at = a.find(_PROBE_NAME, start)
    if at < 0:
        return None
    brace = a.rfind("{", start, at)
    if brace < 0:
        return None
    tag = a[start:brace].strip()
    # "[TOOL_CALLS] [" -> "[TOOL_CALLS]": the list bracket belongs to the JSON.
    tag = tag[:-1].rstrip() if tag.endswith("[") and len(tag) > 1 else tag
    return "" if tag in ("[", "") else tag


def parse_tool_calls(text: str, template: "ChatTemplate | None" = None) -> list[dict[str, Any]] | None:
    """Tool calls in ``text`` (a model's whole reply), or None when it holds
    none: ``[{"function": {"name": str, "arguments": dict}}]``."""
    return split_tool_calls(text, template)[1]


def split_tool_calls(text: str, template: "ChatTemplate | None" = None) -> tuple[str, list[dict[str, Any]] | None]:
    """``(content, calls)``: the reply's text before its first tool call (all
    of it when there are none) and the calls, or None."""
    tag = tool_call_tag(template)
    tags = [t for t in (tag, *KNOWN_TAGS) if t]
    for t in dict.fromkeys(tags):
        if t in text:
            calls = _after_tag(text, t)
            if calls:
                return text[: text.index(t)].rstrip(), calls
    calls = _bare_json(text)
    if calls:
        return "", calls
    return text, None


def _after_tag(text: str, tag: str) -> list[dict[str, Any]] | None:
    decoder = json.JSONDecoder()
    calls: list[dict[str, Any]] = []
    pos = text.find(tag)
    while pos >= 0:
        i = pos + len(tag)
        while i < len(text) and text[i].isspace():
            i += 1
        m = _MISTRAL_ARGS.match(text, i)
        if m:  # [TOOL_CALLS]name[ARGS]{...}
            try:
                args, end = decoder.raw_decode(text, m.end())
            except ValueError:
                return None
            call = _call({"name": m.group(1), "arguments": args}, strict=False)
            if call is None:
                return None
            calls.append(call)
            pos = text.find(tag, end)
            continue
        end = i
        # Several JSON values may follow one tag (Llama: "{...}; {...}", Qwen Go: one per line).
        while end < len(text) and text[end] in "{[":
            try:
                value, end = decoder.raw_decode(text, end)
            except ValueError:
                return None
            found = _calls_from(value, strict=False)
            if found is None:
                return None
            calls.extend(found)
            while end < len(text) and (text[end].isspace() or text[end] in ";,"):
                end += 1
        if end == i:
            return None
        pos = text.find(tag, end)
    return calls or None


def _bare_json(text: str) -> list[dict[str, Any]] | None:
    """A reply that is nothing but JSON tool calls (optionally in a ``json``
    fence, several separated by ``;`` or newlines)."""
    s = text.strip()
    fence = _FENCE.match(s)
    if fence:
        s = fence.group(1).strip()
    if not s or s[0] not in "{[":
        return None
    decoder = json.JSONDecoder()
    calls: list[dict[str, Any]] = []
    i = 0
    while i < len(s):
        try:
            value, i = decoder.raw_decode(s, i)
        except ValueError:
            return None
        found = _calls_from(value, strict=True)
        if not found:
            return None
        calls.extend(found)
        while i < len(s) and (s[i].isspace() or s[i] == ";"):
            i += 1
    return calls or None


def _calls_from(value: Any, *, strict: bool) -> list[dict[str, Any]] | None:
    if isinstance(value, list):
        out: list[dict[str, Any]] = []
        for v in value:
            found = _calls_from(v, strict=strict)
            if found is None:
                return None
            out.extend(found)
        return out if out or not strict else None
    if isinstance(value, dict):
        if isinstance(value.get("tool_calls"), list):
            return _calls_from(value["tool_calls"], strict=strict)
        call = _call(value, strict=strict)
        return [call] if call else None
    return None


def _call(obj: dict[str, Any], *, strict: bool) -> dict[str, Any] | None:
    """One call from ``{"name", "arguments"|"parameters"}`` or OpenAI's
    ``{"function": {...}}``. Strict (bare JSON): the arguments key must be
    there, so an answer like ``{"name": "Bob"}`` is not a call."""
    if isinstance(obj.get("function"), dict):
        return _call(obj["function"], strict=strict)
    name = obj.get("name")
    if not isinstance(name, str) or not name.strip():
        return None
    key = next((k for k in ("arguments", "parameters", "args", "input") if k in obj), None)
    if key is None:
        if strict:
            return None
        args: Any = {}
    else:
        args = obj[key]
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            return None
    if args is None:
        args = {}
    if not isinstance(args, dict):
        return None
    if strict and set(obj) - {"name", key, "type", "id"}:
        return None
    return {"function": {"name": name.strip(), "arguments": args}}
