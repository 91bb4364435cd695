"""Anthropic's Messages API (/v1/messages) driven by the official `anthropic`
SDK against a real `ember serve` on the demo model. Greedy replies are
compared with /api/chat on the same conversation, so the translation (system,
content blocks, tool_use / tool_result, options) is checked exactly."""

from __future__ import annotations

from typing import Any

import anthropic
import httpx
import ollama
import pytest
from server_fixtures import ANSWER, ANSWER_SCHEMA, CALL_SCHEMA, THOUGHT, WEATHER_SCHEMA, Server

GREEDY = {"temperature": 0, "num_predict": 8}
TOOL = {"name": "get_weather", "description": "Current weather of a city", "input_schema": WEATHER_SCHEMA}
OLLAMA_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Current weather of a city",
                                                "parameters": WEATHER_SCHEMA}}
# This SDK no longer sends sampling fields itself; the API still takes them.
T0 = {"temperature": 0}
FORCE_CALL = {"format": {"type": "json_schema", "schema": CALL_SCHEMA}}


@pytest.fixture(scope="module")
def server(chat_server: Server) -> Server:
    return chat_server  # one server for the API translator tests (conftest.py)


def _ollama_text(oc: ollama.Client, model: str, messages: list[dict[str, Any]], **kw: Any) -> str:
    return str(oc.chat(model=model, messages=messages, options=GREEDY, **kw).message.content)


def test_create_matches_ollama_chat(ac: anthropic.Anthropic, oc: ollama.Client) -> None:
    msgs = [{"role": "user", "content": "Name a colour."}]
    m = ac.messages.create(model="tooly", max_tokens=8, extra_body=T0, messages=msgs)
    assert m.type == "message" and m.role == "assistant" and m.model == "tooly" and m.id.startswith("msg_")
    assert [b.type for b in m.content] == ["text"]
    assert m.content[0].text == _ollama_text(oc, "tooly", msgs)
    assert m.stop_reason in ("end_turn", "max_tokens")
    assert m.usage.input_tokens > 0 and 0 < m.usage.output_tokens <= 8


def test_count_tokens(ac: anthropic.Anthropic) -> None:
    msgs = [{"role": "user", "content": "Name a colour."}]
    n = ac.messages.count_tokens(model="tooly", messages=msgs, system="Be brief.").input_tokens
    m = ac.messages.create(model="tooly", max_tokens=1, messages=msgs, system="Be brief.")
    assert n == m.usage.input_tokens > 5
    plain = ac.messages.count_tokens(model="tooly", messages=msgs).input_tokens
    assert ac.messages.count_tokens(model="tooly", messages=msgs, tools=[TOOL]).input_tokens > plain  # tools listed


