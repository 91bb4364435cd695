"""What Ollama clients rely on beyond the happy path (issue 12): null and
unknown options, embeddings as long as the context, tool calls streamed as
they complete, Ollama's refusals and texts, HEAD routes and the version.
A real `ember serve` on a loopback port and the demo model."""

from __future__ import annotations

import json

import httpx
import ollama
import openai
import pytest
from server_fixtures import CALL_SCHEMA, THINK_TEMPLATE, TOOLS_TEMPLATE, WEATHER_TOOL, Server, create

GREEDY = {"temperature": 0, "num_predict": 8}
HI = [{"role": "user", "content": "Hi! How are you?"}]
WEATHER = [{"role": "user", "content": "What's the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Server:
    from ember.demo import demo_model_path

    srv = Server(tmp_path_factory.mktemp("compat-models"))
    demo = demo_model_path()
    create(srv.url, "tooly", f'FROM {demo}\nTEMPLATE """{TOOLS_TEMPLATE}"""\nPARAMETER num_ctx 512\nPARAMETER batch_invariant true\n')
    create(srv.url, "embedder", f"FROM {demo}\nPARAMETER num_ctx 640\n")
    yield srv
    srv.stop()


def _post(server: Server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=300)


# --- 1. options -------------------------------------------------------------------------------
def test_null_and_unknown_options_are_not_rejected(server: Server) -> None:
    # LlamaIndex sends "temperature": null; LangChain's embeddings a dozen nulls; newer clients unknown names
    options = {"temperature": None, "mirostat": None, "num_ctx": None, "stop": None, "num_predict": 2,
               "no_such_option": 1, "another_unknown": "x"}
    r = _post(server, "/api/generate", {"model": "tooly", "prompt": "Hi", "stream": False, "options": options})
    assert r.status_code == 200, r.text
    assert r.json()["eval_count"] <= 2
    r = _post(server, "/api/embed", {"model": "tooly", "input": "Hi", "options": {"mirostat": None, "tfs_z": None}})
    assert r.status_code == 200, r.text
    assert "ignoring unknown option \"no_such_option\"" in server.log.read_text()


@pytest.mark.parametrize("options,message", [
    ({"temperature": "hot"}, "parameter 'temperature' needs a number, got \"hot\""),
    ({"top_k": [1]}, "parameter 'top_k' needs an integer, got [1]"),
    ({"use_mmap": {"a": None}}, "parameter 'use_mmap' needs true or false, got {\"a\": null}"),
    ({"top_p": 3}, "parameter 'top_p' must be between 0 and 1, got 3.0"),
])
def test_wrong_option_values_are_400_without_python_reprs(server: Server, options: dict, message: str) -> None:
    r = _post(server, "/api/generate", {"model": "tooly", "prompt": "Hi", "stream": False, "options": options})
    assert r.status_code == 400 and r.json() == {"error": message}


# --- 2. embeddings ----------------------------------------------------------------------------
def test_embeddings_are_not_cut_at_the_batch_size(oc: ollama.Client) -> None:
    """embedder has num_ctx 640 and the default num_batch 512."""
    words = "The quick brown fox jumps over the lazy dog near the river bank. "
    base = words * 44  # about 600 tokens: over num_batch, under num_ctx
    a = oc.embed(model="embedder", input=base + "Cats are wonderful pets.")
    b = oc.embed(model="embedder", input=base + "Stock markets fell sharply today.")
    assert 512 < a.prompt_eval_count <= 640
    assert a.embeddings[0] != b.embeddings[0]  # the ends differ, past token 512
    # truncate=false: refused only past num_ctx
    r = oc.embed(model="embedder", input=base, truncate=False)
    assert 512 < r.prompt_eval_count <= 640
    long = words * 60  # about 800 tokens
    with pytest.raises(ollama.ResponseError) as ei:
        oc.embed(model="embedder", input=long, truncate=False)
    assert ei.value.status_code == 400 and "context length of 640" in ei.value.error
    # truncate=true (the default): cut at num_ctx, and the count says so
    assert oc.embed(model="embedder", input=long).prompt_eval_count == 640


# --- 5. tool calls, streamed ------------------------------------------------------------------
def test_text_streams_while_tools_are_offered(oc: ollama.Client, ai: openai.OpenAI) -> None:
    parts = list(oc.chat(model="tooly", messages=HI, tools=[WEATHER_TOOL], options=GREEDY, stream=True))
    texts = [p.message.content for p in parts if not p.done and p.message.content]
    assert len(texts) > 1, parts  # token by token, not one chunk at the end
    assert not any(p.message.tool_calls for p in parts)
    whole = oc.chat(model="tooly", messages=HI, tools=[WEATHER_TOOL], options=GREEDY)
    assert "".join(texts).rstrip() == whole.message.content
    chunks = list(ai.chat.completions.create(model="tooly", messages=HI, tools=[WEATHER_TOOL], temperature=0,
                                             max_tokens=8, stream=True))
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(deltas) > 1


def test_streamed_tool_calls_carry_id_and_index(server: Server, oc: ollama.Client, ai: openai.OpenAI) -> None:
    opts = {"temperature": 0, "num_predict": 40}
    parts = list(oc.chat(model="tooly", messages=WEATHER, tools=[WEATHER_TOOL], format=CALL_SCHEMA, options=opts,
                         stream=True))
    with_calls = [p for p in parts if p.message.tool_calls]
    assert len(with_calls) == 1 and not with_calls[0].done and parts[-1].done
    # the raw line, as Ollama writes it
    r = _post(server, "/api/chat", {"model": "tooly", "messages": WEATHER, "tools": [WEATHER_TOOL],
                                    "format": CALL_SCHEMA, "options": opts, "stream": False})
    (call,) = r.json()["message"]["tool_calls"]
    assert call["id"].startswith("call_") and call["function"] == {
        "index": 0, "name": "get_weather", "arguments": {"city": "Paris"}}
    chunks = list(ai.chat.completions.create(
        model="tooly", messages=WEATHER, tools=[WEATHER_TOOL], temperature=0, max_tokens=40, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "call", "schema": CALL_SCHEMA}}))
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert [(tc.index, tc.function.name, json.loads(tc.function.arguments)) for tc in calls] == [
        (0, "get_weather", {"city": "Paris"})]
    assert calls[0].id.startswith("call_")
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


