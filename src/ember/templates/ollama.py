"""Ollama's template data model and its rules for executing a TEMPLATE.

Ollama hands a template Go structs (``.Messages`` of ``api.Message`` with
``.Role .Content .ToolCalls ...``, ``.Tools`` that print as JSON) and decides
from the template's own identifiers how to call it:

* a template that mentions ``.Messages`` is executed once with the whole
  (collated) conversation;
* a legacy template (only ``.System``/``.Prompt``/``.Response``) is executed
  once per (system, prompt, response) turn and the results concatenated; the
  last turn is cut right after ``{{ .Response }}`` so the model continues it;
* a prompt with a suffix (fill-in-the-middle) gets ``.Prompt`` and ``.Suffix``.

A template that mentions neither ``.Messages`` nor ``.Response`` gets
``{{ .Response }}`` appended, as Ollama does at parse time.

API messages are dicts as in Ollama's and OpenAI's APIs: ``{"role",
"content", "tool_calls": [{"function": {"name", "arguments"}}],
"tool_name"}``; tools are OpenAI-style ``{"type": "function", "function":
{...}}`` dicts.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from ember.errors import TemplateError
from ember.templates.budget import Budget

from .gotemplate import (
    ActionNode,
    CommandNode,
    FieldNode,
    GoList,
    GoMap,
    GoStruct,
    GoTemplate,
    ListNode,
    PipeNode,
    cut_after_response,
    go_json,
)

__all__ = ["OllamaTemplate", "collate", "to_go_messages", "to_go_tools"]


def _json_stringer(v: Any) -> str:
    return go_json(v)


def _property_type_string(v: GoList) -> str:
    if len(v) == 0:
        return ""
    if len(v) == 1:
        return str(v[0])
    return "[" + " ".join(str(x) for x in v) + "]"


def _property_type_marshal(v: GoList) -> Any:
    if len(v) == 1:
        return v[0]
    return list(v)


def _ts_type(json_type: str) -> str:
    return {
        "string": "string",
        "number": "number",
        "integer": "number",
        "boolean": "boolean",
        "array": "any[]",
        "object": "Record<string, any>",
        "null": "null",
    }.get(json_type, "any")


def _to_typescript_type(v: Any) -> str:
    """Ollama's ``toTypeScriptType`` template function for a tool property."""
    if not isinstance(v, GoStruct) or v.type_name != "api.ToolProperty":
        return "any"
    any_of = v.fields.get("AnyOf") or []
    if any_of:
        return " | ".join(_to_typescript_type(x) for x in any_of)
    types = v.fields.get("Type") or []
    if not types:
        return "any"
    return " | ".join(_ts_type(str(t)) for t in types)


OLLAMA_FUNCS = {"toTypeScriptType": (_to_typescript_type, 1, 1)}


def _str_field(d: Mapping[str, Any], key: str, where: str) -> str:
    v = d.get(key)
    if v is None:
        return ""
    if isinstance(v, str):
        return v
    raise TemplateError(f"{where}: {key!r} must be a string, got {type(v).__name__}")


