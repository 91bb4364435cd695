"""The HTTP server driven by the official `ollama` and `openai` clients: a real
`ember serve` subprocess on a loopback port, the real demo model (gemma-3-270m
Q4_K_M), greedy decoding so outputs can be compared exactly."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import httpx
import ollama
import openai
import pytest
from server_fixtures import CALL_SCHEMA, TOOLS_TEMPLATE, WEATHER_TOOL, Server, create

GREEDY = {"temperature": 0, "num_predict": 6}
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Server:
    from ember.demo import demo_model_path

    d = tmp_path_factory.mktemp("server-models")
    srv = Server(d, EMBER_NUM_PARALLEL="4")
    srv.demo_path = str(demo_model_path())  # type: ignore[attr-defined]
    create(srv.url, "tooly", f'FROM {srv.demo_path}\nTEMPLATE """{TOOLS_TEMPLATE}"""\nPARAMETER num_ctx 512\nPARAMETER batch_invariant true\nSYSTEM "Be brief."\n')
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def reference(server: Server) -> str:
    """The demo model's greedy continuation of PROMPT, from the library directly."""
    from ember.api import Model

    with Model(server.demo_path) as m:  # type: ignore[attr-defined]
        return m.generate(PROMPT, raw=True, options=GREEDY).text  # type: ignore[union-attr]


# --- Ollama API -----------------------------------------------------------------------
def test_generate_matches_library_and_reports_metrics(oc: ollama.Client, reference: str) -> None:
    r = oc.generate(model="demo", prompt=PROMPT, options=GREEDY, stream=False)
    assert r.response == reference and r.response.strip()
    assert r.done and r.done_reason == "length"
    assert r.eval_count == 6
    assert r.prompt_eval_count and r.prompt_eval_count >= 1
    assert r.total_duration and r.eval_duration and r.prompt_eval_duration
    assert r.total_duration >= r.eval_duration
    assert r.context and len(r.context) > 6


def test_generate_stream_concatenates_to_the_same_text(oc: ollama.Client, reference: str) -> None:
    parts = list(oc.generate(model="demo", prompt=PROMPT, options=GREEDY, stream=True))
    assert len(parts) >= 2 and all(not p.done for p in parts[:-1])
    assert parts[-1].done and parts[-1].done_reason == "length" and parts[-1].eval_count == 6
    assert "".join(p.response for p in parts) == reference


def test_generate_reports_speculative_drafts(server: Server) -> None:
    """Input-grounded text: n-gram drafts are accepted, and the final chunk says so;
    num_draft 0 turns speculation off."""
    text = "The library opens on Monday at nine. The library closes on Friday at six. "
    prompt = f"{text}\n\nThe same text again:\n\n{text}{text}"
    counts = []
    for extra in ({}, {"num_draft": 0}):
        r = httpx.post(server.url + "/api/generate", json={"model": "demo", "prompt": prompt, "raw": True, "stream": False,
                                                            "options": {**GREEDY, "num_predict": 24, **extra}}, timeout=120)
        assert r.status_code == 200, r.text
        counts.append((r.json()["draft_count"], r.json()["draft_accepted"]))
    (drafted, accepted), (off_drafted, off_accepted) = counts
    assert 0 < accepted <= drafted and off_drafted == off_accepted == 0
    r = httpx.post(server.url + "/api/generate", json={"model": "demo", "prompt": "x", "options": {"num_draft": -1}}, timeout=60)
    assert r.status_code == 400 and "num_draft" in r.json()["error"]


def test_generate_stream_is_the_default_ndjson(server: Server) -> None:
    r = httpx.post(server.url + "/api/generate", json={"model": "demo", "prompt": PROMPT, "options": GREEDY}, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(x) for x in r.text.splitlines()]
    assert lines[-1]["done"] is True and all(x["done"] is False for x in lines[:-1])


