"""Entry point: the ``ember`` group (its commands load as they run, see
:mod:`ember.cli.app`); turns EmberError into one line on stderr with exit
code 1 (a traceback shown to a user is a bug)."""

from __future__ import annotations

import sys

import typer

from ember.__about__ import __version__
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
