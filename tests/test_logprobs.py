"""Log probabilities (issue #12): the values against llama.cpp's own logits
(llama-cpp-python's Llama with logits_all, log-softmax in numpy), with and
without speculative drafts and with sampling; then the wire formats through
the official clients (``ollama``, ``openai``) and bad input."""

from __future__ import annotations

import ctypes
import json
import math
from pathlib import Path
from typing import Any

import httpx
import llama_cpp
import numpy as np
import ollama
import openai
import pytest
from server_fixtures import ANSWER, CALL_SCHEMA, THOUGHT, WEATHER_TOOL, Server

from ember.api import Model

# Input-grounded: the continuation quotes the prompt, so speculative drafts are accepted.
SOURCE = (
    "The committee met on Tuesday to review the budget for the new library. After a long discussion, "
    "the members agreed to fund the project with two million dollars, to start construction in the spring."
)
REPEAT = f"{SOURCE}\n\nRepeat the text above exactly:\n\n{SOURCE[:40]}"
TOL = 1e-4  # same batch shapes as the reference: measured differences are about 2e-8
TOP = 5


@pytest.fixture(scope="module")
def model(demo_model: Path) -> Any:
    with Model(demo_model, num_ctx=512, batch_invariant=True) as m:
        yield m


@pytest.fixture(scope="module")
def reference(demo_model: Path) -> Any:
    """llama.cpp's logits at every position of a prompt and its continuation,
    log-softmaxed (float64). Evaluated in the batch shapes of a
    batch_invariant generation (the prompt in chunks of 64, then one token at
    a time): llama.cpp's CPU kernels round differently for other shapes."""
    llm = llama_cpp.Llama(model_path=str(demo_model), n_ctx=256, n_batch=64, n_ubatch=64, logits_all=True,
                          verbose=False, flash_attn=True)

    def logprobs(prompt: list[int], generated: list[int]) -> np.ndarray:
        llm.reset()
        llm.eval(prompt)
        for tok in generated[:-1]:
            llm.eval([tok])
        rows = np.asarray(llm.scores[: llm.n_tokens], dtype=np.float64)
        m = rows.max(axis=1, keepdims=True)
        return rows - m - np.log(np.exp(rows - m).sum(axis=1, keepdims=True))

    def piece(token: int) -> bytes:
        buf = ctypes.create_string_buffer(256)
        n = llama_cpp.llama_token_to_piece(llm._model.vocab, token, buf, len(buf), 0, False)
        return buf.raw[:n]

    logprobs.piece = piece  # type: ignore[attr-defined]
    return logprobs


def _check_against_reference(reference: Any, result: Any) -> None:
    """Each entry is the reference log-softmax at its position: the chosen
    token's value and bytes, the top alternatives' values in order, and their
    bytes where no near-tie makes the order float noise."""
    generated = result.context[len(result.context) - result.eval_count :]
    prompt = result.context[: len(result.context) - result.eval_count]
    assert result.logprobs is not None and len(result.logprobs) == result.eval_count == len(generated) > 0
    lp = reference(prompt, generated)
    for j, (tok, entry) in enumerate(zip(generated, result.logprobs)):
        row = lp[len(prompt) - 1 + j]
        assert abs(entry["logprob"] - row[tok]) < TOL, (j, entry["logprob"], row[tok])
        assert bytes(entry["bytes"]) == reference.piece(tok)
        assert entry["token"] == bytes(entry["bytes"]).decode("utf-8", "replace")
        order = np.argsort(-row, kind="stable")[: TOP + 1]
        top = entry["top_logprobs"]
        assert len(top) == TOP
        assert np.allclose([t["logprob"] for t in top], row[order[:TOP]], atol=TOL, rtol=0)
        for i, t in enumerate(top):
            neighbours = [row[order[k]] for k in (i - 1, i + 1) if 0 <= k <= TOP]
            if all(abs(row[order[i]] - v) > 2 * TOL for v in neighbours):
                assert bytes(t["bytes"]) == reference.piece(int(order[i])), (j, i)


def test_values_are_llama_cpps_log_softmax(model: Model, reference: Any) -> None:
    r = model.generate("The capital of France is", raw=True, temperature=0, repeat_penalty=1.0, num_predict=20,
                       num_draft=0, logprobs=True, top_logprobs=TOP)
    assert r.draft_count == 0
    _check_against_reference(reference, r)
    # Greedy: the chosen token is the most likely one.
    assert all(e["logprob"] >= e["top_logprobs"][0]["logprob"] - TOL for e in r.logprobs)


def test_tokens_accepted_from_drafts_are_scored_at_their_position(model: Model, reference: Any) -> None:
    r = model.generate(REPEAT, raw=True, temperature=0, repeat_penalty=1.0, num_predict=32, logprobs=True,
                       top_logprobs=TOP)
    assert 0 < r.draft_accepted <= r.draft_count
    _check_against_reference(reference, r)


def test_values_are_before_penalties_and_temperature(model: Model, reference: Any) -> None:
    """Sampled with penalties, temperature and top-k: the values are still the
    model's own distribution at each position."""
    r = model.generate(REPEAT, raw=True, temperature=1.5, top_k=20, repeat_penalty=1.3, seed=7, num_predict=24,
                       logprobs=True, top_logprobs=TOP)
    _check_against_reference(reference, r)