# --- 6. refusals ------------------------------------------------------------------------------
@pytest.mark.parametrize("path,body,message", [
    ("/api/chat", {"model": "demo", "messages": HI, "tools": [WEATHER_TOOL]}, "demo:latest does not support tools"),
    ("/api/chat", {"model": "tooly", "messages": HI, "think": True}, '"tooly" does not support thinking'),
    ("/api/generate", {"model": "tooly", "prompt": "Hi", "think": "high"}, '"tooly" does not support thinking'),
    ("/api/generate", {"model": "demo", "prompt": "def f(", "suffix": "return x"}, "demo:latest does not support insert"),
    ("/v1/chat/completions", {"model": "demo", "messages": HI, "tools": [WEATHER_TOOL]}, "demo:latest does not support tools"),
    ("/v1/chat/completions", {"model": "demo", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}]}, "cannot see images"),
])
def test_requests_ollama_refuses_are_refused(server: Server, path: str, body: dict, message: str) -> None:
    r = _post(server, path, {**body, "stream": False})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert message in (err["message"] if isinstance(err, dict) else err)


def test_what_a_template_can_take() -> None:
    from ember.templates import ChatTemplate

    assert ChatTemplate.parse(TOOLS_TEMPLATE).capabilities == ["tools"]
    assert ChatTemplate.parse("{{ .Prompt }}{{ .Suffix }}").capabilities == ["insert"]
    # thinking: the template shows reasoning between tags (learned by rendering it)
    assert ChatTemplate.parse(THINK_TEMPLATE).capabilities == ["thinking"]
    jinja = ("{% for m in messages %}{% if m.thinking %}<think>{{ m.thinking }}</think>{% endif %}{{ m.content }}{% endfor %}"
             "{% if enable_thinking %}<think>{% endif %}")
    assert ChatTemplate.parse(jinja).capabilities == ["thinking"]
    # a template that only opens a tag shows no reasoning
    assert ChatTemplate.parse("{{ if .Think }}<think>{{ end }}{{ .Prompt }}").capabilities == []


def test_think_false_and_no_tools_are_fine(server: Server) -> None:
    r = _post(server, "/api/chat", {"model": "tooly", "messages": HI, "think": False, "tools": [],
                                    "options": {"num_predict": 1}, "stream": False})
    assert r.status_code == 200, r.text


# --- 7. HEAD and version ----------------------------------------------------------------------
def test_head_routes_and_ollama_version(server: Server) -> None:
    from ember.__about__ import __version__

    for path in ("/", "/api/version", "/api/tags"):
        assert httpx.head(server.url + path, timeout=30).status_code == 200, path
    v = httpx.get(server.url + "/api/version", timeout=30).json()
    assert v["ember_version"] == __version__
    assert tuple(int(x) for x in v["version"].split(".")) >= (0, 12, 0)  # Open WebUI needs >= 0.1.16


# --- 8. shapes and texts ----------------------------------------------------------------------
def test_not_found_texts_and_model_ids(server: Server, ai: openai.OpenAI) -> None:
    r = _post(server, "/api/chat", {"model": "nope", "messages": HI})
    assert r.status_code == 404 and r.json() == {"error": 'model "nope" not found, try pulling it first'}
    r = _post(server, "/api/embed", {"model": "nope", "input": "x"})
    assert r.status_code == 404 and r.json() == {"error": 'model "nope" not found, try pulling it first'}
    with pytest.raises(openai.NotFoundError) as ei:
        ai.chat.completions.create(model="nope", messages=HI)
    assert 'model "nope" not found, try pulling it first' in str(ei.value)
    r = _post(server, "/api/show", {"model": "nope"})
    assert r.status_code == 404 and r.json() == {"error": "model 'nope' not found"}
    assert ai.models.retrieve("tooly").id == "tooly"
    assert ai.models.retrieve("tooly:latest").id == "tooly:latest"