def test_chat_and_chat_stream(oc: ollama.Client) -> None:
    msgs = [{"role": "user", "content": "Name a colour."}]
    r = oc.chat(model="tooly", messages=msgs, options=GREEDY)
    assert r.message.role == "assistant" and r.message.content and r.done_reason in ("stop", "length")
    parts = list(oc.chat(model="tooly", messages=msgs, options=GREEDY, stream=True))
    assert "".join(p.message.content or "" for p in parts) == r.message.content
    assert parts[-1].done and parts[-1].eval_count == r.eval_count


def test_json_mode_and_schema_parse(oc: ollama.Client, ai: openai.OpenAI) -> None:
    opts = {"temperature": 0, "num_predict": 48}
    r = oc.generate(model="demo", prompt="A JSON object describing a cat:", format="json", options=opts)
    assert r.done_reason == "stop", r.response
    assert isinstance(json.loads(r.response), dict)
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
              "required": ["name", "age"]}
    r = oc.generate(model="demo", prompt="A JSON object describing a cat:", format=schema, options=opts)
    value = json.loads(r.response)
    assert isinstance(value["name"], str) and len(value["name"]) <= 12 and isinstance(value["age"], int)
    c = ai.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "Describe a cat as JSON."}], temperature=0, max_tokens=48,
        response_format={"type": "json_schema", "json_schema": {"name": "cat", "schema": schema}},
    )
    value = json.loads(c.choices[0].message.content or "")
    assert set(value) >= {"name", "age"} and isinstance(value["age"], int)
    c = ai.chat.completions.create(model="demo", messages=[{"role": "user", "content": "A cat as JSON:"}],
                                   temperature=0, max_tokens=48, response_format={"type": "json_object"})
    assert isinstance(json.loads(c.choices[0].message.content or ""), dict)


def test_tool_calls_ollama_and_openai(oc: ollama.Client, ai: openai.OpenAI) -> None:
    msgs = [{"role": "user", "content": "What's the weather in Paris?"}]
    r = oc.chat(model="tooly", messages=msgs, tools=[WEATHER_TOOL], format=CALL_SCHEMA, options={"temperature": 0, "num_predict": 40})
    assert r.message.tool_calls, r.message
    call = r.message.tool_calls[0].function
    assert call.name == "get_weather" and call.arguments == {"city": "Paris"}
    # streamed: the call arrives as one message before the final chunk
    parts = list(oc.chat(model="tooly", messages=msgs, tools=[WEATHER_TOOL], format=CALL_SCHEMA,
                         options={"temperature": 0, "num_predict": 40}, stream=True))
    calls = [c for p in parts for c in (p.message.tool_calls or [])]
    assert [c.function.name for c in calls] == ["get_weather"] and parts[-1].done
    # OpenAI: arguments as a JSON string, finish_reason tool_calls
    c = ai.chat.completions.create(
        model="tooly", messages=msgs, tools=[WEATHER_TOOL], temperature=0, max_tokens=40,
        response_format={"type": "json_schema", "json_schema": {"name": "call", "schema": CALL_SCHEMA}},
    )
    ch = c.choices[0]
    assert ch.finish_reason == "tool_calls" and ch.message.tool_calls
    tc = ch.message.tool_calls[0]
    assert tc.type == "function" and tc.function.name == "get_weather" and json.loads(tc.function.arguments) == {"city": "Paris"}
    assert tc.id.startswith("call_")
    # the call and its result go back in as history and render through the template
    history = msgs + [{"role": "assistant", "content": None, "tool_calls": [tc.model_dump()]},
                      {"role": "tool", "tool_call_id": tc.id, "content": "18 C, sunny"}]
    rendered = httpx.post(str(ai.base_url) + "chat/completions", json={
        "model": "tooly", "messages": history, "tools": [WEATHER_TOOL], "_debug_render_only": True}, timeout=60).json()
    text = rendered["_debug_info"]["rendered_template"]
    assert '<tool_call>{"name": "get_weather", "arguments": {"city":"Paris"}}</tool_call>' in text
    assert "18 C, sunny" in text and "Tools:\nget_weather" in text


