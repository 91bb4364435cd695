"""Reasoning apart from the answer: the tags learned from a template, the
streaming parser on every chunk boundary, and ``think`` reaching templates."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from server_fixtures import ANSWER, ANSWER_SCHEMA, THINK_STOP, THINK_TEMPLATE, THOUGHT, Server

from ember.errors import OptionError
from ember.templates import ChatTemplate
from ember.templates.thinking import ThinkingParser, check_think

JINJA = Path(__file__).parent / "data" / "templates" / "jinja"
# Ollama-style Go template of a thinking model (as Qwen3's): history keeps the
# reasoning in tags; the generation prompt opens <think> when thinking is on,
# and closes an empty one when it is turned off.
LEVEL_TEMPLATE = (
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
    assert ChatTemplate.parse(LEVEL_TEMPLATE).thinking_tags == ("<think>", "</think>")
    qwen3 = ChatTemplate.parse((JINJA / "qwen3.jinja").read_text(encoding="utf-8"))
    assert qwen3.thinking_tags == ("<think>", "</think>")
    for name in ("qwen2.5.jinja", "gemma3.jinja", "llama3.1.jinja"):
        assert ChatTemplate.parse((JINJA / name).read_text(encoding="utf-8")).thinking_tags is None, name


def test_think_and_level_reach_the_template() -> None:
    tmpl = ChatTemplate.parse(LEVEL_TEMPLATE)
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


# --- over the server: a template that thinks, output forced through </think> ----------
@pytest.fixture(scope="module")
def server(chat_server: Server) -> Server:
    return chat_server  # one server for the API translator tests (conftest.py)


FORCED = {"temperature": 0, "num_predict": 30}
QUESTION = [{"role": "user", "content": "Capital of France?"}]
# THINK_TEMPLATE without the opened <think> in the prompt: the model writes the tag itself (Qwen3's way).
OPEN_TEMPLATE = THINK_TEMPLATE.replace("{{ if .Think }}<think>\n{{ end }}", "")
# ... and with an example that does not reason: the model answers at once.
PLAIN_TEMPLATE = OPEN_TEMPLATE.replace("<think>\nFrance's capital</think>\n", "", 1)


def test_ollama_chat_and_generate_return_thinking(server: Server) -> None:
    oc = server.ollama_client()
    r = oc.chat(model="thinker", messages=QUESTION, options=FORCED)
    assert (r.message.thinking, r.message.content) == (THOUGHT, ANSWER)
    parts = list(oc.chat(model="thinker", messages=QUESTION, options=FORCED, stream=True))
    assert "".join(p.message.thinking or "" for p in parts) == THOUGHT
    assert "".join(p.message.content for p in parts) == ANSWER
    assert any(p.message.thinking for p in parts[:-1]) and parts[-1].done
    # think=false: the template opens no <think>, so the tags the model copies come out as content
    r = oc.chat(model="thinker", messages=QUESTION, options=FORCED, think=False)
    assert not r.message.thinking and r.message.content == f"<think>\n{THOUGHT}</think>\n{ANSWER}"
    g = oc.generate(model="thinker", prompt="Capital of France?", options=FORCED)
    assert (g.thinking, g.response) == (THOUGHT, ANSWER)
    parts = list(oc.generate(model="thinker", prompt="Capital of France?", options=FORCED,
                             think="high", stream=True))
    assert "".join(p.thinking or "" for p in parts) == THOUGHT and "".join(p.response for p in parts) == ANSWER
    # The reasoning goes back into the template with the history.
    history = [*QUESTION, {"role": "assistant", "content": "Paris.", "thinking": "It is Paris."}, *QUESTION]
    text = httpx.post(server.url + "/api/chat", json={"model": "thinker", "messages": history,
                                                      "_debug_render_only": True}, timeout=60).json()
    assert "<think>It is Paris.</think>\nParis." in text["_debug_info"]["rendered_template"]


def test_format_constrains_the_answer_not_the_reasoning(server: Server) -> None:
    """As Ollama's: ``format`` applies once the reasoning is over."""
    oc = server.ollama_client()
    quoted = f'"{ANSWER}"'
    r = oc.chat(model="thinker", messages=QUESTION, options=FORCED, format=ANSWER_SCHEMA)
    assert (r.message.thinking, r.message.content) == (THOUGHT, quoted)
    parts = list(oc.chat(model="thinker", messages=QUESTION, options=FORCED, format=ANSWER_SCHEMA, stream=True))
    assert "".join(p.message.thinking or "" for p in parts) == THOUGHT
    assert "".join(p.message.content for p in parts) == quoted
    # Not thinking: the format applies from the first token.
    r = oc.chat(model="thinker", messages=QUESTION, options=FORCED, format=ANSWER_SCHEMA, think=False)
    assert not r.message.thinking and r.message.content == quoted
    # A prompt that leaves the opening tag to the model: it reasons, then answers in the format ...
    g = oc.generate(model="thinker", prompt="Capital of France?", options=FORCED, format=ANSWER_SCHEMA,
                    template=OPEN_TEMPLATE)
    assert (g.thinking, g.response) == (THOUGHT, quoted)
    # ... or answers at once: its first token, not an opening tag, is chosen again under the format.
    g = oc.generate(model="thinker", prompt="Capital of France?", options=FORCED, template=PLAIN_TEMPLATE)
    assert not g.thinking and g.response == ANSWER
    g = oc.generate(model="thinker", prompt="Capital of France?", options=FORCED, format=ANSWER_SCHEMA,
                    template=PLAIN_TEMPLATE)
    assert not g.thinking and g.response == quoted
    # Speculative drafts stop at the format's grammar, which cannot verify them; the text is the same without them.
    g = oc.generate(model="thinker", prompt="Capital of France?", options={**FORCED, "num_draft": 0},
                    format=ANSWER_SCHEMA)
    assert (g.thinking, g.response) == (THOUGHT, quoted)


