"""`ember list`: the registry's models, as Ollama lists them. Its own module
because it reads manifests only (:mod:`ember.registry.listing`): it loads
neither the GGUF reader nor the template engine, so it starts fast."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import typer

from ember.cli.app import app
from ember.cli.sizes import format_size
from ember.registry.listing import list_models


def _ago(t: datetime | None) -> str:
    if t is None:
        return ""
    s = (datetime.now(UTC) - t).total_seconds()
    if s < 1:
        return "Less than a second ago"
    for limit, unit, size in ((60, "second", 1), (3600, "minute", 60), (86400, "hour", 3600),
                              (86400 * 7, "day", 86400), (86400 * 30, "week", 86400 * 7),
                              (86400 * 365, "month", 86400 * 30), (float("inf"), "year", 86400 * 365)):
        if s < limit:
            n = int(s // size)
            if n == 1:
                return f"About a{'n' if unit == 'hour' else ''} {unit} ago"
            return f"{n} {unit}s ago"
    return ""


@app.command("list")
def list_(
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """List the models in the registry (the demo model is there until 'ember rm demo')."""
    models = list_models()
    if as_json:
        print(json.dumps([m.to_json() for m in models], indent=2))
        return
    rows = [("NAME", "ID", "SIZE", "MODIFIED")]
    for m in models:
        rows.append((m.name, m.digest.removeprefix("sha256:")[:12], format_size(m.size), _ago(m.modified_at)))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        line = "    ".join(c.ljust(widths[i]) for i, c in enumerate(r[:3])) + "    " + r[3]
        typer.echo(line.rstrip())