def test_debug_render_only_returns_the_prompt(server: Server) -> None:
    r = httpx.post(server.url + "/api/chat", json={
        "model": "tooly", "messages": [{"role": "user", "content": "Hi"}], "_debug_render_only": True}, timeout=60)
    assert r.status_code == 200
    assert r.json()["_debug_info"]["rendered_template"] == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    r = httpx.post(server.url + "/api/generate", json={
        "model": "tooly", "prompt": "Hi", "system": "S", "_debug_render_only": True}, timeout=60)
    assert r.json()["_debug_info"]["rendered_template"] == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_embeddings_all_three_endpoints(oc: ollama.Client, ai: openai.OpenAI) -> None:
    e = oc.embed(model="demo", input=["The cat sat.", "Stock markets fell."])
    a, b = e.embeddings
    assert len(a) == 640 and abs(math.sqrt(sum(x * x for x in a)) - 1) < 1e-4
    assert sum(x * y for x, y in zip(a, b)) < 0.9999
    raw = oc.embeddings(model="demo", prompt="The cat sat.").embedding
    n = math.sqrt(sum(x * x for x in raw))
    assert abs(n - 1) > 1e-3  # the old endpoint is not normalized
    assert max(abs(x / n - y) for x, y in zip(raw, a)) < 1e-4
    o = ai.embeddings.create(model="demo", input=["The cat sat."])
    assert max(abs(x - y) for x, y in zip(o.data[0].embedding, a)) < 1e-5
    assert o.usage.prompt_tokens > 0
    short = oc.embed(model="demo", input="The cat sat.", dimensions=64).embeddings[0]
    assert len(short) == 64 and abs(math.sqrt(sum(x * x for x in short)) - 1) < 1e-4


# --- OpenAI API ---------------------------------------------------------------------------
def test_openai_chat_n_stop_usage(ai: openai.OpenAI, oc: ollama.Client) -> None:
    msgs = [{"role": "user", "content": "Name a colour."}]
    ref = oc.chat(model="tooly", messages=msgs, options=GREEDY).message.content
    c = ai.chat.completions.create(model="tooly", messages=msgs, temperature=0, max_tokens=6, n=2, seed=1)
    assert len(c.choices) == 2 and ref in [ch.message.content for ch in c.choices]
    assert c.choices[0].finish_reason in ("length", "stop") and c.object == "chat.completion"
    assert c.usage.completion_tokens == 2 * oc.chat(model="tooly", messages=msgs, options=GREEDY).eval_count
    # stop: the text ends before the stop string
    full = ai.completions.create(model="demo", prompt=PROMPT, temperature=0, max_tokens=6).choices[0].text
    word = full.split()[1]
    cut = ai.completions.create(model="demo", prompt=PROMPT, temperature=0, max_tokens=6, stop=[word]).choices[0]
    assert cut.text == full[: full.index(word)] and cut.finish_reason == "stop"


