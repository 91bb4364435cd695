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
