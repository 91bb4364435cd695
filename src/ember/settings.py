"""Settings from ``EMBER_*`` environment variables (read when asked, never cached,
so tests and servers can change them)."""

from __future__ import annotations

import os
from pathlib import Path

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


def max_image_pixels() -> int:
    """``EMBER_MAX_IMAGE_PIXELS``: the largest image (width x height) accepted;
    bigger ones are refused from their header, before any decoding (default 64 megapixels)."""
    value = os.environ.get("EMBER_MAX_IMAGE_PIXELS") or ""
    return int(value) if value.isdecimal() and int(value) > 0 else 64_000_000
