"""LiteLLM's Ollama providers against a real `ember serve`: ``ollama/``
(/api/generate) and ``ollama_chat/`` (/api/chat), plain and streamed, and the
thinking model's reasoning as LiteLLM reports it."""

from __future__ import annotations

import os
from typing import Any

import pytest
from server_fixtures import ANSWER, THOUGHT, Server

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no download of its price list
import litellm

GREEDY = {"temperature": 0, "max_tokens": 6}
QUESTION = [{"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def server(chat_server: Server) -> Server:
    return chat_server  # one server for the API translator tests (conftest.py)


def test_ollama_chat_provider(server: Server) -> None:
    ref = server.ollama_client().chat(
        model="tooly", messages=QUESTION, options={"temperature": 0, "num_predict": 6})
    r = litellm.completion(model="ollama_chat/tooly", messages=QUESTION, api_base=server.url, **GREEDY)
    assert r.choices[0].message.content == ref.message.content
    assert r.usage.completion_tokens == ref.eval_count and r.usage.prompt_tokens == ref.prompt_eval_count
    chunks = list(litellm.completion(model="ollama_chat/tooly", messages=QUESTION, api_base=server.url, stream=True,
                                     **GREEDY))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ref.message.content


def test_ollama_generate_provider(server: Server) -> None:
    r = litellm.completion(model="ollama/demo", messages=QUESTION, api_base=server.url, **GREEDY)
    text = r.choices[0].message.content
    assert text and r.usage.completion_tokens == 6
    chunks = list(litellm.completion(model="ollama/demo", messages=QUESTION, api_base=server.url, stream=True, **GREEDY))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text


def test_reasoning_through_litellm(server: Server) -> None:
    kw: dict[str, Any] = {"messages": [{"role": "user", "content": "Capital of France?"}], "api_base": server.url,
                          "temperature": 0, "max_tokens": 30}
    r = litellm.completion(model="ollama_chat/thinker", **kw)
    assert r.choices[0].message.content == ANSWER
    assert r.choices[0].message.reasoning_content == THOUGHT
