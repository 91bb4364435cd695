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
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from ember.errors import TemplateError

if TYPE_CHECKING:
    from . import ChatTemplate

__all__ = ["ToolCallStream", "number_calls", "parse_tool_calls", "per_template", "split_tool_calls", "tool_call_tag"]

KNOWN_TAGS = ("<tool_call>", "[TOOL_CALLS]", "<|python_tag|>", "<function_call>", "<|tool_call_begin|>")
_PROBE_NAME = "ember_probe_fn"
_PROBE_CONTENT = "ember_probe_content"
_MISTRAL_ARGS = re.compile(r"\s*([A-Za-z_][\w.\-]*)\s*\[ARGS\]")
_FENCE = re.compile(r"^```(?:json)?\s*\n?(.*?)\n?```$", re.DOTALL)
_tag_cache: dict[tuple[str, str], str | None] = {}
T = TypeVar("T")


def tool_call_tag(template: ChatTemplate | None) -> str | None:
    """The text a model writes before a tool call's JSON, as its template
    shows it: ``<tool_call>`` for Qwen, ``[TOOL_CALLS]`` for Mistral, ``""``
    when calls are bare JSON (Llama 3.x); None when the template renders no
    tool calls (or there is no template)."""
    if template is None:
        return None
    return per_template(_tag_cache, template, _derive_tag)


def per_template(cache: dict[tuple[str, str], T], template: ChatTemplate, derive: Callable[[ChatTemplate], T]) -> T:
    """``derive(template)``, worked out once per template text (found by
    rendering probes, which costs); requests may bring their own templates,
    so at most 64 are kept."""
    key = (template.kind, template.text)
    if key not in cache:
        if len(cache) >= 64:
            cache.clear()
        cache[key] = derive(template)
    return cache[key]


def _derive_tag(template: ChatTemplate) -> str | None:
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


def parse_tool_calls(text: str, template: ChatTemplate | None = None) -> list[dict[str, Any]] | None:
    """Tool calls in ``text`` (a model's whole reply), or None when it holds
    none: ``[{"function": {"name": str, "arguments": dict}}]``."""
    return split_tool_calls(text, template)[1]


def split_tool_calls(text: str, template: ChatTemplate | None = None) -> tuple[str, list[dict[str, Any]] | None]:
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


def _json_end(s: str, i: int) -> int | None:
    """The end of the JSON object or array starting at ``s[i]``, found by
    bracket depth (strings skipped), or None while it is incomplete."""
    depth = 0
    in_str = esc = False
    for j in range(i, len(s)):
        ch = s[j]
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return j + 1
    return None


def number_calls(calls: list[dict[str, Any]], start: int = 0) -> list[dict[str, Any]]:
    """Calls with Ollama's ``id`` and ``function.index`` (their order in the reply)."""
    out = []
    for n, call in enumerate(calls, start):
        fn = dict(call.get("function") or {})
        fn["index"] = n
        out.append({"id": call.get("id") or f"call_{uuid.uuid4().hex[:8]}", "function": fn})
    return out



class ToolCallStream:
    """Tool calls found while a reply streams, as current Ollama does: text is
    passed on as it comes, except what may start a call (a tag, or a reply
    that opens with JSON), which is held until it is a complete call (given
    out then, numbered) or turns out to be text. After the first call only
    further calls are given out, as :func:`split_tool_calls` keeps only the
    text before the first call."""

    def __init__(self, template: ChatTemplate | None) -> None:
        tag = tool_call_tag(template)
        self.tags = list(dict.fromkeys(t for t in (tag, *KNOWN_TAGS) if t))
        self.buf = ""
        self.opened: str | None = None  # the tag of the call being read ("" for a reply opening with JSON)
        self.started = False  # text was given out, so the reply is no bare JSON call
        self.calls: list[dict[str, Any]] = []
        self.incomplete = False  # the JSON at the front was scanned and is unfinished

    def feed(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        """(text to pass on, calls completed) after ``text`` more of the reply."""
        self.buf += text
        if "}" in text or "]" in text:  # only a closing bracket can finish a JSON value
            self.incomplete = False
        out: list[str] = []
        found: list[dict[str, Any]] = []
        while self._step(out, found):
            pass
        numbered = number_calls(found, len(self.calls))
        self.calls.extend(numbered)
        return "".join(out), numbered

    def finish(self) -> str:
        """The text still held at the end (an unfinished call is text)."""
        held = "" if self.calls else (self.opened or "") + self.buf
        self.buf, self.opened = "", None
        return held

    def _step(self, out: list[str], found: list[dict[str, Any]]) -> bool:
        """One step over the buffer; False when it needs more text."""
        had_calls = bool(self.calls or found)
        if self.opened is not None:
            state, calls = self._read_call()
            if state == "wait":
                return False
            if state == "call":
                found.extend(calls)
                return True
            if not had_calls:  # no call after all: the tag is text
                out.append(self.opened)
                self.started = True
            self.opened = None
            return True
        if not had_calls and not self.started:
            stripped = self.buf.lstrip()
            if not stripped:
                return False
            if stripped[0] in "{[":
                self.opened, self.buf = "", stripped
                return True
        hits = [(self.buf.find(t), t) for t in self.tags if t in self.buf]
        if hits:
            at, tag = min(hits)
            if not had_calls:
                out.append(self.buf[:at])
                self.started = self.started or bool(self.buf[:at].strip())
            self.opened, self.buf = tag, self.buf[at + len(tag):]
            return True
        cut = len(self.buf) - self._partial_tag()
        if not had_calls:
            out.append(self.buf[:cut])
            self.started = self.started or bool(self.buf[:cut].strip())
        self.buf = self.buf[cut:]
        return False

    def _partial_tag(self) -> int:
        """How many trailing characters may begin a tag (held back)."""
        for n in range(min(max(map(len, self.tags)) - 1, len(self.buf)), 0, -1):
            if any(t.startswith(self.buf[-n:]) for t in self.tags):
                return n
        return 0

    def _read_call(self) -> tuple[str, list[dict[str, Any]]]:
        """("call", calls) for a complete call at the front of the buffer,
        ("wait", []) while it is incomplete, ("no", []) when it is no call."""
        s = self.buf
        i = len(s) - len(s.lstrip(" \t\r\n;,"))
        if i == len(s):
            return "wait", []
        name = None
        m = _MISTRAL_ARGS.match(s, i) if self.opened else None
        if m:  # [TOOL_CALLS]name[ARGS]{...}
            name, i = m.group(1), m.end()
            i += len(s[i:]) - len(s[i:].lstrip())
            if i == len(s):
                return "wait", []
        elif self.opened and re.fullmatch(r"[A-Za-z_][\w.\-]*\s*(\[(A(R(G(S)?)?)?)?)?", s[i:]):
            return "wait", []  # perhaps "name[ARGS" so far
        if s[i] not in "{[":
            return "no", []
        end = None if self.incomplete else _json_end(s, i)
        if end is None:
            self.incomplete = True
            return "wait", []
        try:
            value = json.loads(s[i:end])
        except ValueError:
            return "no", []
        if name is not None:
            call = _call({"name": name, "arguments": value}, strict=False)
            calls = [call] if call else None
        else:
            calls = _calls_from(value, strict=not self.opened)
        if not calls:
            return "no", []
        self.buf = s[end:]
        return "call", calls