def test_openai_reasoning(server: Server) -> None:
    ai = server.openai_client()
    kw: dict[str, Any] = {"model": "thinker", "messages": QUESTION, "temperature": 0, "max_tokens": 30}
    c = ai.chat.completions.create(**kw)
    msg = c.choices[0].message
    assert (msg.model_extra["reasoning"], msg.content) == (THOUGHT, ANSWER)
    chunks = list(ai.chat.completions.create(stream=True, **kw))
    deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
    assert "".join((d.model_extra or {}).get("reasoning") or "" for d in deltas) == THOUGHT
    assert "".join(d.content or "" for d in deltas) == ANSWER
    schema = {"type": "json_schema", "json_schema": {"name": "a", "schema": ANSWER_SCHEMA}}
    msg = ai.chat.completions.create(**kw, response_format=schema).choices[0].message
    assert (msg.model_extra["reasoning"], msg.content) == (THOUGHT, f'"{ANSWER}"')
    off = ai.chat.completions.create(**kw, reasoning_effort="none")
    assert "reasoning" not in (off.choices[0].message.model_extra or {})


def test_think_on_a_model_that_cannot_think_is_refused(server: Server) -> None:
    oc = server.ollama_client()
    assert "thinking" in oc.show("thinker").capabilities and "thinking" not in oc.show("tooly").capabilities
    for path, body in [("/api/chat", {"messages": QUESTION}), ("/api/generate", {"prompt": "Hi"})]:
        r = httpx.post(server.url + path, json={"model": "tooly", "think": True, **body}, timeout=60)
        assert r.status_code == 400 and "does not support thinking" in r.json()["error"], r.text
        r = httpx.post(server.url + path, json={"model": "thinker", "think": "sideways", **body}, timeout=60)
        assert r.status_code == 400 and "invalid think value" in r.json()["error"], r.text
    # A generate request's own template decides: one that thinks makes "tooly" think.
    r = httpx.post(server.url + "/api/generate", json={
        "model": "tooly", "prompt": "Capital of France?", "think": True, "template": THINK_TEMPLATE, "stream": False,
        "options": {**FORCED, "stop": [THINK_STOP]}}, timeout=60)
    assert r.status_code == 200 and (r.json()["thinking"], r.json()["response"]) == (THOUGHT, ANSWER), r.text
    # think=false is fine anywhere
    r = httpx.post(server.url + "/api/chat", json={"model": "tooly", "think": False, "messages": QUESTION,
                                                   "stream": False, "options": {"num_predict": 2}}, timeout=60)
    assert r.status_code == 200 and "thinking" not in r.json()["message"]
