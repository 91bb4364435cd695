"""Entry point: registers every command module and turns EmberError into one
line on stderr with exit code 1 (a traceback shown to a user is a bug)."""

from __future__ import annotations

import sys

import typer

from ember.__about__ import __version__

# Each import registers its commands on ``app``.
from ember.cli import (
    convert,  # noqa: E402,F401  convert, convert-lora
    files,  # noqa: E402,F401  inspect, validate, split, merge
    models,  # noqa: E402,F401  create, list, show, cp, rm, pull
    quantize,  # noqa: E402,F401  quantize, imatrix, merge-lora, eval
    run,  # noqa: E402,F401  run
    serve,  # noqa: E402,F401  serve, ps, stop
    worker,  # noqa: E402,F401  worker
)
from ember.cli.app import app
from ember.errors import EmberError


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ember {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Run large language models locally: convert, quantize, register, chat and serve."""


def main() -> None:
    try:
        app()
    except EmberError as e:
        print(f"Error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(0)


if __name__ == "__main__":
    main()
