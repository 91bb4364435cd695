"""`ember serve`: run the HTTP server (`ember ps` and `ember stop` talk to it:
:mod:`ember.cli.client`)."""

from __future__ import annotations

import os

import typer
import uvicorn

from ember import settings
from ember.cli.app import app
from ember.cli.common import console
from ember.errors import EmberError
from ember.options import parse_workers
from ember.server import create_app
from ember.server.app import split_host
from ember.server.protocol import protocol_with_deadline


@app.command()
def serve(
    host: str = typer.Option(None, "--host", help="host:port to listen on (default: EMBER_HOST or 127.0.0.1:11434)."),
    log_level: str = typer.Option("warning", "--log-level", help="uvicorn log level."),
    rpc: str = typer.Option(None, "--rpc", help="RPC workers (ember worker) to split models across: HOST:PORT,HOST:PORT (default: EMBER_RPC)."),
) -> None:
    """Run the Ollama- and OpenAI-compatible HTTP server."""
    if rpc is not None:
        parse_workers(rpc)  # a malformed list fails now, not at the first request
        os.environ["EMBER_RPC"] = rpc  # read by every load, runner processes included
    workers = settings.rpc_workers()
    if workers:
        console.print(f"Splitting models across RPC workers {', '.join(workers)}")

    h, port = split_host(host or settings.host())
    application = create_app(host=h)
    console.print(f"Ember is listening on http://{h if ':' not in h else f'[{h}]'}:{port} (Ctrl+C to stop)")
    try:
        uvicorn.run(application, host=h, port=port, log_level=log_level, timeout_graceful_shutdown=5,
                    http=protocol_with_deadline(settings.header_timeout()), timeout_keep_alive=5)
    except OSError as e:
        raise EmberError(f"cannot listen on {h}:{port}: {e.strerror or e}") from None
