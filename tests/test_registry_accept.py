"""Acceptance: the Modelfile from the user's Qwen2.5 document (TEMPLATE,
PARAMETERs, SYSTEM) FROM a two-shard Q4_K_M GGUF (the real demo model split in
two) creates with `ember create`, lists, shows, round-trips through
`ember show --modelfile`, and the stored shards load in llama.cpp with exactly
the logits of the original file."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from cli_fixtures import run_ember
from registry_fixtures import qwen_modelfile

from ember.registry import store
from ember.registry.core import resolve
from ember.registry.show import show_model


def ember(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return run_ember(*args, cwd=cwd, check=True, timeout=300)


@pytest.fixture(scope="module")
def split_demo(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    from ember.demo import demo_model_path
    from ember.gguf import read_header, split_model

    src = Path(demo_model_path())
    n = len(read_header(src).tensors)
    out = tmp_path_factory.mktemp("qwen")
    shards = split_model(src, out / "qwen2.5-7b-instruct-q4_k_m", max_tensors=(n + 1) // 2)
    assert [p.name for p in shards] == [
        "qwen2.5-7b-instruct-q4_k_m-00001-of-00002.gguf",
        "qwen2.5-7b-instruct-q4_k_m-00002-of-00002.gguf",
    ]
    return shards


def test_users_qwen_modelfile_from_two_shards(split_demo: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBER_MODELS", str(tmp_path / "models"))
    work = split_demo[0].parent
    text = qwen_modelfile().replace("FROM qwen2.5-7b-instruct-q4_k_m.gguf", "FROM qwen2.5-7b-instruct-q4_k_m-00001-of-00002.gguf")
    (work / "Modelfile").write_text(text, encoding="utf-8")

    ember("create", "qwen2.5_7b_Q4", "-f", "Modelfile", cwd=work)
    listing = ember("list", cwd=work).stdout.splitlines()
    assert listing[1].split()[0] == "qwen2.5_7b_Q4:latest"
    total = sum(p.stat().st_size for p in split_demo)
    assert listing[1].split()[2] == f"{total / 1e6:.1f}"  # SIZE in MB, like Ollama

    r = resolve("qwen2.5_7b_q4")
    assert len(r.model_paths) == 2
    for stored, original in zip(r.model_paths, split_demo, strict=True):
        assert store.hash_file(stored)[0] == store.hash_file(original)[0]
    assert r.parameters == {"temperature": 0.7, "top_p": 0.8, "repeat_penalty": 1.05, "top_k": 20}
    assert r.system == "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    assert r.template is not None and r.template.startswith("{{ if .Messages }}") and "<tool_call>" in r.template

    shown = ember("show", "qwen2.5_7b_Q4", cwd=work).stdout
    assert "gemma3" in shown and "Q4_K_M" in shown and "temperature" in shown
    manifest = json.loads(store.find_manifest_path(store.ModelName("registry.ollama.ai", "library", "qwen2.5_7b_Q4", "latest")).read_bytes())  # type: ignore[union-attr]
    kinds = [x["mediaType"].rsplit(".", 1)[-1] for x in manifest["layers"]]
    assert kinds == ["model", "model", "template", "system", "params"]

    # `ember show --modelfile` prints a Modelfile that creates the same model again
    (work / "Modelfile.shown").write_text(ember("show", "qwen2.5_7b_Q4", "--modelfile", cwd=work).stdout, encoding="utf-8")
    ember("create", "again", "-f", "Modelfile.shown", cwd=work)
    again = resolve("again")
    assert again.digest == r.digest
    assert (again.template, again.system, again.parameters) == (r.template, r.system, r.parameters)
    assert show_model("again").modelfile.split("\n", 4)[4] == show_model("qwen2.5_7b_Q4").modelfile.split("\n", 4)[4]

    # it runs: llama.cpp loads the stored shards (blob names, in order) and
    # computes exactly what the original single file computes
    pytest.importorskip("llama_cpp")
    from ember.demo import demo_model_path
    from ember.engine.model import LoadedModel

    stored = LoadedModel(r.model_paths)
    original = LoadedModel(Path(demo_model_path()))
    try:
        tokens = stored.tokenize("The capital of France is")
        assert tokens == original.tokenize("The capital of France is")
        a, b = stored.logits(tokens), original.logits(tokens)
        assert a.shape == b.shape and np.array_equal(a, b)
        assert stored.detokenize([int(np.argmax(a[-1]))]).strip() != ""
    finally:
        stored.close()
        original.close()
