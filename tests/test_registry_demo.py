"""The bundled demo model is a normal registry model: listed on a fresh
registry (CLI, /api/tags, /v1/models) with a digest, resolvable wherever a
name is accepted, deletable, and back only when asked for by name."""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx
import pytest
from cli_fixtures import run_ember
from server_fixtures import Server

from ember.demo import DEMO_DIGEST, demo_model_path
from ember.registry import store
from ember.registry.core import copy_model, delete_model, resolve
from ember.registry.create import create_model
from ember.registry.listing import list_models
from ember.registry.pull import pull_model
from ember.registry.show import show_model


@pytest.fixture
def models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "models"
    monkeypatch.setenv("EMBER_MODELS", str(root))
    monkeypatch.chdir(tmp_path)
    return root


def ember(*args: str) -> subprocess.CompletedProcess[str]:
    return run_ember(*args, timeout=120)


def test_fresh_registry_lists_the_demo_with_a_digest(models: Path) -> None:
    out = ember("list")
    assert out.returncode == 0, out.stderr
    rows = out.stdout.splitlines()
    assert len(rows) == 2 and rows[1].split()[0] == "demo:latest"
    [entry] = list_models()
    assert entry.name == "demo:latest" and entry.digest.startswith("sha256:") and rows[1].split()[1] == entry.digest[7:19]
    assert entry.details["family"] == "gemma3" and entry.details["parameter_size"] == "268.10M"
    assert entry.details["quantization_level"] == "Q4_K_M"
    m = resolve("demo")
    assert m.digest == entry.digest and m.model_paths == [store.blob_path(DEMO_DIGEST)]
    blob, cached = m.model_paths[0].stat(), demo_model_path().stat()
    assert blob.st_size == cached.st_size
    if blob.st_dev == cached.st_dev:
        assert blob.st_ino == cached.st_ino  # a hard link, not a second 235 MiB copy


def test_demo_is_accepted_wherever_a_name_is(models: Path) -> None:
    d = show_model("demo")  # registered on first use, no listing needed
    assert d.digest and d.details["family"] == "gemma3" and d.capabilities == ["completion"]
    child = create_model("terse", "FROM demo\nSYSTEM Be terse.\n")
    assert child.model_paths == resolve("demo").model_paths and child.system == "Be terse."
    copy_model("demo", "mydemo")
    assert {e.name for e in list_models()} == {"demo:latest", "terse:latest", "mydemo:latest"}
    assert ember("show", "DEMO:latest").returncode == 0


def test_deleted_demo_comes_back_only_when_asked_for(models: Path) -> None:
    assert [e.name for e in list_models()] == ["demo:latest"]
    assert "deleted 'demo'" in ember("rm", "demo").stdout
    assert list_models() == [] and not store.blob_path(DEMO_DIGEST).exists()
    assert ember("list").stdout.splitlines()[1:] == []  # listings leave it out now
    r = ember("rm", "demo")
    assert r.returncode == 1 and "not found" in r.stderr  # rm does not register it just to delete it
    assert resolve("demo").digest  # asked for by name: back
    assert [e.name for e in list_models()] == ["demo:latest"]
    delete_model("demo")
    pulled = pull_model("demo")  # 'ember pull demo' needs no network
    assert pulled.name == "demo:latest" and [e.name for e in list_models()] == ["demo:latest"]


def test_server_lists_the_demo(models: Path) -> None:
    models.mkdir()
    srv = Server(models)
    try:
        tags = httpx.get(srv.url + "/api/tags", timeout=60).json()["models"]
        assert [t["name"] for t in tags] == ["demo:latest"] and len(tags[0]["digest"]) == 64
        ids = [m["id"] for m in httpx.get(srv.url + "/v1/models", timeout=60).json()["data"]]
        assert ids == ["demo:latest"]
    finally:
        srv.stop()