def _content_text(content: Any, where: str) -> str:
    """Message content as text: a string, or the text parts of an
    OpenAI-style list of content parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
        return "".join(parts)
    raise TemplateError(f"{where}: 'content' must be a string, got {type(content).__name__}")


def _plain(v: Any) -> Any:
    """Copy JSON-like data into plain Go-like values (maps are Go maps)."""
    if isinstance(v, Mapping):
        return GoMap({str(k): _plain(x) for k, x in v.items()})
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if v is None or isinstance(v, (str, int, float, bool)):
        return v
    return str(v)


def _arguments(raw: Any, where: str) -> GoMap:
    if raw is None:
        raw = {}
    if isinstance(raw, str):
        text = raw.strip()
        if not text:
            raw = {}
        else:
            try:
                raw = json.loads(text)
            except ValueError:
                raise TemplateError(f"{where}: 'arguments' is not valid JSON: {raw[:80]!r}") from None
    if not isinstance(raw, Mapping):
        raise TemplateError(f"{where}: 'arguments' must be an object, got {type(raw).__name__}")
    return GoMap(
        {str(k): _plain(v) for k, v in raw.items()},
        type_name="template.templateArgs",
        stringer=_json_stringer,
    )


def _tool_call(tc: Any, index: int, where: str) -> GoStruct:
    if not isinstance(tc, Mapping):
        raise TemplateError(f"{where}: a tool call must be an object")
    fn = tc.get("function") or {}
    if not isinstance(fn, Mapping):
        raise TemplateError(f"{where}: 'function' must be an object")
    idx = fn.get("index", index)
    function = GoStruct(
        "template.templateToolCallFunction",
        {
            "Index": idx if isinstance(idx, int) else index,
            "Name": _str_field(fn, "name", where),
            "Arguments": _arguments(fn.get("arguments"), where),
        },
        json_tags={"Index": ("index", False), "Name": ("name", False), "Arguments": ("arguments", False)},
    )
    return GoStruct(
        "template.templateToolCall",
        {"ID": _str_field(tc, "id", where), "Function": function},
        json_tags={"ID": ("id", True), "Function": ("function", False)},
    )


_MESSAGE_TAGS = {
    "Role": ("role", False),
    "Content": ("content", False),
    "Thinking": ("thinking", True),
    "Images": ("images", True),
    "ToolCalls": ("tool_calls", True),
    "ToolName": ("tool_name", True),
    "ToolCallID": ("tool_call_id", True),
}


def to_go_messages(messages: Sequence[Mapping[str, Any]]) -> list[GoStruct]:
    """API message dicts -> Ollama's template message structs."""
    out = []
    for i, m in enumerate(messages):
        where = f"message {i + 1}"
        if not isinstance(m, Mapping):
            raise TemplateError(f"{where}: must be an object with 'role' and 'content'")
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise TemplateError(f"{where}: 'role' must be a non-empty string")
        calls = m.get("tool_calls") or []
        if not isinstance(calls, list):
            raise TemplateError(f"{where}: 'tool_calls' must be a list")
        images = m.get("images") or []
        tool_name = m.get("tool_name")
        if tool_name is None and role == "tool":
            tool_name = m.get("name")
        out.append(
            GoStruct(
                "*template.templateMessage",
                {
                    "Role": role.lower(),
                    "Content": _content_text(m.get("content"), where),
                    "Thinking": _str_field(m, "thinking", where),
                    "Images": GoList(list(images) if isinstance(images, list) else [], is_nil=not images),
                    "ToolCalls": GoList(
                        [_tool_call(tc, j, where) for j, tc in enumerate(calls)],
                        type_name="[]template.templateToolCall",
                        is_nil=not calls,
                    ),
                    "ToolName": tool_name if isinstance(tool_name, str) else "",
                    "ToolCallID": _str_field(m, "tool_call_id", where),
                },
                json_tags=_MESSAGE_TAGS,
            )
        )
    return out


def _tool_property(p: Any, where: str) -> GoStruct:
    if not isinstance(p, Mapping):
        p = {}
    raw_type = p.get("type")
    if isinstance(raw_type, str):
        types = [raw_type]
    elif isinstance(raw_type, list):
        types = [str(t) for t in raw_type]
    else:
        types = []
    any_of = p.get("anyOf")
    props = p.get("properties")
    return GoStruct(
        "api.ToolProperty",
        {
            "AnyOf": GoList(
                [_tool_property(x, where) for x in any_of] if isinstance(any_of, list) else [],
                type_name="[]api.ToolProperty",
                is_nil=not any_of,
            ),
            "Type": GoList(
                types,
                type_name="api.PropertyType",
                stringer=_property_type_string,
                marshal=_property_type_marshal,
                is_nil=not types,
            ),
            "Items": _plain(p.get("items")),
            "Description": p.get("description") if isinstance(p.get("description"), str) else "",
            "Enum": GoList(_plain(p.get("enum")) if isinstance(p.get("enum"), list) else [], is_nil=not p.get("enum")),
            "Properties": _properties(props, where) if isinstance(props, Mapping) else None,
        },
        json_tags={
            "AnyOf": ("anyOf", True),
            "Type": ("type", True),
            "Items": ("items", True),
            "Description": ("description", True),
            "Enum": ("enum", True),
            "Properties": ("properties", True),
        },
    )


def _properties(props: Any, where: str) -> GoMap:
    if not isinstance(props, Mapping):
        return GoMap(type_name="template.templateProperties", stringer=lambda v: "{}", is_nil=True)
    return GoMap(
        {str(k): _tool_property(v, where) for k, v in props.items()},
        type_name="template.templateProperties",
        stringer=_json_stringer,
    )


