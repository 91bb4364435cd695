"""Settings from environment variables (read when asked, never cached, so tests
and servers can change them). Every ``EMBER_*`` variable is read here."""

from __future__ import annotations

import math
import os
from pathlib import Path

from ember.errors import OptionError
from ember.options import parse_duration, parse_workers

DEFAULT_HOST = "127.0.0.1:11434"
DEFAULT_REGISTRY = "https://registry.ollama.ai"


def models_dir() -> Path:
    return Path(os.environ.get("EMBER_MODELS") or Path.home() / ".ember" / "models").expanduser()


def cache_dir() -> Path:
    """The demo model and converted Hugging Face folders (``EMBER_CACHE``)."""
    return Path(os.environ.get("EMBER_CACHE") or Path.home() / ".cache" / "ember").expanduser()


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


def registry_url() -> str:
    """Where names without a host (``llama3.2``, ``user/model:tag``) are pulled
    from: Ollama's public registry unless ``EMBER_REGISTRY`` names a mirror."""
    value = (os.environ.get("EMBER_REGISTRY") or DEFAULT_REGISTRY).strip().rstrip("/")
    if "://" not in value:
        value = "https://" + value
    return value


def pull_source() -> str:
    """``EMBER_PULL_SOURCE=modelscope`` sends ``hf.co/...`` pulls to ModelScope."""
    return (os.environ.get("EMBER_PULL_SOURCE") or "hf").strip().lower()


def hf_endpoint() -> str:
    """Hugging Face or a mirror (``HF_ENDPOINT``, as huggingface_hub reads it)."""
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def hf_token() -> str | None:
    return os.environ.get("HF_TOKEN") or None


def modelscope_endpoint() -> str:
    return (os.environ.get("MODELSCOPE_ENDPOINT") or "https://modelscope.cn").rstrip("/")


def modelscope_token() -> str | None:
    return os.environ.get("MODELSCOPE_API_TOKEN") or None


def rpc_workers() -> list[str]:
    """``EMBER_RPC``: RPC workers (``host:port,host:port``, started with ``ember
    worker``) that loads naming none of their own split models across. Workers
    from this list are optional: one that cannot be reached is skipped when the
    model fits without it."""
    try:
        return parse_workers(os.environ.get("EMBER_RPC", ""))
    except OptionError as e:
        raise OptionError(f"EMBER_RPC: {e}") from None
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


def debug() -> bool:
    """EMBER_DEBUG: pass llama.cpp's log lines to Ember's debug log."""
    return bool(os.environ.get("EMBER_DEBUG"))


def _list(name: str) -> list[str]:
    return [x.strip() for x in os.environ.get(name, "").split(",") if x.strip()]


def origins() -> list[str]:
    """EMBER_ORIGINS: web origins (``https://app.example.com``, or ``*``) allowed
    to call the server from a browser, besides pages on this machine."""
    return [o.rstrip("/") for o in _list("EMBER_ORIGINS")]


def allowed_hosts() -> list[str]:
    """EMBER_ALLOWED_HOSTS: host names a loopback-bound server answers besides
    localhost and loopback addresses (a reverse proxy's name; ``*`` for any)."""
    return [h.lower().rstrip(".") for h in _list("EMBER_ALLOWED_HOSTS")]


DEFAULT_HEADER_TIMEOUT = 30.0


def header_timeout() -> float:
    """EMBER_HEADER_TIMEOUT: seconds a client has to send a request's line and
    headers, and the longest pause inside a body, before its connection is
    closed (slow clients cannot hold connections open forever)."""
    raw = os.environ.get("EMBER_HEADER_TIMEOUT", "").strip()
    if not raw:
        return DEFAULT_HEADER_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not 0 < value < 1e6:
        raise OptionError(f"EMBER_HEADER_TIMEOUT must be a number of seconds above 0, got {raw!r}")
    return value


def api_key() -> str | None:
    """EMBER_API_KEY: the key the server requires (``Authorization: Bearer``)
    and the CLI sends to it."""
    return os.environ.get("EMBER_API_KEY", "").strip() or None


def _count(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        return max(1, int(raw))
    except ValueError:
        raise OptionError(f"{name} must be an integer, got {raw!r}") from None


def num_parallel() -> int:
    """EMBER_NUM_PARALLEL: sequences decoded together per loaded model."""
    return _count("EMBER_NUM_PARALLEL", 4)


def max_queue() -> int:
    """EMBER_MAX_QUEUE: waiting requests before the server answers 503."""
    return _count("EMBER_MAX_QUEUE", 512)


def max_loaded_models() -> int:
    """EMBER_MAX_LOADED_MODELS: loaded models before the least recently used idle one is unloaded."""
    return _count("EMBER_MAX_LOADED_MODELS", 3)


DEFAULT_KEEP_ALIVE = 300.0


def keep_alive() -> float:
    """EMBER_KEEP_ALIVE: seconds an idle model stays loaded (a Go duration or
    seconds, as Ollama's ``keep_alive``; ``math.inf``: forever)."""
    raw = os.environ.get("EMBER_KEEP_ALIVE")
    return parse_duration(raw, "EMBER_KEEP_ALIVE") if raw else DEFAULT_KEEP_ALIVE
