"""The typer application every command module registers on."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="ember",
    help="Run large language models locally: convert, quantize, register, chat and serve.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
