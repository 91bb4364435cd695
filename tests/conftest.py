"""Fixtures shared by the test modules. Helpers that are plain functions live in
the ``*_fixtures`` modules beside this file (pytest puts this folder on
``sys.path``): cli_fixtures (the ``ember`` command), engine_fixtures (greedy
reference runs), gguf_fixtures (tiny GGUF files, llama.cpp's own reader),
server_fixtures (a real ``ember serve``), convert_fixtures and quantize_fixtures
(tiny transformers models), registry_fixtures (registry snapshots)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cli_fixtures import run_ember

from ember.demo import demo_model_path


@pytest.fixture
def ember_cli() -> Callable[..., Any]:
    """``ember_cli("list")`` runs the ``ember`` command (see cli_fixtures.run_ember)."""
    return run_ember


@pytest.fixture(scope="session")
def demo_model() -> Path:
    """The bundled gemma-3-270m Q4_K_M GGUF."""
    return demo_model_path()


@pytest.fixture
def models_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty registry of the test's own (EMBER_MODELS), for this process and
    the commands it starts."""
    root = tmp_path / "models"
    monkeypatch.setenv("EMBER_MODELS", str(root))
    return root
