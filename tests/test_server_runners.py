"""Runner processes under attack: a model that aborts llama.cpp at load, a
runner killed (SIGKILL, SIGABRT, SIGSEGV) mid-stream or mid-request, a
server that dies under its runners. Only that model's requests fail, with a
JSON error naming the model; the server stays up and loads it again. Also:
the server process never maps a model, unloading ends the runner, and the
same app runs models in-process through the swappable runner constructor."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import ollama
import psutil
import pytest
import uvicorn
from server_fixtures import Server, create, free_port, upload

from ember.demo import demo_model_path
from ember.gguf import read_header
from ember.server import ModelManager, create_app
from ember.server.runner import LocalRunner

COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"
LONG = {"temperature": 0, "num_predict": 400}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("runner-models"), EMBER_NUM_PARALLEL="2")
    create(srv.url, "victim", f"FROM {demo_model_path()}\nPARAMETER num_ctx 512\n")
    create(srv.url, "bystander", f"FROM {demo_model_path()}\nPARAMETER num_ctx 256\n")
    yield srv
    srv.stop()


def runners(srv: Server) -> list[psutil.Process]:
    return [p for p in psutil.Process(srv.proc.pid).children()
            if "ember.server.runner" in " ".join(p.cmdline())]


def wait_until(check: Callable[[], bool], timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return False


def loaded(srv: Server) -> list[str]:
    return [m["name"] for m in srv.ps()]


def unload(srv: Server, model: str) -> set[int]:
    """Unload ``model`` (so its next request starts a new runner); the pids of
    the runners left."""
    srv.ollama_client().generate(model=model, prompt="", keep_alive=0)
    assert wait_until(lambda: f"{model}:latest" not in loaded(srv) and len(runners(srv)) == len(loaded(srv)))
    return {p.pid for p in runners(srv)}


def new_runner(srv: Server, before: set[int]) -> int:
    """The one runner started since ``before``."""
    assert wait_until(lambda: len([p for p in runners(srv) if p.pid not in before]) == 1)
    return next(p.pid for p in runners(srv) if p.pid not in before)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGABRT, signal.SIGSEGV])
def test_runner_killed_mid_stream_fails_only_its_stream(server: Server, sig: signal.Signals) -> None:
    bystander = server.ollama_client()
    assert bystander.generate(model="bystander", prompt="Hi", options={"num_predict": 1}).done
    before = unload(server, "victim")
    with httpx.Client(timeout=120) as client:
        with client.stream("POST", server.url + "/api/generate", json={
                "model": "victim", "prompt": COUNTING, "raw": True, "options": LONG}) as r:
            lines = r.iter_lines()
            assert json.loads(next(lines))["done"] is False
            os.kill(new_runner(server, before), sig)
            rest = [json.loads(x) for x in lines]
    err = rest[-1]["error"]
    assert "victim:latest" in err and sig.name in err, err
    assert server.alive()
    assert wait_until(lambda: "victim:latest" not in loaded(server))
    assert "bystander:latest" in loaded(server)  # the other model's runner lives on
    assert bystander.generate(model="bystander", prompt="Hi", options={"num_predict": 1}).done
    # the next request loads the model again
    again = bystander.generate(model="victim", prompt="Hi", options={"num_predict": 2})
    assert again.done and again.eval_count
    assert "victim:latest" in loaded(server)


def test_runner_killed_mid_request_answers_500_naming_the_model(server: Server) -> None:
    before = unload(server, "victim")
    server.ollama_client().generate(model="victim", prompt="", keep_alive="1h")
    pid = new_runner(server, before)
    out: dict[str, httpx.Response] = {}

    def request() -> None:
        out["r"] = httpx.post(server.url + "/api/generate", json={
            "model": "victim", "prompt": COUNTING, "raw": True, "stream": False, "options": LONG}, timeout=120)

    t = threading.Thread(target=request)
    t.start()
    assert server.wait_running("victim:latest", 1) == 1
    os.kill(pid, signal.SIGKILL)
    t.join(120)
    r = out["r"]
    assert r.status_code == 500, r.text
    assert "victim:latest" in r.json()["error"] and "SIGKILL" in r.json()["error"]
    # OpenAI's stream gets the error as an event
    before = unload(server, "victim")
    with httpx.Client(timeout=120) as client:
        with client.stream("POST", server.url + "/v1/completions", json={
                "model": "victim", "prompt": COUNTING, "max_tokens": 400, "temperature": 0, "stream": True}) as s:
            events = (e for e in s.iter_lines() if e.startswith("data: "))
            assert json.loads(next(events).removeprefix("data: "))["choices"]
            os.kill(new_runner(server, before), signal.SIGKILL)
            rest = list(events)
    last = json.loads(rest[-1].removeprefix("data: "))
    assert last["error"]["type"] == "api_error" and "victim:latest" in last["error"]["message"]
    assert server.alive()


def test_gguf_that_aborts_llama_cpp_at_load_fails_only_its_requests(server: Server, tmp_path: Path) -> None:
    """gemma3.block_count = 0 passed `ember validate` and hit a GGML_ASSERT in
    llama.cpp's loader. Refused by validation or dead in its runner, the
    answer is a JSON error naming the model, and the server stays up."""
    bad = tmp_path / "aborts.gguf"
    shutil.copyfile(demo_model_path(), bad)
    kv = read_header(bad).kv["gemma3.block_count"]
    with open(bad, "r+b") as f:
        f.seek(kv.value_offset)
        f.write(struct.pack("<I", 0))
    r = httpx.post(server.url + "/api/create", timeout=120,
                   json={"model": "aborts", "modelfile": f"FROM @{upload(server.url, bad)}", "stream": False})
    if r.status_code == 200:  # the check did not refuse it: llama.cpp's abort must stay in the runner
        r = httpx.post(server.url + "/api/generate", json={"model": "aborts", "prompt": "Hi", "stream": False}, timeout=120)
    assert r.status_code in (400, 500), r.text
    err = r.json()["error"]
    if r.status_code == 500:
        assert "aborts" in err and "GGML_ASSERT" in err and "SIGABRT" in err, err
    assert server.alive()
    assert not any("aborts" in n for n in loaded(server))
    ok = httpx.post(server.url + "/api/generate", json={"model": "bystander", "prompt": "Hi", "stream": False,
                                                        "options": {"num_predict": 1}}, timeout=120)
    assert ok.status_code == 200


def test_server_never_maps_a_model_and_unload_ends_the_runner(server: Server) -> None:
    before = unload(server, "bystander")
    server.ollama_client().generate(model="bystander", prompt="", keep_alive="1h")
    pid = new_runner(server, before)
    maps = Path(f"/proc/{server.proc.pid}/maps").read_text()
    assert "libllama" not in maps and ".gguf" not in maps and "sha256-" not in maps
    assert "libllama" in Path(f"/proc/{pid}/maps").read_text()
    unload(server, "bystander")
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_batch_invariant_request_never_reloads_the_model(server: Server) -> None:
    """A request with batch_invariant reloaded the model with it, and every
    later request on it ran one sequence at a time. It is the request's own
    (per request in the scheduler): the runner and its load stay as they were."""
    before = unload(server, "bystander")
    server.ollama_client().generate(model="bystander", prompt="", keep_alive="1h")
    pid = new_runner(server, before)
    pids = {p.pid for p in runners(server)}
    r = httpx.post(server.url + "/api/generate", json={"model": "bystander", "prompt": "Hi", "stream": False, "options": {
        "batch_invariant": True, "num_predict": 1}}, timeout=120)
    assert r.status_code in (200, 400), r.text  # 400 where the engine still takes it only at load
    assert {p.pid for p in runners(server)} == pids and psutil.Process(pid).is_running()
    # a real load option does reload it
    r = httpx.post(server.url + "/api/generate", json={"model": "bystander", "prompt": "Hi", "stream": False, "options": {
        "num_ctx": 128, "num_predict": 1}}, timeout=120)
    assert r.status_code == 200, r.text
    assert wait_until(lambda: pid not in {p.pid for p in runners(server)})


def test_runner_exits_when_the_server_is_killed(tmp_path: Path) -> None:
    srv = Server(tmp_path)
    try:
        srv.ollama_client().generate(model="demo", prompt="", keep_alive=-1)
        (runner,) = runners(srv)
        srv.proc.kill()
        srv.proc.wait()
        assert wait_until(lambda: not runner.is_running() or runner.status() == psutil.STATUS_ZOMBIE)
    finally:
        srv.stop()


def test_in_process_runner_serves_the_same_api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ModelManager(runner=LocalRunner): the same routes and wire format with
    the model in the server's process (lifecycle and wire-format tests need no
    process start-up)."""
    monkeypatch.setenv("EMBER_MODELS", str(tmp_path))
    port = free_port()
    config = uvicorn.Config(create_app(ModelManager(runner=LocalRunner, num_parallel=2)), host="127.0.0.1", port=port,
                            log_level="warning")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    try:
        assert wait_until(lambda: srv.started)
        c = ollama.Client(host=f"http://127.0.0.1:{port}", timeout=120)
        first = c.generate(model="demo", prompt="The capital of France is", raw=True,
                           options={"temperature": 0, "num_predict": 4})
        parts = list(c.generate(model="demo", prompt="The capital of France is", raw=True, stream=True,
                                options={"temperature": 0, "num_predict": 4}))
        assert "".join(p.response for p in parts) == first.response and parts[-1].eval_count == 4
        assert first.load_duration and first.load_duration > parts[-1].load_duration  # loaded by the first
        (loaded_model,) = c.ps().models
        assert loaded_model.model == "demo:latest"
        assert (loaded_model.size or 0) > demo_model_path().stat().st_size  # the weights, the KV cache and compute buffers
    finally:
        srv.should_exit = True
        thread.join(60)