def test_stream_chunks_carry_the_entries_of_their_tokens(model: Model) -> None:
    chunks = list(model.generate("Once upon a time", raw=True, temperature=0, num_predict=12, stream=True,
                                 logprobs=True))
    entries = [e for c in chunks for e in c.logprobs or []]
    assert len(entries) == chunks[-1].result.eval_count == 12
    assert all("top_logprobs" not in e for e in entries)  # none asked for: omitted, as Ollama does
    text = "".join(c.text for c in chunks)
    assert b"".join(bytes(e["bytes"]) for e in entries) == text.encode()
    plain = model.generate("Once upon a time", raw=True, temperature=0, num_predict=4)
    assert plain.logprobs is None


@pytest.mark.parametrize("value", [21, -1, "x", True])
def test_bad_top_logprobs_is_refused(model: Model, value: Any) -> None:
    with pytest.raises(Exception, match="top_logprobs"):
        model.generate("Hi", logprobs=True, top_logprobs=value)


# --- the APIs ---------------------------------------------------------------

OPTIONS = {"temperature": 0, "num_predict": 16}


def _check_entries(entries: list[Any], count: int, text: str, top: int) -> None:
    """``count`` entries whose bytes make ``text``; top alternatives sorted, within one distribution."""
    assert len(entries) == count > 0
    assert b"".join(bytes(e["bytes"]) for e in entries) == text.encode()
    if text.isascii():
        assert "".join(e["token"] for e in entries) == text
    for e in entries:
        assert e["logprob"] <= 0
        alts = e.get("top_logprobs") or []
        assert len(alts) == top
        values = [a["logprob"] for a in alts]
        assert values == sorted(values, reverse=True)
        assert sum(math.exp(v) for v in values) <= 1 + 1e-6
        if alts:
            assert e["logprob"] <= values[0] + 1e-9


def _entries(objs: Any) -> list[dict[str, Any]]:
    """Client objects (pydantic models) as plain dicts."""
    return [o if isinstance(o, dict) else o.model_dump() for o in objs]


def test_ollama_client_generate_and_chat(chat_server: Server) -> None:
    client = ollama.Client(host=chat_server.url)
    r = client.generate(model="tooly", prompt="The capital of France is", raw=True, logprobs=True, top_logprobs=3,
                        options=OPTIONS)
    entries = _entries(r.logprobs)
    assert len(entries) == r.eval_count
    # The ollama client drops the bytes; the raw reply has them.
    raw = httpx.post(chat_server.url + "/api/generate", timeout=120, json={
        "model": "tooly", "prompt": "The capital of France is", "raw": True, "stream": False, "logprobs": True,
        "top_logprobs": 3, "options": OPTIONS}).json()
    _check_entries(raw["logprobs"], raw["eval_count"], raw["response"], 3)
    assert [e["logprob"] for e in entries] == [e["logprob"] for e in raw["logprobs"]]

    parts = list(client.generate(model="tooly", prompt="The capital of France is", raw=True, logprobs=True,
                                 top_logprobs=3, options=OPTIONS, stream=True))
    streamed = [e for p in parts for e in _entries(p.logprobs or [])]
    assert [e["logprob"] for e in streamed] == [e["logprob"] for e in entries]
    assert "".join(e["token"] for e in streamed) == "".join(p.response for p in parts)

    msgs = [{"role": "user", "content": "Name a color."}]
    c = client.chat(model="tooly", messages=msgs, logprobs=True, top_logprobs=2, options=OPTIONS)
    assert len(c.logprobs) == c.eval_count
    assert "".join(e.token for e in c.logprobs) == c.message.content or not c.message.content.isascii()
    parts = list(client.chat(model="tooly", messages=msgs, logprobs=True, top_logprobs=2, options=OPTIONS,
                             stream=True))
    assert len([e for p in parts for e in p.logprobs or []]) == parts[-1].eval_count == c.eval_count


