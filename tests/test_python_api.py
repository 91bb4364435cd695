"""The public Python API: threads, async, typing and documentation."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import ember

PROMPTS = ["The capital of France is", "Water boils at", "def add(a, b):", "Once upon a time"]


def _run_threads(target, n: int) -> None:
    threads = [threading.Thread(target=target, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)


def test_one_model_from_several_threads():
    with ember.load("demo", num_ctx=256, num_parallel=2, batch_invariant=True, temperature=0, repeat_penalty=1.0) as m:
        alone = [m.generate(p, num_predict=12).text for p in PROMPTS]
        streamed: list[str | None] = [None] * len(PROMPTS)

        def worker(i: int) -> None:
            streamed[i] = "".join(c.text for c in m.generate(PROMPTS[i], num_predict=12, stream=True))

        _run_threads(worker, len(PROMPTS))
    assert streamed == alone  # each thread got exactly its own text, nothing interleaved


def test_two_models_from_two_threads(tmp_path):
    copy = tmp_path / "copy.gguf"
    from ember.demo import demo_model_path

    copy.write_bytes(demo_model_path().read_bytes())
    models = [ember.load("demo", num_ctx=256, temperature=0), ember.load(str(copy), num_ctx=256, temperature=0)]
    try:
        alone = [m.generate(PROMPTS[i], num_predict=12).text for i, m in enumerate(models)]
        results: list[str | None] = [None, None]

        def worker(i: int) -> None:
            results[i] = models[i].generate(PROMPTS[i], num_predict=12).text

        _run_threads(worker, 2)
        assert results == alone
    finally:
        for m in models:
            m.close()


def test_help_explains_every_load_option_and_mypy_strict_passes():
    doc = ember.load.__doc__ or ""
    for name in ("num_ctx", "num_gpu", "main_gpu", "num_thread", "num_batch", "use_mmap", "use_mlock", "flash_attn", "kv_cache_type", "batch_invariant", "num_parallel", "lora"):
        assert name in doc, name
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent", "src/ember/__init__.py", "src/ember/api.py"],
        cwd=root, capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_errors_are_a_small_hierarchy():
    for cls in (ember.ModelNotFoundError, ember.OptionError, ember.InvalidFileError, ember.TemplateError, ember.ConversionError, ember.QuantizationError):
        assert issubclass(cls, ember.EmberError)


def test_api_functions_survive_submodule_imports():
    import importlib

    for name in ("quantize", "convert"):
        module = importlib.import_module(f"ember.{name}")
        assert callable(getattr(ember, name)) and getattr(ember, name) is not module
    importlib.import_module("ember.gguf")
    assert callable(ember.split) and callable(ember.inspect)


# --- one request type, one submit ------------------------------------------------------
def test_request_chunk_and_result_cross_json_unchanged():
    import json

    from ember.request import GenerationRequest, Result, StreamChunk

    req = GenerationRequest(messages=[{"role": "user", "content": "hi"}], tools=[{"type": "function"}], format="json",
                            options={"temperature": 0, "stop": ["\n"]}, context=[1, 2], truncate=True)
    assert GenerationRequest.from_dict(json.loads(json.dumps(req.to_dict()))) == req
    result = Result("m", "text", "stop", eval_count=3, message={"role": "assistant", "content": "text"}, context=[4])
    chunk = StreamChunk("t", True, result, tool_calls=[{"function": {"name": "f", "arguments": {}}}])
    assert StreamChunk.from_dict(json.loads(json.dumps(chunk.to_dict()))) == chunk
    assert StreamChunk("x").to_dict() == {"text": "x"}  # sparse: one per token crosses the runner boundary


def test_submit_streams_and_collects_and_the_first_result_reports_the_load():
    import asyncio

    from ember.request import GenerationRequest

    req = GenerationRequest(prompt=PROMPTS[0], raw=True, options={"temperature": 0, "num_predict": 6})
    with ember.load("demo", num_ctx=256) as m:
        first = m.submit(req).result()
        assert first.load_duration == m.load_duration > 0 and first.total_duration > first.load_duration
        stream = m.submit(req)
        chunks = list(stream)
        assert "".join(c.text for c in chunks) == first.text and chunks[-1].done
        assert chunks[-1].result is not None and chunks[-1].result.load_duration == 0

        async def run() -> str:
            return (await m.submit(req, loop=asyncio.get_running_loop()).result()).text

        assert asyncio.run(run()) == first.text
        # closing a stream early frees its sequence
        long = GenerationRequest(prompt=PROMPTS[0], raw=True, options={"num_predict": 500})
        s = m.submit(long)
        next(s)
        s.close()
        import time

        deadline = time.monotonic() + 60
        while m.scheduler.active and time.monotonic() < deadline:
            time.sleep(0.05)
        assert m.scheduler.active == 0


def test_chat_with_tools_streams_each_call_when_complete():
    from dataclasses import replace

    from ember.api import Model
    from ember.models import resolve_model

    template = ("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
                "<|im_start|>assistant\n")
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    schema = {"type": "object", "properties": {"name": {"type": "string", "enum": ["get_weather"]},
                                               "arguments": {"type": "object", "properties": {
                                                   "city": {"type": "string", "enum": ["Paris"]}}, "required": ["city"]}},
              "required": ["name", "arguments"]}
    with Model(replace(resolve_model("demo"), template=template), num_ctx=512) as m:
        chunks = list(m.chat([{"role": "user", "content": "Weather in Paris?"}], tools=[tool], format=schema,
                             stream=True, temperature=0, num_predict=40))
    calls = [c for ch in chunks for c in ch.tool_calls]
    assert not any(ch.text for ch in chunks)  # the reply is the call's JSON: nothing of it as text
    assert [c["function"]["name"] for c in calls] == ["get_weather"] and calls[0]["function"]["index"] == 0
    assert calls[0]["id"].startswith("call_")
    assert chunks[-1].result is not None and chunks[-1].result.tool_calls == calls


def test_kv_cache_beyond_the_memory_budget_is_refused(monkeypatch):
    import pytest

    from ember.engine.llama import supports_gpu_offload

    if supports_gpu_offload():
        pytest.skip("the KV cache may live on the GPU")
    monkeypatch.setenv("EMBER_KV_BUDGET", "0.000001")
    with pytest.raises(ember.OptionError, match=r"KV cache.*EMBER_KV_BUDGET=1e-06 of the .* GiB of free memory"):
        ember.load("demo", num_ctx=2048)
    monkeypatch.setenv("EMBER_KV_BUDGET", "2")
    with pytest.raises(ember.OptionError, match="EMBER_KV_BUDGET must be a fraction"):
        ember.load("demo", num_ctx=2048)
