"""`ember serve`, `ember ps`, `ember stop`: run the HTTP server, and talk to a
running one over HTTP (at EMBER_HOST)."""

from __future__ import annotations

from typing import Any

import typer

from ember import settings
from ember.cli.app import app
from ember.cli.common import console, format_size
from ember.errors import EmberError
from ember.options import parse_workers


def _client_call(method: str, path: str, **kwargs: Any) -> Any:
    """One request to the running server; a clear one-line error when none runs."""
    import os

    import httpx

    url = settings.base_url() + path
    headers = {}
    key = os.environ.get("EMBER_API_KEY", "").strip()
    if key:
        headers["Authorization"] = f"Bearer {key}"
    try:
        r = httpx.request(method, url, headers=headers, timeout=30.0, **kwargs)
    except httpx.HTTPError:
        raise EmberError(f"could not connect to an ember server at {settings.base_url()}; start one with 'ember serve'") from None
    if r.status_code >= 400:
        try:
            err = r.json().get("error")
            msg = err.get("message") if isinstance(err, dict) else err
        except ValueError:
            msg = r.text.strip()
        raise EmberError(str(msg or f"the server answered {r.status_code}"))
    return r.json() if r.content else None


@app.command()
def serve(
    host: str = typer.Option(None, "--host", help="host:port to listen on (default: EMBER_HOST or 127.0.0.1:11434)."),
    log_level: str = typer.Option("warning", "--log-level", help="uvicorn log level."),
    rpc: str = typer.Option(None, "--rpc", help="RPC workers (ember worker) to split models across: HOST:PORT,HOST:PORT (default: EMBER_RPC)."),
) -> None:
    """Run the Ollama- and OpenAI-compatible HTTP server."""
    import os

    import uvicorn

    if rpc is not None:
        parse_workers(rpc)  # a malformed list fails now, not at the first request
        os.environ["EMBER_RPC"] = rpc  # read by every load, runner processes included
    workers = settings.rpc_workers()
    if workers:
        console.print(f"Splitting models across RPC workers {', '.join(workers)}")

    from ember.server import create_app
    from ember.server.app import split_host
    from ember.server.protocol import protocol_with_deadline

    h, port = split_host(host or settings.host())
    application = create_app(host=h)
    console.print(f"Ember is listening on http://{h if ':' not in h else f'[{h}]'}:{port} (Ctrl+C to stop)")
    try:
        uvicorn.run(application, host=h, port=port, log_level=log_level, timeout_graceful_shutdown=5,
                    http=protocol_with_deadline(settings.header_timeout()), timeout_keep_alive=5)
    except OSError as e:
        raise EmberError(f"cannot listen on {h}:{port}: {e.strerror or e}") from None


@app.command()
def ps() -> None:
    """List the models the running server has loaded."""
    from rich.table import Table

    data = _client_call("GET", "/api/ps")
    models = data.get("models") or []
    table = Table(box=None, header_style="bold")
    for col in ("NAME", "SIZE", "CONTEXT", "PARALLEL", "UNTIL"):
        table.add_column(col)
    for m in models:
        until = m.get("expires_at", "")
        if until.startswith("2318"):
            until = "Forever"
        table.add_row(m["name"], format_size(int(m.get("size", 0))), str(m.get("context_length", "")),
                      str(m.get("num_parallel", "")), until)
    console.print(table)


@app.command()
def stop(name: str = typer.Argument(..., help="Model to unload.")) -> None:
    """Unload a model from the running server (after its current requests)."""
    _client_call("POST", "/api/generate", json={"model": name, "keep_alive": 0, "stream": False})
    console.print(f"Stopped {name}.")