def _stream_lines(url: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    with httpx.stream("POST", url, json=body, timeout=120) as resp:
        return [json.loads(line) for line in resp.iter_lines()]


def test_text_held_back_by_the_parsers_keeps_its_entries(chat_server: Server) -> None:
    """The reasoning parser and the tool-call parser hold text back; the
    entries still come, one per generated token, in order (the tags too)."""
    lines = _stream_lines(chat_server.url + "/api/chat", {
        "model": "thinker", "messages": [{"role": "user", "content": "Capital of France?"}], "logprobs": True,
        "options": {"temperature": 0, "num_predict": 30}})
    entries = [e for x in lines for e in x.get("logprobs", [])]
    assert len(entries) == lines[-1]["eval_count"]
    assert "".join(x["message"].get("thinking", "") for x in lines) == THOUGHT
    assert "".join(e["token"] for e in entries).startswith(f"{THOUGHT}</think>\n{ANSWER}")
    lines = _stream_lines(chat_server.url + "/api/chat", {
        "model": "tooly", "messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": [WEATHER_TOOL],
        "logprobs": True, "format": CALL_SCHEMA, "options": {"temperature": 0, "num_predict": 40}})
    entries = [e for x in lines for e in x.get("logprobs", [])]
    calls = [c for x in lines for c in x["message"].get("tool_calls", [])]
    assert len(entries) == lines[-1]["eval_count"] and [c["function"]["name"] for c in calls] == ["get_weather"]
    assert json.loads("".join(e["token"] for e in entries))["arguments"] == {"city": "Paris"}


def test_openai_chat_completions(chat_server: Server) -> None:
    client = openai.OpenAI(base_url=chat_server.url + "/v1", api_key="x")
    msgs = [{"role": "user", "content": "Name a color."}]
    r = client.chat.completions.create(model="tooly", messages=msgs, logprobs=True, top_logprobs=4, max_tokens=16,
                                       temperature=0)
    content = r.choices[0].message.content or ""
    _check_entries(_entries(r.choices[0].logprobs.content), r.usage.completion_tokens, content, 4)
    stream = client.chat.completions.create(model="tooly", messages=msgs, logprobs=True, top_logprobs=4,
                                            max_tokens=16, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    entries, text, usage = [], "", None
    for chunk in stream:
        usage = chunk.usage or usage
        for ch in chunk.choices:
            text += ch.delta.content or ""
            entries += _entries(ch.logprobs.content if ch.logprobs else [])
    assert text == content and usage is not None
    _check_entries(entries, usage.completion_tokens, text, 4)
    off = client.chat.completions.create(model="tooly", messages=msgs, max_tokens=4, temperature=0)
    assert off.choices[0].logprobs is None


def test_openai_completions(chat_server: Server) -> None:
    client = openai.OpenAI(base_url=chat_server.url + "/v1", api_key="x")
    r = client.completions.create(model="tooly", prompt="The capital of France is", logprobs=3, max_tokens=16,
                                  temperature=0)
    lp = r.choices[0].logprobs
    text = r.choices[0].text
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens
    assert "".join(lp.tokens) == text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert 1 <= len(top) <= 3 and sum(math.exp(v) for v in top.values()) <= 1 + 1e-6
        assert chosen <= max(top.values()) + 1e-9
    chunks = list(client.completions.create(model="tooly", prompt="The capital of France is", logprobs=3,
                                            max_tokens=16, temperature=0, stream=True))
    tokens = [t for c in chunks for ch in c.choices if ch.logprobs for t in ch.logprobs.tokens]
    offsets = [o for c in chunks for ch in c.choices if ch.logprobs for o in ch.logprobs.text_offset]
    assert tokens == lp.tokens and offsets == lp.text_offset
    echoed = client.completions.create(model="tooly", prompt="Hello", logprobs=0, max_tokens=4, temperature=0,
                                       echo=True)
    assert echoed.choices[0].logprobs.text_offset[0] == len("Hello")


@pytest.mark.parametrize("path,body", [
    ("/api/generate", {"prompt": "Hi", "logprobs": True}),
    ("/api/chat", {"messages": [{"role": "user", "content": "Hi"}], "logprobs": True}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "logprobs": True}),
])
@pytest.mark.parametrize("value", [21, -1, "x"])
def test_bad_top_logprobs_is_a_400_naming_the_field(chat_server: Server, path: str, body: dict[str, Any],
                                                    value: Any) -> None:
    r = httpx.post(chat_server.url + path, json={"model": "tooly", **body, "top_logprobs": value}, timeout=60)
    assert r.status_code == 400 and "top_logprobs" in r.text, r.text


@pytest.mark.parametrize("value", [21, -1, "x"])
def test_bad_completions_logprobs_is_a_400_naming_the_field(chat_server: Server, value: Any) -> None:
    r = httpx.post(chat_server.url + "/v1/completions", json={"model": "tooly", "prompt": "Hi", "logprobs": value},
                   timeout=60)
    assert r.status_code == 400 and "logprobs" in r.text, r.text


def test_openai_responses(chat_server: Server) -> None:
    client = openai.OpenAI(base_url=chat_server.url + "/v1", api_key="x")
    kw: dict[str, Any] = {"model": "tooly", "input": "Name a color.", "include": ["message.output_text.logprobs"],
                          "top_logprobs": 2, "max_output_tokens": 16, "temperature": 0}
    r = client.responses.create(**kw)
    part = r.output[0].content[0]
    assert r.top_logprobs == 2
    _check_entries(_entries(part.logprobs), r.usage.output_tokens, part.text, 2)
    deltas, done = [], None
    for e in client.responses.create(stream=True, **kw):
        if e.type == "response.output_text.delta":
            deltas += _entries(e.logprobs)
        elif e.type == "response.output_text.done":
            done = _entries(e.logprobs)
    assert done is not None and [d["logprob"] for d in deltas] == [d["logprob"] for d in done]
    assert [d["logprob"] for d in done] == [e["logprob"] for e in _entries(part.logprobs)]
    plain = client.responses.create(model="tooly", input="Name a color.", max_output_tokens=4, temperature=0)
    assert plain.output[0].content[0].logprobs == []