def to_go_tools(tools: Sequence[Mapping[str, Any]] | None) -> GoList:
    """OpenAI-style tool dicts -> Ollama's template tool structs. Printing a
    tool (or ``.Function``) gives its JSON, with unknown schema keys dropped
    as Go's decoder drops them."""
    if tools is None:
        return GoList(type_name="template.templateTools", stringer=_json_stringer, is_nil=True)
    out = []
    for i, t in enumerate(tools):
        where = f"tool {i + 1}"
        if not isinstance(t, Mapping):
            raise TemplateError(f"{where}: must be an object like {{'type': 'function', 'function': {{...}}}}")
        fn = t.get("function")
        if not isinstance(fn, Mapping):
            raise TemplateError(f"{where}: 'function' must be an object with a 'name'")
        params = fn.get("parameters") or {}
        if not isinstance(params, Mapping):
            raise TemplateError(f"{where}: 'parameters' must be an object")
        required = params.get("required")
        parameters = GoStruct(
            "template.templateToolFunctionParameters",
            {
                "Type": params.get("type") if isinstance(params.get("type"), str) else "",
                "Defs": _plain(params.get("$defs")),
                "Items": _plain(params.get("items")),
                "Required": GoList(
                    [str(r) for r in required] if isinstance(required, list) else [],
                    type_name="[]string",
                    is_nil=not required,
                ),
                "Properties": _properties(params.get("properties"), where),
            },
            json_tags={
                "Type": ("type", False),
                "Defs": ("$defs", True),
                "Items": ("items", True),
                "Required": ("required", True),
                "Properties": ("properties", False),
            },
            stringer=_json_stringer,
        )
        function = GoStruct(
            "template.templateToolFunction",
            {
                "Name": _str_field(fn, "name", where),
                "Description": _str_field(fn, "description", where),
                "Parameters": parameters,
            },
            json_tags={"Name": ("name", False), "Description": ("description", False), "Parameters": ("parameters", False)},
            stringer=_json_stringer,
        )
        out.append(
            GoStruct(
                "template.templateTool",
                {"Type": _str_field(t, "type", where) or "function", "Items": _plain(t.get("items")), "Function": function},
                json_tags={"Type": ("type", False), "Items": ("items", True), "Function": ("function", False)},
                stringer=_json_stringer,
            )
        )
    return GoList(out, type_name="template.templateTools", stringer=_json_stringer)


def collate(messages: Sequence[Mapping[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """Ollama's collate: consecutive messages of one role (tool messages
    excepted) are merged with a blank line; all system messages joined give
    ``.System``."""
    system: list[str] = []
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise TemplateError(f"message {i + 1}: must be an object with 'role' and 'content'")
        msg = dict(m)
        role = msg.get("role")
        if isinstance(role, str):
            msg["role"] = role = role.lower()
        content = _content_text(msg.get("content"), f"message {i + 1}")
        msg["content"] = content
        if role == "system":
            system.append(content)
        if out and out[-1].get("role") == role and role != "tool":
            out[-1]["content"] = out[-1]["content"] + "\n\n" + content
        else:
            out.append(msg)
    return "\n\n".join(system), out


class OllamaTemplate:
    """An Ollama TEMPLATE: a Go template plus Ollama's execution rules."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.go = GoTemplate(text, funcs=OLLAMA_FUNCS)
        self.vars = sorted({name.lower() for name in self.go.identifiers()})
        if "messages" not in self.vars and "response" not in self.vars:
            # Ollama appends {{ .Response }} to templates that lack it
            line = self.go.root.nodes[-1].line if self.go.root.nodes else 1
            self.go.root.nodes.append(
                ActionNode(line, PipeNode(line, cmds=[CommandNode(line, [FieldNode(line, ["Response"])])]))
            )
        self._cut: ListNode | None = None

    @property
    def uses_messages(self) -> bool:
        return "messages" in self.vars

    @property
    def supports_tools(self) -> bool:
        return "tools" in self.vars

    @property
    def supports_insert(self) -> bool:
        return "suffix" in self.vars

    def execute(
        self,
        messages: Sequence[Mapping[str, Any]] = (),
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        prompt: str = "",
        suffix: str = "",
        think: bool | None = None,
        think_level: str = "",
    ) -> str:
        """Render exactly as Ollama's ``template.Execute`` does."""
        think_values = {"Think": bool(think), "ThinkLevel": think_level, "IsThinkSet": think is not None}
        if prompt and suffix:
            return self.go.execute({"Prompt": prompt, "Suffix": suffix, "Response": "", **think_values})
        system, collated = collate(messages)
        if self.uses_messages:
            return self.go.execute(
                {
                    "System": system,
                    "Messages": to_go_messages(collated),
                    "Tools": to_go_tools(tools),
                    "Response": "",
                    **think_values,
                }
            )
        # legacy: one execution per (system, prompt, response) turn, all on one budget
        out: list[str] = []
        sys_, prm, rsp = "", "", ""
        budget = Budget()

        def run() -> None:
            nonlocal sys_, prm, rsp
            out.append(self.go.execute({"System": sys_, "Prompt": prm, "Response": rsp, **think_values}, budget=budget))
            sys_, prm, rsp = "", "", ""

        for m in collated:
            role = m.get("role")
            content = m.get("content") or ""
            if role == "system":
                if prm or rsp:
                    run()
                sys_ = content
            elif role == "user":
                if rsp:
                    run()
                prm = content
            elif role == "assistant":
                rsp = content
        if self._cut is None:
            self._cut = cut_after_response(self.go.root)
        out.append(
            self.go.execute({"System": sys_, "Prompt": prm, "Response": rsp, **think_values}, root=self._cut, budget=budget)
        )
        return "".join(out)
