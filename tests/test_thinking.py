"""Reasoning apart from the answer: the tags learned from a template, the
streaming parser on every chunk boundary, and ``think`` reaching templates."""

from __future__ import annotations

from pathlib import Path

import pytest

from ember.errors import OptionError
from ember.templates import ChatTemplate
from ember.templates.thinking import ThinkingParser, check_think

JINJA = Path(__file__).parent / "data" / "templates" / "jinja"
# Ollama-style Go template of a thinking model (as Qwen3's): history keeps the
# reasoning in tags; the generation prompt opens <think> when thinking is on,
# and closes an empty one when it is turned off.
THINK_TEMPLATE = (
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n"
    "{{ if .Thinking }}<think>{{ .Thinking }}</think>\n{{ end }}{{ .Content }}<|im_end|>\n{{ end }}"
    "<|im_start|>assistant\n{{ if .Think }}<think>{{ if .ThinkLevel }}[{{ .ThinkLevel }}]{{ end }}\n"
    "{{ else if .IsThinkSet }}<think></think>\n{{ end }}"
)
REPLY = "  <think>\nTwo plus <b>two</b> is four.</think>\n\nIt is 4, not </thin> or <think."


def _split(parser: ThinkingParser, pieces: list[str]) -> tuple[str, str]:
    thinking, content = [], []
    for p in pieces:
        t, c = parser.add(p)
        thinking.append(t)
        content.append(c)
    t, c = parser.finish()
    return "".join(thinking) + t, "".join(content) + c


@pytest.mark.parametrize("cut", range(len(REPLY) + 1))
def test_parser_splits_on_every_boundary(cut: int) -> None:
    expected = ("Two plus <b>two</b> is four.", "It is 4, not </thin> or <think.")
    assert _split(ThinkingParser("<think>", "</think>"), [REPLY[:cut], REPLY[cut:]]) == expected


def test_parser_one_character_at_a_time_and_when_the_prompt_opened_the_tag() -> None:
    assert _split(ThinkingParser("<think>", "</think>"), list(REPLY)) == (
        "Two plus <b>two</b> is four.", "It is 4, not </thin> or <think.")
    started = ThinkingParser("<think>", "</think>", started=True)
    assert _split(started, list("\nplan</think>answer")) == ("plan", "answer")


def test_parser_without_thinking_and_unclosed_thinking() -> None:
    assert _split(ThinkingParser("<think>", "</think>"), [" Just", " an answer"]) == ("", " Just an answer")
    assert _split(ThinkingParser("<think>", "</think>"), ["<think>still going </th"]) == ("still going </th", "")
    # A reply that stops inside a possible opening tag is content after all.
    assert _split(ThinkingParser("<think>", "</think>"), ["<thi"]) == ("", "<thi")


def test_tags_from_templates() -> None:
    assert ChatTemplate.parse(THINK_TEMPLATE).thinking_tags == ("<think>", "</think>")
    qwen3 = ChatTemplate.parse((JINJA / "qwen3.jinja").read_text(encoding="utf-8"))
    assert qwen3.thinking_tags == ("<think>", "</think>")
    for name in ("qwen2.5.jinja", "gemma3.jinja", "llama3.1.jinja"):
        assert ChatTemplate.parse((JINJA / name).read_text(encoding="utf-8")).thinking_tags is None, name


def test_think_and_level_reach_the_template() -> None:
    tmpl = ChatTemplate.parse(THINK_TEMPLATE)
    msgs = [{"role": "user", "content": "2+2?"}]
    assert tmpl.render_messages(msgs, think=True).endswith("assistant\n<think>[medium]\n")
    assert tmpl.render_messages(msgs, think="high").endswith("assistant\n<think>[high]\n")
    assert tmpl.render_messages(msgs, think=False).endswith("assistant\n<think></think>\n")
    assert tmpl.render_messages(msgs).endswith("assistant\n")
    assert tmpl.render_prompt("2+2?", think=True).endswith("<think>[medium]\n")


def test_check_think() -> None:
    assert [check_think(v) for v in (None, True, False, "low", "max")] == [None, True, False, "low", "high"]
    with pytest.raises(OptionError, match="invalid think value"):
        check_think("very")
