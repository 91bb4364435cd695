"""Settings from ``EMBER_*`` environment variables (read when asked, never cached,
so tests and servers can change them)."""

from __future__ import annotations

import math
import os
from pathlib import Path

from ember.errors import OptionError

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


DEFAULT_KV_BUDGET = 0.5


def kv_budget() -> float:
    """EMBER_KV_BUDGET: the fraction of free memory one model's KV cache may
    take (the rest stays for other models and requests)."""
    raw = os.environ.get("EMBER_KV_BUDGET", "").strip()
    if not raw:
        return DEFAULT_KV_BUDGET
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not 0 < value <= 1:
        raise OptionError(f"EMBER_KV_BUDGET must be a fraction between 0 and 1, got {raw!r}")
    return value


DEFAULT_MAX_BODY_SIZE = 16 << 20
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def max_body_size() -> int:
    """EMBER_MAX_BODY_SIZE: the largest request body the server reads, in bytes
    (or with K, M, G); blob uploads stream to disk and are not limited."""
    raw = os.environ.get("EMBER_MAX_BODY_SIZE", "").strip()
    if not raw:
        return DEFAULT_MAX_BODY_SIZE
    number, unit = raw.lower().rstrip("ib").rstrip(), ""
    if number and number[-1] in "kmg":
        number, unit = number[:-1].strip(), number[-1]
    try:
        value = int(float(number) * _SIZE_UNITS[unit])
    except (ValueError, OverflowError):
        value = 0
    if value <= 0:
        raise OptionError(f"EMBER_MAX_BODY_SIZE must be a size like 16M, got {raw!r}")
    return value
