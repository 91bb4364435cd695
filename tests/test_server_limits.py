"""Requests that ask for too much: bodies over EMBER_MAX_BODY_SIZE, prompts
with more bytes than num_ctx can hold, n x prompts beyond the bound, a KV
cache beyond the memory budget, and a heavy request that must not stall the
other routes (its tokenizing runs in the model's runner, not on the server's
event loop)."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from server_fixtures import Server, create

from ember.demo import demo_model_path
from ember.engine.llama import supports_gpu_offload
from ember.server.generation import MAX_SEQUENCES


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("limits-models"), EMBER_MAX_BODY_SIZE="8M", EMBER_NUM_PARALLEL="2",
                 EMBER_KV_BUDGET="0.05")
    create(srv.url, "small", f"FROM {demo_model_path()}\nPARAMETER num_ctx 256\n")
    yield srv
    srv.stop()


def test_body_over_the_cap_is_413_before_any_route_reads_it(server: Server) -> None:
    big = "x" * (9 << 20)
    r = httpx.post(server.url + "/api/generate", json={"model": "small", "prompt": big}, timeout=120)
    assert r.status_code == 413 and "EMBER_MAX_BODY_SIZE" in r.json()["error"]
    r = httpx.post(server.url + "/v1/completions", json={"model": "small", "prompt": big}, timeout=120)
    assert r.status_code == 413 and "EMBER_MAX_BODY_SIZE" in r.json()["error"]["message"]
    # blob uploads stream to disk and are not capped
    blob = b"y" * (9 << 20)
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    assert httpx.post(f"{server.url}/api/blobs/{digest}", content=blob, timeout=120).status_code == 201
    assert server.alive()


def test_prompt_with_more_bytes_than_num_ctx_holds_is_refused_without_tokenizing(server: Server) -> None:
    r = httpx.post(server.url + "/api/generate", json={"model": "small", "prompt": "hello world " * 200_000,
                                                       "stream": False}, timeout=120)
    assert r.status_code == 400, r.text
    assert "bytes" in r.json()["error"] and "256 tokens" in r.json()["error"]  # counted in bytes: never tokenized


def test_n_times_prompts_is_bounded(server: Server) -> None:
    r = httpx.post(server.url + "/v1/completions", json={"model": "small", "prompt": ["a"] * 20, "n": 4}, timeout=60)
    assert r.status_code == 400 and str(MAX_SEQUENCES) in r.json()["error"]["message"]


@pytest.mark.skipif(supports_gpu_offload(), reason="the KV cache may live on the GPU")
def test_kv_cache_beyond_the_memory_budget_is_400_saying_what_was_asked_and_what_is_free(server: Server) -> None:
    r = httpx.post(server.url + "/api/generate", json={"model": "small", "prompt": "Hi", "stream": False, "options": {
        "num_ctx": 1 << 20, "kv_cache_type": "f32"}}, timeout=120)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert "KV cache" in err and "EMBER_KV_BUDGET=0.05" in err and "GiB of free memory" in err
    assert server.alive()


def test_heavy_request_does_not_stall_other_routes(server: Server) -> None:
    """A 4 MB prompt with truncation is tokenized whole (seconds of work):
    meanwhile /api/version keeps answering (it stalled for as long before)."""
    out: dict[str, Any] = {}

    def heavy() -> None:
        out["r"] = httpx.post(server.url + "/api/generate", json={
            "model": "small", "prompt": "hello world " * 350_000, "raw": True, "truncate": True, "stream": False,
            "options": {"num_predict": 1}}, timeout=600)

    httpx.post(server.url + "/api/generate", json={"model": "small", "prompt": ""}, timeout=120)  # loaded
    t = threading.Thread(target=heavy)
    t.start()
    answered = 0
    while t.is_alive():
        # a stalled event loop would leave this without an answer for seconds
        assert httpx.get(server.url + "/api/version", timeout=2).status_code == 200
        answered += 1
        time.sleep(0.05)
    t.join()
    assert out["r"].status_code == 200, out["r"].text
    assert out["r"].json()["prompt_eval_count"] <= 256
    assert answered >= 3  # answered while the heavy request ran
