"""OpenAI's Responses API (/v1/responses) driven by the `openai` SDK's
``responses.create`` and ``responses.stream`` against a real `ember serve` on
the demo model; greedy replies are compared with /api/chat on the same
conversation."""

from __future__ import annotations

import json
from typing import Any

import httpx
import ollama
import openai
import pytest
from server_fixtures import ANSWER, ANSWER_SCHEMA, CALL_SCHEMA, THOUGHT, WEATHER_SCHEMA, Server

GREEDY = {"temperature": 0, "num_predict": 8}
TOOL = {"type": "function", "name": "get_weather", "description": "Current weather of a city",
        "parameters": WEATHER_SCHEMA}
OLLAMA_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Current weather of a city",
                                                "parameters": WEATHER_SCHEMA}}
FORCE_CALL = {"format": {"type": "json_schema", "name": "call", "schema": CALL_SCHEMA}}


@pytest.fixture(scope="module")
def server(chat_server: Server) -> Server:
    return chat_server  # one server for the API translator tests (conftest.py)


def _ollama_text(oc: ollama.Client, model: str, messages: list[dict[str, Any]], **kw: Any) -> str:
    return str(oc.chat(model=model, messages=messages, options=GREEDY, **kw).message.content)


def test_create_with_string_input(ai: openai.OpenAI, oc: ollama.Client) -> None:
    r = ai.responses.create(model="tooly", input="Name a colour.", instructions="Be brief.", temperature=0,
                            max_output_tokens=8)
    assert r.object == "response" and r.status == "completed" and r.id.startswith("resp_") and r.model == "tooly"
    assert [o.type for o in r.output] == ["message"] and r.output[0].role == "assistant"
    assert r.output_text == _ollama_text(oc, "tooly", [{"role": "system", "content": "Be brief."},
                                                       {"role": "user", "content": "Name a colour."}])
    assert r.usage.input_tokens > 0 and 0 < r.usage.output_tokens <= 8
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.instructions == "Be brief." and r.max_output_tokens == 8


def test_create_with_items(ai: openai.OpenAI, oc: ollama.Client) -> None:
    items = [{"role": "developer", "content": "Answer in English."},
             {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Name a fruit."}]},
             {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Apple."}]},
             {"role": "user", "content": "Another one?"}]
    r = ai.responses.create(model="tooly", input=items, temperature=0, max_output_tokens=8)
    same = [{"role": "system", "content": "Answer in English."}, {"role": "user", "content": "Name a fruit."},
            {"role": "assistant", "content": "Apple."}, {"role": "user", "content": "Another one?"}]
    assert r.output_text == _ollama_text(oc, "tooly", same)


def test_stream_events(ai: openai.OpenAI) -> None:
    kw: dict[str, Any] = {"model": "tooly", "input": "Count to five.", "temperature": 0, "max_output_tokens": 6}
    plain = ai.responses.create(**kw)
    events = list(ai.responses.create(stream=True, **kw))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == plain.output_text
    done = events[-1].response
    assert done.status == "completed" and done.output_text == text and done.usage.output_tokens == 6
    # The SDK's accumulating helper checks the events' consistency (ids, indexes, order).
    with ai.responses.stream(**kw) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text == plain.output_text


def test_function_calls(ai: openai.OpenAI, oc: ollama.Client) -> None:
    kw: dict[str, Any] = {"model": "tooly", "input": "Weather in Paris?", "tools": [TOOL], "temperature": 0,
                          "max_output_tokens": 40, "text": FORCE_CALL}
    r = ai.responses.create(**kw)
    calls = [o for o in r.output if o.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather" and json.loads(calls[0].arguments) == {"city": "Paris"}
    assert calls[0].call_id and calls[0].status == "completed"
    with ai.responses.stream(**kw) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_response()
    assert "response.function_call_arguments.delta" in kinds and "response.function_call_arguments.done" in kinds
    assert [json.loads(o.arguments) for o in final.output if o.type == "function_call"] == [{"city": "Paris"}]
    # The round trip: function_call and function_call_output items as Ollama's tool call and tool message.
    history = [{"role": "user", "content": "Weather in Paris?"},
               {"type": "function_call", "call_id": calls[0].call_id, "name": "get_weather", "arguments": '{"city": "Paris"}'},
               {"type": "function_call_output", "call_id": calls[0].call_id, "output": "18 C, sunny"}]
    answer = ai.responses.create(model="tooly", input=history, tools=[TOOL], temperature=0, max_output_tokens=8)
    same = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
            {"role": "tool", "content": "18 C, sunny", "tool_name": "get_weather"}]
    assert answer.output_text == _ollama_text(oc, "tooly", same, tools=[OLLAMA_TOOL])


def test_reasoning_items(ai: openai.OpenAI) -> None:
    kw: dict[str, Any] = {"model": "thinker", "input": "Capital of France?", "temperature": 0, "max_output_tokens": 30}
    r = ai.responses.create(**kw)
    assert [o.type for o in r.output] == ["reasoning", "message"]
    assert r.output[0].summary[0].text == THOUGHT and r.output_text == ANSWER
    with ai.responses.stream(**kw) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_response()
    assert "response.reasoning_summary_text.delta" in kinds
    assert kinds.index("response.output_text.delta") > kinds.index("response.reasoning_summary_text.done")
    assert [o.type for o in final.output] == ["reasoning", "message"] and final.output_text == ANSWER
    # A format constrains the answer, after the reasoning.
    fmt = ai.responses.create(**kw, text={"format": {"type": "json_schema", "name": "a", "schema": ANSWER_SCHEMA}})
    assert fmt.output[0].summary[0].text == THOUGHT and fmt.output_text == f'"{ANSWER}"'
    off = ai.responses.create(**kw, reasoning={"effort": "none"})
    assert [o.type for o in off.output] == ["message"] and off.output_text == f"<think>\n{THOUGHT}</think>\n{ANSWER}"


def test_bad_requests(ai: openai.OpenAI, server: Server) -> None:
    with pytest.raises(openai.BadRequestError, match="previous_response_id"):
        ai.responses.create(model="tooly", input="Hi", previous_response_id="resp_1")
    with pytest.raises(openai.BadRequestError, match="web_search"):
        ai.responses.create(model="tooly", input="Hi", tools=[{"type": "web_search"}])
    with pytest.raises(openai.BadRequestError, match="does not support thinking"):
        ai.responses.create(model="tooly", input="Hi", reasoning={"effort": "high"})
    with pytest.raises(openai.NotFoundError):
        ai.responses.create(model="nope", input="Hi")
    r = httpx.post(server.url + "/v1/responses", json={"model": "tooly"}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error" and "input" in r.text
