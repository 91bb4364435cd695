"""The `ember` command list: every command the CLI registers is in the
README's command table, so users can find it; ``ember --help`` lists every
command from the table in ember.cli.app without importing the command modules,
so it and ``ember list`` start without llama.cpp, numpy, gguf-py, jinja2 or
FastAPI."""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any

import typer.main

from ember.cli.app import COMMANDS, app, load_command

README = Path(__file__).resolve().parent.parent / "README.md"
HEAVY = ("numpy", "jinja2", "llama_cpp", "gguf", "fastapi", "yaml", "torch")


def _commands(group: Any, prefix: str = "") -> set[str]:
    """Visible command names, subcommands as "GROUP SUB" (eval kld)."""
    names: set[str] = set()
    for name, command in group.commands.items():
        if command.hidden:
            continue
        if hasattr(command, "commands"):
            names |= _commands(command, f"{prefix}{name} ")
        else:
            names.add(prefix + name)
    return names


def _registered() -> Any:
    """The group as typer builds it once every command module is imported."""
    for module, _ in COMMANDS.values():
        importlib.import_module(module)
    return typer.main.get_group(app)


def test_readme_command_table_lists_every_command() -> None:
    text = README.read_text(encoding="utf-8")
    table = text.split("### Commands", 1)[1].split("\n\n", 2)[1]
    documented = set(re.findall(r"`([a-z][a-z-]*(?: [a-z-]+)?)`", table))
    commands = _commands(_registered())
    assert {"quantize", "imatrix", "eval kld"} <= commands
    missing = sorted(commands - documented)
    assert not missing, f"add {missing} to the README's command table"


def test_the_command_table_names_every_command_and_its_help() -> None:
    registered = _registered().commands
    assert sorted(registered) == sorted(COMMANDS), "ember.cli.app.COMMANDS and the registered commands differ"
    for name, (_, line) in COMMANDS.items():
        real = load_command(name)
        assert real is not None and real.name == name
        help_text = " ".join((real.help or "").split())
        assert help_text.startswith(line), f"{name}: COMMANDS says {line!r}, its docstring {help_text[:80]!r}"


def _imported(stderr: str) -> set[str]:
    """Module names from ``python -X importtime`` lines."""
    return {m.group(1) for m in re.finditer(r"^import time:.*\|\s*([\w.]+)\s*$", stderr, re.M)}


def _heavy(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if m.split(".")[0] in HEAVY)


def test_help_lists_every_command_without_importing_heavy_libraries(ember_cli: Any) -> None:
    r = ember_cli("--help", env={"PYTHONPROFILEIMPORTTIME": "1", "COLUMNS": "200"})
    assert r.returncode == 0, r.stderr
    for name in COMMANDS:
        assert re.search(rf"^│ {re.escape(name)}\s", r.stdout, re.M), f"{name} missing from ember --help"
    imported = _imported(r.stderr)
    assert "typer" in imported, "no import times were read"
    assert not _heavy(imported), _heavy(imported)
    assert not {m for m in imported if m.startswith("ember.cli.") and m not in ("ember.cli.main", "ember.cli.app")}


def test_list_reads_manifests_without_importing_heavy_libraries(ember_cli: Any, models_dir: Path) -> None:
    assert "demo:latest" in ember_cli("list", check=True).stdout  # the first listing registers the demo (reads its GGUF)
    r = ember_cli("list", env={"PYTHONPROFILEIMPORTTIME": "1"}, check=True)
    assert "demo:latest" in r.stdout
    imported = _imported(r.stderr)
    assert "ember.registry.listing" in imported, "no import times were read"
    assert not _heavy(imported), _heavy(imported)


def test_a_deferred_command_runs_and_shows_its_own_help(ember_cli: Any, models_dir: Path) -> None:
    r = ember_cli("eval", "--help", check=True)
    assert "perplexity" in r.stdout and "kld" in r.stdout
    assert "--json" in ember_cli("list", "--help", check=True).stdout
    bad = ember_cli("lst")
    assert bad.returncode == 2 and "Did you mean 'list'" in bad.stderr


def test_serve_refuses_malformed_settings_before_listening(ember_cli: Any, models_dir: Path) -> None:
    for name, value in (("EMBER_KEEP_ALIVE", "soon"), ("EMBER_NUM_PARALLEL", "many")):
        r = ember_cli("serve", "--host", "127.0.0.1:0", env={name: value}, timeout=60)
        assert r.returncode == 1 and name in r.stderr, (name, r.stderr)
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
