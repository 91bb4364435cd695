"""Tool-call recognition in model output (Qwen/Hermes, Llama 3.x, Mistral, bare JSON)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ember.templates import ChatTemplate
from ember.templates.tools import ToolCallStream, parse_tool_calls, split_tool_calls, tool_call_tag

DATA = Path(__file__).parent / "data" / "templates"


def tmpl(path: str) -> ChatTemplate:
    return ChatTemplate.parse((DATA / path).read_text(encoding="utf-8"))


def call(name: str, **args: object) -> dict:
    return {"function": {"name": name, "arguments": args}}


PARIS = call("get_current_weather", location="Paris, France", format="celsius")
ROME = call("get_current_weather", location="Rome, Italy", format="celsius")


@pytest.mark.parametrize(
    ("path", "tag"),
    [
        ("go/qwen2.5.gotmpl", "<tool_call>"),
        ("jinja/qwen2.5.jinja", "<tool_call>"),
        ("jinja/qwen3.jinja", "<tool_call>"),
        ("go/mistral.gotmpl", "[TOOL_CALLS]"),
        ("go/llama3.1.gotmpl", ""),
        ("jinja/llama3.1.jinja", ""),
        ("jinja/llama3.2.jinja", ""),
        ("jinja/gemma3.jinja", None),
        ("go/gemma3.gotmpl", None),
    ],
)
def test_tag_learned_from_the_template(path: str, tag: str | None) -> None:
    assert tool_call_tag(tmpl(path)) == tag


def test_round_trip_through_each_template() -> None:
    # What a template writes for an assistant tool call parses back to the call.
    for path in ("go/qwen2.5.gotmpl", "jinja/qwen2.5.jinja", "go/mistral.gotmpl", "jinja/llama3.1.jinja"):
        t = tmpl(path)
        text = t.render_messages(
            [{"role": "user", "content": "x"}, {"role": "assistant", "content": "", "tool_calls": [PARIS]}],
            add_generation_prompt=False,
        )
        marker = {"<tool_call>": "<tool_call>", "[TOOL_CALLS]": "[TOOL_CALLS]", "": '{"name"'}[tool_call_tag(t) or ""]
        reply = text[text.rindex(marker):]
        for end in ("<|eot_id|>", "<|im_end|>", "</s>"):  # the engine stops before these
            reply = reply.split(end)[0]
        assert parse_tool_calls(reply, t) == [PARIS], path


def test_qwen_hermes_tags() -> None:
    t = tmpl("jinja/qwen2.5.jinja")
    out = (
        '<tool_call>\n{"name": "get_current_weather", "arguments": {"location": "Paris, France", "format": "celsius"}}\n'
        '</tool_call>\n<tool_call>\n{"name": "get_current_weather", "arguments": {"location": "Rome, Italy", '
        '"format": "celsius"}}\n</tool_call>'
    )
    assert parse_tool_calls(out, t) == [PARIS, ROME]
    assert parse_tool_calls(out, None) == [PARIS, ROME]  # a known tag, no template needed
    content, calls = split_tool_calls("Let me check.\n" + out, t)
    assert content == "Let me check." and calls == [PARIS, ROME]
    # Qwen's Go template writes one call per line inside a single tag.
    go = '<tool_call>\n{"name": "a", "arguments": {}}\n{"name": "b", "arguments": {"k": [1]}}\n</tool_call>'
    assert parse_tool_calls(go, tmpl("go/qwen2.5.gotmpl")) == [call("a"), call("b", k=[1])]


def test_llama3_json() -> None:
    t = tmpl("jinja/llama3.1.jinja")
    out = '{"name": "get_current_weather", "parameters": {"location": "Paris, France", "format": "celsius"}}'
    assert parse_tool_calls(out, t) == [PARIS]
    assert parse_tool_calls("<|python_tag|>" + out, t) == [PARIS]
    assert parse_tool_calls(out + "; " + out.replace("Paris, France", "Rome, Italy"), t) == [PARIS, ROME]
    # Arguments as a JSON string, as some fine-tunes write them.
    assert parse_tool_calls('{"name": "f", "parameters": "{\\"a\\": 1}"}', t) == [call("f", a=1)]


def test_mistral() -> None:
    t = tmpl("go/mistral.gotmpl")
    out = (
        '[TOOL_CALLS] [{"name": "get_current_weather", "arguments": {"location": "Paris, France", "format": "celsius"}}, '
        '{"name": "get_current_weather", "arguments": {"location": "Rome, Italy", "format": "celsius"}}]'
    )
    assert parse_tool_calls(out, t) == [PARIS, ROME]
    assert parse_tool_calls(out, None) == [PARIS, ROME]
    # Newer Mistral tokenizers (v11+): [TOOL_CALLS]name[ARGS]{...}
    v11 = '[TOOL_CALLS]get_current_weather[ARGS]{"location": "Paris, France", "format": "celsius"}'
    assert parse_tool_calls(v11, t) == [PARIS]


def test_plain_json_object_and_list() -> None:
    assert parse_tool_calls('{"name": "f", "arguments": {"x": 1}}', None) == [call("f", x=1)]
    assert parse_tool_calls('  [{"name": "f", "arguments": {}}, {"name": "g", "arguments": {"y": "z"}}]\n', None) == [
        call("f"), call("g", y="z")
    ]
    assert parse_tool_calls('```json\n{"name": "f", "arguments": {"x": 1}}\n```', None) == [call("f", x=1)]
    # OpenAI-shaped objects
    assert parse_tool_calls('{"type": "function", "function": {"name": "f", "arguments": "{\\"x\\": 2}"}}', None) == [
        call("f", x=2)
    ]
    assert parse_tool_calls('{"tool_calls": [{"function": {"name": "f", "arguments": {}}}]}', None) == [call("f")]


@pytest.mark.parametrize(
    "text",
    [
        "",
        "The weather in Paris is sunny.",
        '{"name": "Bob", "age": 3}',  # JSON, but not a call
        '[1, 2, 3]',
        '{"answer": 42}',
        '{"name": "f", "arguments": [1, 2]}',  # arguments must be an object
        'Here is JSON: {"name": "f", "arguments": {}}',  # bare JSON only when it is the whole reply
        "<tool_call>\nnot json\n</tool_call>",
        '<tool_call>\n{"name": "f", "arguments": {"x": 1\n',  # cut off mid-call
        "[TOOL_CALLS] nothing",
        '{"name": "", "arguments": {}}',
    ],
)
def test_not_tool_calls(text: str) -> None:
    assert parse_tool_calls(text, tmpl("jinja/qwen2.5.jinja")) is None
    assert parse_tool_calls(text, None) is None
    assert split_tool_calls(text, None) == (text, None)


def test_custom_tag_from_a_template() -> None:
    # A tag no list knows: learned from how the template renders a call.
    t = ChatTemplate.parse(
        "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}"
        "{% for c in m.tool_calls or [] %}<fn>{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}</fn>"
        "{% endfor %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    assert tool_call_tag(t) == "<fn>"
    assert parse_tool_calls('<fn>{"name": "f", "arguments": {"q": "é"}}</fn>', t) == [call("f", q="é")]
    assert parse_tool_calls('<fn>{"name": "f", "arguments": {"q": "é"}}</fn>', None) is None


def test_arguments_keep_types() -> None:
    args = {"n": 3, "f": 1.5, "b": True, "z": None, "l": [1, {"a": "b"}], "s": "日本"}
    out = "<tool_call>\n" + json.dumps({"name": "f", "arguments": args}, ensure_ascii=False) + "\n</tool_call>"
    assert parse_tool_calls(out, None) == [{"function": {"name": "f", "arguments": args}}]


def stream(text: str, template: ChatTemplate | None, step: int) -> tuple[list[str], list[dict]]:
    """Feed ``text`` ``step`` characters at a time: (text pieces given out, calls)."""
    s = ToolCallStream(template)
    pieces: list[str] = []
    calls: list[dict] = []
    for i in range(0, len(text), step):
        piece, found = s.feed(text[i : i + step])
        pieces.append(piece)
        calls.extend(found)
    pieces.append(s.finish())
    return pieces, calls


@pytest.mark.parametrize("step", [1, 3, 1000])
@pytest.mark.parametrize(
    ("path", "text"),
    [
        ("jinja/qwen2.5.jinja", 'Let me check. <tool_call>\n{"name": "get_current_weather", "arguments": {"location": "Paris, France", "format": "celsius"}}\n</tool_call>\n<tool_call>\n{"name": "get_current_weather", "arguments": {"location": "Rome, Italy", "format": "celsius"}}\n</tool_call>'),
        ("go/mistral.gotmpl", '[TOOL_CALLS] [{"name": "get_current_weather", "arguments": {"location": "Paris, France", "format": "celsius"}}]'),
        ("go/llama3.1.gotmpl", '{"name": "get_current_weather", "parameters": {"location": "Paris, France", "format": "celsius"}}'),
        (None, '{"name": "get_current_weather", "arguments": {"location": "Paris, France", "format": "celsius"}}; {"name": "get_current_weather", "arguments": {"location": "Rome, Italy", "format": "celsius"}}'),
    ],
)
def test_streamed_calls_match_the_whole_reply(path: str | None, text: str, step: int) -> None:
    template = tmpl(path) if path else None
    pieces, calls = stream(text, template, step)
    content, whole = split_tool_calls(text, template)
    assert [c["function"]["name"] for c in calls] == [c["function"]["name"] for c in whole or []]
    assert [c["function"]["arguments"] for c in calls] == [c["function"]["arguments"] for c in whole or []]
    assert [c["function"]["index"] for c in calls] == list(range(len(calls)))
    assert len({c["id"] for c in calls}) == len(calls)
    assert "".join(pieces).rstrip() == content


@pytest.mark.parametrize("text", [
    "Just some text, no calls at all.",
    '{"answer": 42}',
    "a <tool_ and <tool_call> with nothing after",
    '<tool_call>\n{"name": "f", "arguments": {"x": 1\n',  # cut off mid-call
    "[TOOL_CALLS] nothing",
])
def test_streamed_text_that_is_no_call_comes_out_whole(text: str) -> None:
    for step in (1, 4):
        pieces, calls = stream(text, tmpl("jinja/qwen2.5.jinja"), step)
        assert calls == [] and "".join(pieces) == text


def test_text_streams_before_the_call_is_complete() -> None:
    pieces, calls = stream('Checking the weather now. <tool_call>{"name": "f", "arguments": {}}</tool_call>', None, 1)
    assert "".join(pieces[:20]) == "Checking the weather"  # passed on as it came, one character at a time
    assert "".join(pieces) == "Checking the weather now. " and [c["function"]["name"] for c in calls] == ["f"]
