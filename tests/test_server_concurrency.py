"""Many clients at once on a real `ember serve`: 16 simultaneous streams give
the tokens each gives alone (with batch_invariant), a client that hangs up
frees its sequence, a full queue answers 503."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import ollama
import pytest
from server_fixtures import Server, create

# Prompts whose greedy continuation is not a near tie. (With "Once upon a time"
# the demo model's top two tokens are so close that evaluating the prompt in
# one piece or as a reused BOS plus the rest flips the answer, even with
# batch_invariant: prefix reuse changes how a prompt is split into batches.)
PROMPTS = ["The capital of France is", "The largest planet in the solar system is", "def fibonacci(n):",
           "The three primary colours are"]
N_PREDICT = 6


def _modelfile(extra: str = "") -> str:
    from ember.demo import demo_model_path

    return f"FROM {demo_model_path()}\nPARAMETER num_ctx 256\n{extra}"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Server:
    srv = Server(tmp_path_factory.mktemp("conc-models"), EMBER_NUM_PARALLEL="8")
    create(srv.url, "inv", _modelfile("PARAMETER batch_invariant true\n"))
    create(srv.url, "plain", _modelfile())
    yield srv
    srv.stop()


async def _stream(client: ollama.AsyncClient, model: str, prompt: str) -> tuple[str, Any]:
    parts = []
    last = None
    async for p in await client.generate(model=model, prompt=prompt, raw=True, stream=True,
                                         options={"temperature": 0, "num_predict": N_PREDICT}):
        parts.append(p.response)
        last = p
    return "".join(parts), last


def test_16_concurrent_streams_match_their_solo_runs(server: Server) -> None:
    solo = {}
    c = server.ollama_client(timeout=300)
    for p in PROMPTS:
        solo[p] = c.generate(model="inv", prompt=p, raw=True, options={"temperature": 0, "num_predict": N_PREDICT}).response
    prompts = PROMPTS * 4

    async def run(model: str) -> list[tuple[str, Any]]:
        ac = ollama.AsyncClient(host=server.url, timeout=300)
        return await asyncio.gather(*(_stream(ac, model, p) for p in prompts))

    # Both cores busy with other work while the streams run: timing must not matter.
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        results = asyncio.run(run("inv"))
    finally:
        for b in burners:
            b.kill()
            b.wait()
    for p, (text, last) in zip(prompts, results):
        assert last.done and last.eval_count == N_PREDICT
        assert text == solo[p], (p, text, solo[p])
    assert server.alive()
    # Without batch_invariant the kernels may differ by batch shape: all complete, sane output.
    results = asyncio.run(run("plain"))
    for text, last in results:
        assert last.done and last.done_reason in ("length", "stop") and 0 < last.eval_count <= N_PREDICT
        assert text.strip() and "\ufffd" not in text


# Counting goes on and on: no end-of-text token cuts these streams short.
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"


def test_disconnect_mid_stream_frees_the_sequence(server: Server) -> None:
    # Thousands of tokens to go: only a cancelled sequence is free within the waits below.
    body = {"model": "plain", "prompt": COUNTING, "raw": True,
            "options": {"num_predict": -1, "num_ctx": 4096, "temperature": 0}}
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", server.url + "/api/generate", json=body) as r:
            lines = r.iter_lines()
            first = json.loads(next(lines))
            assert first["done"] is False
            assert server.wait_running("plain:latest", 1) == 1
        # the connection is closed here, thousands of tokens before the end
    assert server.wait_running("plain:latest", 0, timeout=60) == 0
    # the OpenAI stream too
    body2 = {"model": "plain", "prompt": COUNTING, "max_tokens": 200, "temperature": 0, "stream": True}
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", server.url + "/v1/completions", json=body2) as r:
            it = r.iter_lines()
            next(it)
            assert server.wait_running("plain:latest", 1) == 1
    assert server.wait_running("plain:latest", 0, timeout=60) == 0
    # and a non-streamed request whose client gives up
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/api/generate", json={**body, "stream": False}, timeout=3)
    assert server.wait_running("plain:latest", 0, timeout=60) == 0
    assert server.alive()


def test_full_queue_answers_503(tmp_path: Path) -> None:
    srv = Server(tmp_path, EMBER_NUM_PARALLEL="1", EMBER_MAX_QUEUE="1")
    try:
        create(srv.url, "q", _modelfile())
        long = {"model": "q", "prompt": COUNTING, "raw": True, "options": {"num_predict": 300, "temperature": 0}}
        with httpx.Client(timeout=60) as a, httpx.Client(timeout=60) as b:
            with a.stream("POST", srv.url + "/api/generate", json=long) as ra:
                lines_a = ra.iter_lines()  # (kept: a dropped iterator closes the stream)
                next(lines_a)  # running in the only slot
                with b.stream("POST", srv.url + "/api/generate", json=long) as rb:
                    assert rb.status_code == 200
                    assert srv.wait_running("q:latest", 2) == 2  # one running, one queued
                    r = httpx.post(srv.url + "/api/generate", json=long, timeout=60)
                    assert r.status_code == 503 and r.headers["retry-after"] and "busy" in r.json()["error"]
                    r = httpx.post(srv.url + "/v1/completions", json={"model": "q", "prompt": "x"}, timeout=60)
                    assert r.status_code == 503 and r.json()["error"]["message"]
        assert srv.wait_running("q:latest", 0, timeout=60) == 0
        r = httpx.post(srv.url + "/api/generate", json={**long, "stream": False, "options": {"num_predict": 2}}, timeout=60)
        assert r.status_code == 200 and r.json()["eval_count"] == 2
    finally:
        srv.stop()