def test_openai_streams(ai: openai.OpenAI, reference: str) -> None:
    chunks = list(ai.completions.create(model="demo", prompt=PROMPT, temperature=0, max_tokens=6, stream=True,
                                        stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == reference
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    chunks = list(ai.chat.completions.create(model="tooly", messages=[{"role": "user", "content": "Hi"}],
                                             temperature=0, max_tokens=6, stream=True, n=2))
    texts = ["", ""]
    finish = [None, None]
    for ch in chunks:
        for c in ch.choices:
            texts[c.index] += c.delta.content or ""
            finish[c.index] = c.finish_reason or finish[c.index]
    # (Not compared with each other: one choice may reuse a cached prompt prefix and
    # the other not, and llama.cpp's numbers depend on how a prompt is split.)
    assert texts[0] and texts[1] and finish == ["length", "length"]


def test_openai_sse_wire_format(server: Server) -> None:
    r = httpx.post(server.url + "/v1/chat/completions", json={
        "model": "demo", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "stream": True}, timeout=60)
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [e for e in r.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_models_endpoints(ai: openai.OpenAI) -> None:
    ids = [m.id for m in ai.models.list()]
    assert "tooly:latest" in ids
    assert ai.models.retrieve("tooly").id == "tooly"  # the name asked for, as Ollama echoes it
    with pytest.raises(openai.NotFoundError):
        ai.models.retrieve("no-such-model")


# --- registry over HTTP ---------------------------------------------------------------------
def test_blob_upload_create_list_show_copy_delete(server: Server, oc: ollama.Client) -> None:
    path = Path(server.demo_path)  # type: ignore[attr-defined]
    digest = oc.create_blob(path)
    assert httpx.head(f"{server.url}/api/blobs/{digest}").status_code == 200
    bad = "sha256:" + "0" * 64
    assert httpx.head(f"{server.url}/api/blobs/{bad}").status_code == 404
    r = httpx.post(f"{server.url}/api/blobs/{bad}", content=b"not this")
    assert r.status_code == 400 and "digest mismatch" in r.json()["error"]
    good = "sha256:" + hashlib.sha256(b"hello").hexdigest()
    assert httpx.post(f"{server.url}/api/blobs/{good}", content=b"hello").status_code == 201
    # Ollama's JSON create from an uploaded file
    statuses = [p.status for p in oc.create(model="up/loaded:v1", files={"demo.gguf": digest}, system="You are terse.",
                                            parameters={"temperature": 0.2, "stop": ["\n\n"]}, stream=True)]
    assert statuses[-1] == "success"
    # the older form: Modelfile text
    oc_resp = httpx.post(server.url + "/api/create", json={"model": "viamf", "modelfile": f"FROM @{digest}\nPARAMETER top_k 7\n",
                                                           "stream": False}, timeout=120)
    assert oc_resp.json() == {"status": "success"}
    names = [m.model for m in oc.list().models]
    assert "up/loaded:v1" in names and "viamf:latest" in names
    sh = oc.show("up/loaded:v1")
    assert "temperature" in (sh.parameters or "") and sh.details.family == "gemma3"
    assert "SYSTEM You are terse." in (sh.modelfile or "")
    assert httpx.post(server.url + "/api/show", json={"model": "up/loaded:v1"}).json()["system"] == "You are terse."
    assert sh.modelinfo and sh.modelinfo["general.architecture"] == "gemma3"
    oc.copy("viamf", "viamf-copy")
    assert "top_k" in (oc.show("viamf-copy").parameters or "")
    oc.delete("viamf-copy")
    with pytest.raises(ollama.ResponseError) as ei:
        oc.show("viamf-copy")
    assert ei.value.status_code == 404 and ei.value.error == "model 'viamf-copy' not found"
    with pytest.raises(ollama.ResponseError) as ei:
        oc.delete("viamf-copy")
    assert ei.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as ei:
        oc.create(model="broken", files={"x.gguf": bad}, stream=False)
    assert ei.value.status_code == 400 and "not found" in ei.value.error
    # the created model answers with its parameters and system prompt
    r = oc.generate(model="up/loaded:v1", prompt="Hi", options={"num_predict": 2})
    assert r.done and r.eval_count and r.eval_count <= 2


def test_show_demo_without_registry(oc: ollama.Client) -> None:
    sh = oc.show("demo")
    assert sh.details.format == "gguf" and sh.modelinfo["general.architecture"] == "gemma3"


# --- lifecycle ------------------------------------------------------------------------------
def test_load_unload_keep_alive_ps_and_cli(server: Server, oc: ollama.Client) -> None:
    r = oc.generate(model="viamf", prompt="", keep_alive="1h")
    assert r.done_reason == "load"
    loaded = {m.model: m for m in oc.ps().models}
    assert "viamf:latest" in loaded and loaded["viamf:latest"].size > 0 and loaded["viamf:latest"].size_vram == 0
    env = dict(server.env)
    cli = [sys.executable, "-m", "ember.cli.main"]
    out = subprocess.run(cli + ["ps"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "viamf:latest" in out.stdout
    out = subprocess.run(cli + ["stop", "viamf"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    import time

    deadline = time.monotonic() + 60
    while any(m.model == "viamf:latest" for m in oc.ps().models) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(m.model == "viamf:latest" for m in oc.ps().models)
    # keep_alive 0 on a normal request: unloaded right after it
    oc.generate(model="viamf", prompt="Hi", options={"num_predict": 1}, keep_alive=0)
    deadline = time.monotonic() + 60
    while any(m.model == "viamf:latest" for m in oc.ps().models) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(m.model == "viamf:latest" for m in oc.ps().models)
    r = oc.chat(model="viamf", messages=[], keep_alive=0)
    assert r.done_reason == "unload"
    # no server: one clear line, exit 1
    env["EMBER_HOST"] = f"127.0.0.1:{_dead_port()}"
    out = subprocess.run(cli + ["ps"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and out.stderr.strip().count("\n") == 0 and "ember serve" in out.stderr


def _dead_port() -> int:
    from server_fixtures import free_port

    return free_port()


def test_reload_with_other_load_options(oc: ollama.Client) -> None:
    r = oc.generate(model="demo", prompt=PROMPT, options={**GREEDY, "num_ctx": 256})
    assert r.eval_count == 6
    ctx = {m.model: m for m in oc.ps().models}["demo:latest"]
    assert ctx.context_length == 256


# --- errors -----------------------------------------------------------------------------------
@pytest.mark.parametrize("path,body,status,text", [
    ("/api/generate", {"model": "nope", "prompt": "x"}, 404, 'model "nope" not found, try pulling it first'),
    ("/api/chat", {"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, 'model "nope" not found, try pulling it first'),
    ("/api/generate", {"model": "demo", "prompt": "x", "options": {"temperature": "hot"}}, 400, "temperature"),
    ("/api/generate", {"model": "demo", "prompt": "x", "options": {"stop": [1]}}, 400, "parameter 'stop' needs a string or a list of strings, got [1]"),
    ("/api/generate", {"model": "demo", "prompt": "x", "options": {"top_k": 10**30}}, 400, "top_k"),
    ("/api/generate", {"model": "demo", "prompt": "x", "options": {"num_thread": 10**6}}, 400, "num_thread"),
    ("/api/generate", {"model": "demo", "prompt": "x", "format": "yaml"}, 400, "format"),
    ("/api/generate", {"model": "demo", "prompt": "x", "keep_alive": "soon"}, 400, "keep_alive"),
    ("/api/generate", {"model": "demo", "prompt": 5}, 400, "prompt"),
    ("/api/generate", {"prompt": "x"}, 400, "model is required"),
    ("/api/generate", [1, 2], 400, ""),
    ("/api/chat", {"model": "demo", "messages": "hi"}, 400, "messages"),
    ("/api/generate", {"model": "demo", "prompt": "x " * 5000, "options": {"num_ctx": 256}}, 400, "context"),
    ("/api/generate", {"model": "demo", "prompt": "x", "context": [-5]}, 400, "context"),
    ("/v1/chat/completions", {"model": "demo", "messages": [{"role": "user", "content": "x"}], "n": 1000}, 400, "n"),
    ("/v1/chat/completions", {"model": "demo", "messages": [], "max_tokens": -3}, 400, "max_tokens"),
    ("/api/create", {"model": "x", "from": "/nonexistent/file.gguf", "stream": False}, 400, "not a model name"),
    ("/api/create", {"model": "bad name!", "from": "demo"}, 400, "name"),
    ("/api/blobs/sha256:zz", None, 400, "digest"),
])
def test_errors_are_json_with_status(server: Server, path: str, body: object, status: int, text: str) -> None:
    r = httpx.post(server.url + path, json=body, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    msg = err["message"] if isinstance(err, dict) else err
    assert isinstance(msg, str) and text in msg
    assert server.alive()


def test_invalid_json_and_unknown_routes(server: Server) -> None:
    r = httpx.post(server.url + "/api/chat", content=b"{not json", timeout=10)
    assert r.status_code == 400 and "invalid JSON" in r.json()["error"]
    r = httpx.get(server.url + "/api/nothing-here", timeout=10)
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(server.url + "/api/generate", timeout=10)
    assert r.status_code == 405 and "error" in r.json()
    assert httpx.get(server.url + "/openapi.json").json()["paths"]["/api/chat"]


def test_root_and_version(server: Server) -> None:
    r = httpx.get(server.url + "/")
    assert r.status_code == 200
    web = Path(__file__).parents[1] / "src" / "ember" / "server" / "web" / "index.html"
    if web.is_file():
        assert r.text == web.read_text(encoding="utf-8")
    else:
        assert "running" in r.text
    assert httpx.head(server.url + "/").status_code == 200
    from ember.__about__ import OLLAMA_API_VERSION, __version__

    assert httpx.get(server.url + "/api/version").json() == {"version": OLLAMA_API_VERSION, "ember_version": __version__}


def test_auth_and_cors(tmp_path: Path) -> None:
    srv = Server(tmp_path, EMBER_API_KEY="s3cret", EMBER_ORIGINS="https://chat.example.com")
    try:
        assert httpx.get(srv.url + "/api/version").status_code == 200  # open
        assert httpx.get(srv.url + "/").status_code == 200
        r = httpx.get(srv.url + "/api/tags")
        assert r.status_code == 401 and "EMBER_API_KEY" in r.json()["error"]
        assert httpx.get(srv.url + "/api/tags", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(srv.url + "/api/tags", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert [m.model for m in srv.ollama_client(headers={"Authorization": "Bearer s3cret"}).list().models] == ["demo:latest"]
        with pytest.raises(openai.AuthenticationError):
            srv.openai_client(api_key="wrong").models.list()
        assert [m.id for m in srv.openai_client(api_key="s3cret").models.list().data] == ["demo:latest"]

        def preflight(origin: str) -> httpx.Response:
            return httpx.options(srv.url + "/api/chat", headers={
                "Origin": origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"})

        assert preflight("http://localhost:5173").headers.get("access-control-allow-origin") == "http://localhost:5173"
        assert preflight("https://chat.example.com").headers.get("access-control-allow-origin") == "https://chat.example.com"
        evil = preflight("https://evil.example.net")
        assert evil.status_code == 400 and "access-control-allow-origin" not in evil.headers
    finally:
        srv.stop()
    assert os.path.isdir(tmp_path)


def test_max_loaded_models_evicts_idle_and_keep_alive_expires(tmp_path: Path) -> None:
    import time

    srv = Server(tmp_path, EMBER_MAX_LOADED_MODELS="1", EMBER_KEEP_ALIVE="2s")
    try:
        from ember.demo import demo_model_path

        for name in ("one", "two"):
            create(srv.url, name, f"FROM {demo_model_path()}\nPARAMETER num_ctx 128\n")
        c = srv.ollama_client()
        assert c.generate(model="one", prompt="", keep_alive=-1).done_reason == "load"
        assert [m.model for m in c.ps().models] == ["one:latest"]
        assert c.ps().models[0].expires_at.year == 2318  # forever
        # a second model needs the only place: the idle first one is evicted
        c.generate(model="two", prompt="Hi", options={"num_predict": 1})
        assert [m.model for m in c.ps().models] == ["two:latest"]
        # EMBER_KEEP_ALIVE=2s: gone a little after its last request
        deadline = time.monotonic() + 60
        while c.ps().models and time.monotonic() < deadline:
            time.sleep(0.2)
        assert c.ps().models == []
        assert time.monotonic() < deadline
    finally:
        srv.stop()


def test_zz_no_request_left_holding_a_model(server: Server) -> None:
    """Runs last in this module: every request above released its model and sequence."""
    for m in server.ps():
        assert m["active_requests"] == 0 and m["running"] == 0, m
    assert server.alive()
