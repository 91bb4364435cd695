"""The `ember` command list: every command the CLI registers is in the
README's command table, so users can find it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import typer.main

from ember.cli.main import app

README = Path(__file__).resolve().parent.parent / "README.md"


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


def test_readme_command_table_lists_every_command() -> None:
    text = README.read_text(encoding="utf-8")
    table = text.split("### Commands", 1)[1].split("\n\n", 2)[1]
    documented = set(re.findall(r"`([a-z][a-z-]*(?: [a-z-]+)?)`", table))
    commands = _commands(typer.main.get_command(app))
    assert {"quantize", "imatrix", "eval kld"} <= commands
    missing = sorted(commands - documented)
    assert not missing, f"add {missing} to the README's command table"