def test_system_blocks_and_content_blocks(ac: anthropic.Anthropic, oc: ollama.Client) -> None:
    m = ac.messages.create(
        model="tooly", max_tokens=8, extra_body=T0,
        system=[{"type": "text", "text": "Be brief. "}, {"type": "text", "text": "Answer in English."}],
        messages=[{"role": "user", "content": [{"type": "text", "text": "Name a "}, {"type": "text", "text": "fruit."}]},
                  {"role": "assistant", "content": "Apple."},
                  {"role": "user", "content": "Another one?"}],
    )
    same = [{"role": "system", "content": "Be brief. Answer in English."},
            {"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "Apple."},
            {"role": "user", "content": "Another one?"}]
    assert m.content[0].text == _ollama_text(oc, "tooly", same)


def test_stream_events(ac: anthropic.Anthropic, server: Server) -> None:
    msgs = [{"role": "user", "content": "Count to five."}]
    plain = ac.messages.create(model="tooly", max_tokens=6, extra_body=T0, messages=msgs)
    with ac.messages.stream(model="tooly", max_tokens=6, extra_body=T0, messages=msgs) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == plain.content[0].text == final.content[0].text
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 6 and final.usage.input_tokens > 0
    # The wire: named events in Anthropic's order.
    with httpx.stream("POST", server.url + "/v1/messages", json={
            "model": "tooly", "max_tokens": 6, "temperature": 0, "stream": True, "messages": msgs}, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        names = [line.removeprefix("event: ") for line in r.iter_lines() if line.startswith("event: ")]
    assert names[:2] == ["message_start", "content_block_start"]
    assert set(names[2:-3]) == {"content_block_delta"}
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]


def test_tool_use_and_tool_result(ac: anthropic.Anthropic, oc: ollama.Client) -> None:
    msgs: list[dict[str, Any]] = [{"role": "user", "content": "Weather in Paris?"}]
    m = ac.messages.create(model="tooly", max_tokens=40, extra_body=T0, messages=msgs, tools=[TOOL],
                           output_config=FORCE_CALL)
    assert m.stop_reason == "tool_use"
    (use,) = [b for b in m.content if b.type == "tool_use"]
    assert use.name == "get_weather" and use.input == {"city": "Paris"} and use.id
    # Streamed: the call arrives as a tool_use block with input_json_delta.
    with ac.messages.stream(model="tooly", max_tokens=40, extra_body=T0, messages=msgs, tools=[TOOL],
                            output_config=FORCE_CALL) as stream:
        events = list(stream)
        final = stream.get_final_message()
    assert any(e.type == "content_block_delta" and e.delta.type == "input_json_delta" for e in events)
    assert final.stop_reason == "tool_use" and [b.input for b in final.content if b.type == "tool_use"] == [{"city": "Paris"}]
    # tool_choice none: no tools reach the model, so no call comes back.
    free = ac.messages.create(model="tooly", max_tokens=8, extra_body=T0, messages=msgs, tools=[TOOL],
                              tool_choice={"type": "none"})
    assert free.stop_reason != "tool_use" and free.content[0].text == _ollama_text(oc, "tooly", msgs)
    # The round trip: tool_use and tool_result blocks render as Ollama's tool calls and tool messages.
    history = msgs + [
        {"role": "assistant", "content": [{"type": "text", "text": "Checking."},
                                          {"type": "tool_use", "id": use.id, "name": "get_weather", "input": {"city": "Paris"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "18 C, sunny"},
                                     {"type": "text", "text": "Summarise."}]},
    ]
    answer = ac.messages.create(model="tooly", max_tokens=8, extra_body=T0, messages=history, tools=[TOOL])
    same = msgs + [
        {"role": "assistant", "content": "Checking.", "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "18 C, sunny", "tool_name": "get_weather"},
        {"role": "user", "content": "Summarise."},
    ]
    assert answer.content[0].text == _ollama_text(oc, "tooly", same, tools=[OLLAMA_TOOL])


def test_thinking_blocks(ac: anthropic.Anthropic) -> None:
    kw: dict[str, Any] = {"model": "thinker", "max_tokens": 30, "extra_body": T0,
                          "messages": [{"role": "user", "content": "Capital of France?"}]}
    m = ac.messages.create(**kw)
    assert [b.type for b in m.content] == ["thinking", "text"]
    assert m.content[0].thinking == THOUGHT and m.content[1].text == ANSWER
    with ac.messages.stream(**kw) as stream:
        events = list(stream)
        final = stream.get_final_message()
    kinds = [e.delta.type for e in events if e.type == "content_block_delta"]
    assert "thinking_delta" in kinds and "text_delta" in kinds
    assert kinds.index("text_delta") > max(i for i, k in enumerate(kinds) if k == "thinking_delta")
    assert [(b.type, getattr(b, "thinking", None) or getattr(b, "text", None)) for b in final.content] == [
        ("thinking", THOUGHT), ("text", ANSWER)]
    # A format constrains the answer, after the reasoning.
    fmt = ac.messages.create(**kw, output_config={"format": {"type": "json_schema", "schema": ANSWER_SCHEMA}})
    assert [(b.type, getattr(b, "thinking", None) or getattr(b, "text", None)) for b in fmt.content] == [
        ("thinking", THOUGHT), ("text", f'"{ANSWER}"')]
    # Thinking off: the template does not open <think>, and nothing is parsed as reasoning.
    off = ac.messages.create(**{**kw, "thinking": {"type": "disabled"}})
    assert [b.type for b in off.content] == ["text"] and off.content[0].text == f"<think>\n{THOUGHT}</think>\n{ANSWER}"
    # Asked of a model that cannot think, "enabled" is relaxed (as Ollama does), not refused.
    plain = ac.messages.create(model="tooly", max_tokens=4, messages=kw["messages"],
                               thinking={"type": "enabled", "budget_tokens": 1024})
    assert [b.type for b in plain.content] == ["text"]


def test_errors_have_anthropics_shape(ac: anthropic.Anthropic, server: Server) -> None:
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
    with pytest.raises(anthropic.BadRequestError) as e:
        ac.messages.create(model="tooly", max_tokens=8,
                           messages=[{"role": "user", "content": [image, {"type": "text", "text": "What is it?"}]}])
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "invalid_request_error"
    assert "images" in e.value.body["error"]["message"]
    with pytest.raises(anthropic.NotFoundError) as nf:
        ac.messages.create(model="nope", max_tokens=8, messages=[{"role": "user", "content": "Hi"}])
    assert nf.value.body["error"]["type"] == "not_found_error" and "not found" in nf.value.body["error"]["message"]
    for body, needle in [({"model": "tooly", "messages": [{"role": "user", "content": "Hi"}]}, "max_tokens"),
                         ({"model": "tooly", "max_tokens": 0, "messages": [{"role": "user", "content": "Hi"}]}, "max_tokens"),
                         ({"model": "tooly", "max_tokens": 5, "messages": []}, "messages"),
                         ({"model": "tooly", "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "video"}]}]}, "video")]:
        r = httpx.post(server.url + "/v1/messages", json=body, timeout=60)
        assert r.status_code == 400, r.text
        err = r.json()
        assert err["type"] == "error" and err["error"]["type"] == "invalid_request_error", err
        assert needle in err["error"]["message"] and "\n" not in err["error"]["message"]


def test_x_api_key(tmp_path: Any) -> None:
    srv = Server(tmp_path, EMBER_API_KEY="sekrit")
    try:
        msgs = [{"role": "user", "content": "Hi"}]
        ok = srv.anthropic_client(api_key="sekrit")
        assert ok.messages.create(model="demo", max_tokens=2, messages=msgs).content
        bad = srv.anthropic_client(api_key="wrong")
        with pytest.raises(anthropic.AuthenticationError) as e:
            bad.messages.create(model="demo", max_tokens=2, messages=msgs)
        assert e.value.body["error"]["type"] == "authentication_error"
    finally:
        srv.stop()
