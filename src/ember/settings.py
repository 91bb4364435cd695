"""Settings from ``EMBER_*`` environment variables (read when asked, never cached,
so tests and servers can change them)."""

from __future__ import annotations

import os
from pathlib import Path

from ember.errors import OptionError
from ember.options import parse_workers

DEFAULT_HOST = "127.0.0.1:11434"


def models_dir() -> Path:
    return Path(os.environ.get("EMBER_MODELS") or Path.home() / ".ember" / "models").expanduser()


def host() -> str:
    """``host:port`` the server binds and the CLI talks to (Ollama's default port)."""
    value = os.environ.get("EMBER_HOST") or DEFAULT_HOST
    value = value.removeprefix("http://").removeprefix("https://").rstrip("/")
    if ":" not in value:
        value += ":11434"
    return value


def base_url() -> str:
    return "http://" + host()


def rpc_workers() -> list[str]:
    """``EMBER_RPC``: RPC workers (``host:port,host:port``, started with ``ember
    worker``) that loads naming none of their own split models across. Workers
    from this list are optional: one that cannot be reached is skipped when the
    model fits without it."""
    try:
        return parse_workers(os.environ.get("EMBER_RPC", ""))
    except OptionError as e:
        raise OptionError(f"EMBER_RPC: {e}") from None
