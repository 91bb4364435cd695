"""`ember ps`, `ember stop`: talk to a running server over HTTP (at
EMBER_HOST, with EMBER_API_KEY when set)."""

from __future__ import annotations

from typing import Any

import httpx
import typer
from rich.table import Table

from ember import settings
from ember.cli.app import app
from ember.cli.common import console
from ember.cli.sizes import format_size
from ember.errors import EmberError


def _client_call(method: str, path: str, **kwargs: Any) -> Any:
    """One request to the running server; a clear one-line error when none runs."""
    url = settings.base_url() + path
    headers = {}
    key = settings.api_key()
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
def ps() -> None:
    """List the models the running server has loaded."""
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
