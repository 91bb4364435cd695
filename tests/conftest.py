"""Fixtures shared by the test modules. Helpers that are plain functions live in
the ``*_fixtures`` modules beside this file (pytest puts this folder on
``sys.path``): cli_fixtures (the ``ember`` command), engine_fixtures (greedy
reference runs), gguf_fixtures (tiny GGUF files, llama.cpp's own reader),
server_fixtures (a real ``ember serve``), convert_fixtures and quantize_fixtures
(tiny transformers models), registry_fixtures (registry snapshots)."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anthropic
import ollama
import openai
import pytest
from cli_fixtures import run_ember
from server_fixtures import Server, create_chat_models

from ember.demo import demo_model_path

# A shell without job control starts background commands with SIGINT ignored,
# and every process the suite starts would inherit that: Ctrl+C tests of
# `ember run` and `ember worker` would then wait forever. A handler of our own
# here is reset to the default in each child at exec.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


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


@pytest.fixture(scope="session")
def chat_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One ``ember serve`` with ``tooly`` (takes tools) and ``thinker``
    (thinks) over the demo model, shared by the API translator tests."""
    srv = Server(tmp_path_factory.mktemp("chat-models"), EMBER_NUM_PARALLEL="2")
    create_chat_models(srv.url, str(demo_model_path()))
    yield srv
    srv.stop()


# The official clients of the module's own ``server`` fixture (one per test module).
@pytest.fixture(scope="module")
def oc(server: Server) -> ollama.Client:
    """Ollama's client."""
    return server.ollama_client(timeout=300)


@pytest.fixture(scope="module")
def ai(server: Server) -> openai.OpenAI:
    """OpenAI's client (``/v1``)."""
    return server.openai_client(timeout=300)


@pytest.fixture(scope="module")
def ac(server: Server) -> anthropic.Anthropic:
    """Anthropic's client."""
    return server.anthropic_client(timeout=300)
