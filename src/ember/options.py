"""Ollama's option names, types and defaults: one table used by the Modelfile
parser (PARAMETER), ``ember run --param``, ``/set parameter``, the HTTP APIs
and the engine, so every entry point accepts exactly the same options."""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from typing import Any

from ember import ggml_types
from ember.errors import OptionError

log = logging.getLogger("ember.options")


@dataclass(frozen=True)
class OptionSpec:
    name: str
    type: type  # int, float, bool, str, or list (of str: only ``stop``)
    default: Any
    load: bool  # True: changes how the model is loaded (needs a reload), else per request
    help: str


_SPECS = [
    # Load-time options (Ollama's Runner options, plus llama.cpp's KV type and flash attention).
    OptionSpec("num_ctx", int, 0, True, "context length in tokens (0: the smaller of 4096 and the model's training context)"),
    OptionSpec("num_batch", int, 512, True, "logical batch size for prompt processing"),
    OptionSpec("num_gpu", int, -1, True, "layers to offload to the GPU (-1: all; ignored on CPU-only builds)"),
    OptionSpec("main_gpu", int, 0, True, "GPU that holds the main buffers"),
    OptionSpec("num_thread", int, 0, True, "CPU threads (0: the number of physical cores)"),
    OptionSpec("use_mmap", bool, True, True, "map the model file instead of reading it into memory"),
    OptionSpec("use_mlock", bool, False, True, "lock the model in RAM"),
    OptionSpec("numa", bool, False, True, "NUMA optimizations"),
    OptionSpec("low_vram", bool, False, True, "accepted for compatibility; no effect"),
    OptionSpec("flash_attn", bool, None, True, "flash attention (default: llama.cpp decides; on for CPUs)"),
    OptionSpec("kv_cache_type", str, "f16", True, f"KV cache type: {', '.join(ggml_types.KV_CACHE_TYPES)}"),
    OptionSpec("batch_invariant", bool, False, True, "never batch sequences together, so each gets exactly the numbers it would get alone (lower throughput under load)"),
    OptionSpec("rpc", str, "", True, "RPC workers (ember worker) to split the model across: HOST:PORT,HOST:PORT (empty: EMBER_RPC; none: this machine only)"),
    OptionSpec("tensor_split", str, "", True, "share of the layers per device, e.g. 2,1,1: this machine (its CPU, or each GPU) first, then each worker's devices in rpc order (default: by free memory)"),
    OptionSpec("draft", str, "", True, "a small model of the same family (registry name; a GGUF file too outside the server) whose greedy tokens are the speculative drafts, up to num_draft a step (empty: n-grams of the prompt and output)"),
    OptionSpec("use_repack", bool, True, True, "repack weights for the CPU's fastest matmul kernels (false: the kernels RPC workers run, so local and split runs give the same numbers)"),
    # Per-request options (Ollama's Options).
    OptionSpec("num_keep", int, 4, False, "tokens of the prompt kept when the context is shifted"),
    OptionSpec("seed", int, -1, False, "random seed (-1: random)"),
    OptionSpec("num_predict", int, -1, False, "maximum tokens to generate (-1: until the context is full)"),
    OptionSpec("top_k", int, 40, False, "keep only the k most likely tokens (0: all)"),
    OptionSpec("top_p", float, 0.9, False, "nucleus sampling threshold"),
    OptionSpec("min_p", float, 0.0, False, "drop tokens less likely than min_p x the top token"),
    OptionSpec("typical_p", float, 1.0, False, "locally typical sampling"),
    OptionSpec("tfs_z", float, 1.0, False, "accepted for compatibility; no effect"),
    OptionSpec("repeat_last_n", int, 64, False, "tokens looked back for penalties (0: off, -1: num_ctx)"),
    OptionSpec("temperature", float, 0.8, False, "sampling temperature (0: greedy)"),
    OptionSpec("repeat_penalty", float, 1.1, False, "penalty for repeated tokens"),
    OptionSpec("presence_penalty", float, 0.0, False, "penalty for tokens already present"),
    OptionSpec("frequency_penalty", float, 0.0, False, "penalty proportional to a token's count"),
    OptionSpec("mirostat", int, 0, False, "Mirostat sampling (0: off, 1: Mirostat, 2: Mirostat 2.0)"),
    OptionSpec("mirostat_tau", float, 5.0, False, "Mirostat target entropy"),
    OptionSpec("mirostat_eta", float, 0.1, False, "Mirostat learning rate"),
    OptionSpec("penalize_newline", bool, True, False, "accepted for compatibility; no effect"),
    OptionSpec("stop", list, [], False, "stop sequences (repeatable)"),
    OptionSpec("num_draft", int, 8, False, "most tokens drafted a step for speculative decoding from n-grams of the prompt and output (0: off); the length adapts to what is accepted"),
]

SPECS: dict[str, OptionSpec] = {s.name: s for s in _SPECS}
LOAD_OPTIONS = frozenset(s.name for s in _SPECS if s.load)
KV_CACHE_TYPES = tuple(ggml_types.KV_CACHE_TYPES)  # llama.cpp's, in ggml's type order


def spec(name: str) -> OptionSpec:
    try:
        return SPECS[name]
    except KeyError:
        raise OptionError(f"unknown parameter {name!r}; known parameters: {', '.join(SPECS)}") from None


def parse_value(name: str, text: str) -> Any:
    """Parse a textual value (Modelfile PARAMETER, ``--param``, ``/set parameter``).

    For ``stop`` the result is a single string; callers accumulate them.
    """
    s = spec(name)
    text = text.strip()
    try:
        if s.type is bool:
            low = text.lower()
            if low in ("true", "1", "yes", "on"):
                return True
            if low in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if s.type is int:
            return _check(name, int(text))
        if s.type is float:
            return _check(name, float(text))
    except ValueError:
        raise OptionError(f"parameter {name!r} needs {_TYPE_WORDS[s.type]}, got {shown(text)}") from None
    if s.type is list:
        if len(text) >= 2 and text[0] == text[-1] == '"':
            text = text[1:-1]
        return text
    return _check(name, text)


_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a string"}


def shown(value: Any) -> str:
    """A value as the client wrote it (JSON, shortened), for error messages."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = str(value)
    return text if len(text) <= 80 else text[:77] + "..."


def coerce(name: str, value: Any) -> Any:
    """Check a JSON value (HTTP ``options``, Python keyword) and return it typed."""
    s = spec(name)
    if value is None and s.default is None:
        return None  # "let llama.cpp decide"
    if s.type is list:
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
        raise OptionError(f"parameter 'stop' needs a string or a list of strings, got {shown(value)}")
    if s.type is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str):
            return parse_value(name, value)
        raise OptionError(f"parameter {name!r} needs true or false, got {shown(value)}")
    if s.type is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and not value.is_integer()):
            if isinstance(value, str):
                return parse_value(name, value)
            raise OptionError(f"parameter {name!r} needs an integer, got {shown(value)}")
        return _check(name, int(value))
    if s.type is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if isinstance(value, str):
                return parse_value(name, value)
            raise OptionError(f"parameter {name!r} needs a number, got {shown(value)}")
        return _check(name, float(value))
    if name == "rpc" and isinstance(value, list) and all(isinstance(v, str) for v in value):
        value = ",".join(value)
    if not isinstance(value, str):
        raise OptionError(f"parameter {name!r} needs a string, got {shown(value)}")
    return _check(name, value)


# Integers reach llama.cpp as C ints: keep them where a typo cannot ask for a
# billion threads or a terabyte context.
_INT_RANGES = {
    "num_ctx": (0, 1 << 20),
    "num_batch": (0, 1 << 16),
    "num_thread": (0, 1024),
    "num_gpu": (-1, 1 << 16),
    "main_gpu": (0, 64),
    "seed": (-(1 << 63), (1 << 64) - 1),
    "num_draft": (0, 64),
}
_INT32 = (-(1 << 31), (1 << 31) - 1)


def _check(name: str, value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        raise OptionError(f"parameter {name!r} must be a finite number, got {value}")
    if isinstance(value, int) and not isinstance(value, bool):
        lo, hi = _INT_RANGES.get(name, _INT32)
        if not lo <= value <= hi:
            raise OptionError(f"parameter {name!r} must be between {lo} and {hi}, got {value}")
    if name == "kv_cache_type" and value not in KV_CACHE_TYPES:
        raise OptionError(f"kv_cache_type must be one of {', '.join(KV_CACHE_TYPES)}, got {shown(value)}")
    if name in ("num_ctx", "num_batch") and value < 0:
        raise OptionError(f"parameter {name!r} must not be negative, got {value}")
    if name == "rpc":
        parse_workers(value)
    if name == "tensor_split":
        parse_tensor_split(value)
    if name == "temperature" and value < 0:
        raise OptionError(f"temperature must not be negative, got {value}")
    if name in ("top_p", "min_p", "typical_p") and not 0.0 <= value <= 1.0:
        raise OptionError(f"parameter {name!r} must be between 0 and 1, got {value}")
    return value


MAX_WORKERS = 16  # llama.cpp's GGML_RPC_MAX_SERVERS
RPC_PORT = 50052  # llama.cpp's rpc-server default


def parse_workers(text: str) -> list[str]:
    """``rpc``'s value: "HOST:PORT,HOST:PORT" -> ["HOST:PORT", ...]; "" and
    "none" give no workers. Hosts are IPv4 addresses or names (llama.cpp's RPC
    client speaks IPv4 only)."""
    text = text.strip()
    if text.lower() in ("", "none"):
        return []
    out: list[str] = []
    for item in (part.strip() for part in text.split(",")):
        host, sep, port = item.rpartition(":")
        if not item or not sep or not host or ":" in host or "[" in host or any(c.isspace() for c in host):
            raise OptionError(f"rpc: {item!r} is not HOST:PORT (an IPv4 address or host name and a port, e.g. 192.168.1.20:{RPC_PORT})")
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise OptionError(f"rpc: {item!r} has no valid port (1-65535)")
        endpoint = f"{host.lower()}:{int(port)}"
        if endpoint in out:
            raise OptionError(f"rpc: {item!r} is listed twice")
        out.append(endpoint)
    if len(out) > MAX_WORKERS:
        raise OptionError(f"rpc: {len(out)} workers given; llama.cpp takes at most {MAX_WORKERS}")
    return out


def parse_tensor_split(text: str) -> list[float]:
    """``tensor_split``'s value: "3,1,1" -> [3.0, 1.0, 1.0] ("" gives [])."""
    text = text.strip()
    if not text:
        return []
    try:
        shares = [float(x) for x in text.replace("/", ",").split(",")]
    except ValueError:
        raise OptionError(f"tensor_split: {text!r} is not a list of numbers like 3,1,1") from None
    if not all(math.isfinite(x) and x >= 0 for x in shares) or not any(shares):
        raise OptionError(f"tensor_split: {text!r} needs shares of 0 or more, at least one above 0")
    return shares


def coerce_all(options: dict[str, Any] | None) -> dict[str, Any]:
    """Validate a whole options mapping. Unknown names are errors: the Python
    API, the CLI and Modelfiles are strict, so a typo is caught where it is
    written (the HTTP APIs use :func:`coerce_request`)."""
    return {k: coerce(k, v) for k, v in (options or {}).items()}


_logged_unknown: set[str] = set()


def coerce_request(options: dict[str, Any]) -> dict[str, Any]:
    """Validate the ``options`` of an HTTP request as Ollama does: ``null``
    means unset (clients send every field they know, most as null), an
    unknown name is logged once and ignored (clients send names of other
    Ollama versions), and a known name with a wrong type or range is still
    an error."""
    out = {}
    for k, v in options.items():
        if v is None:
            continue
        if k not in SPECS:
            if k not in _logged_unknown and len(_logged_unknown) < 1000:
                _logged_unknown.add(k)
                log.warning("ignoring unknown option %s", shown(k))
            continue
        out[k] = coerce(k, v)
    return out


def merged(*layers: dict[str, Any] | None) -> dict[str, Any]:
    """Later layers override earlier ones; missing names take the defaults."""
    out = {name: (list(s.default) if s.type is list else s.default) for name, s in SPECS.items()}
    for layer in layers:
        if layer:
            out.update(layer)
    return out


_DURATION = re.compile(r"(-?\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNIT = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
# Go's time.Duration is an int64 of nanoseconds: about 292 years at most.
MAX_DURATION = (2**63 - 1) / 1e9


def parse_duration(value: Any, where: str) -> float:
    """Ollama's keep_alive: a Go duration ("5m", "1h30m", "-1s"), a number of
    seconds, or a numeric string. Negative means forever (``math.inf``)."""
    if isinstance(value, bool):
        raise OptionError(f"{where} must be a duration like \"5m\" or a number of seconds, got {value!r}")
    if isinstance(value, (int, float)):
        try:
            seconds = float(value)
        except OverflowError:  # an integer with hundreds of digits
            seconds = math.inf if value > 0 else -math.inf
    elif isinstance(value, str):
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            neg = text.startswith("-")
            body = text.lstrip("+-")
            parts = _DURATION.findall(body)
            if not body or "".join(n + u for n, u in parts) != body:
                raise OptionError(f"{where}: invalid duration {shown(value)}; use e.g. \"5m\", \"1h\", \"30s\", 0 or -1") from None
            seconds = sum(float(n) * _UNIT[u] for n, u in parts)
            if neg:
                seconds = -seconds
        if abs(seconds) > MAX_DURATION:  # what Go's ParseDuration refuses, Ollama refuses
            raise OptionError(f"{where}: invalid duration {shown(value)}: longer than Go's limit of about 292 years")
    else:
        raise OptionError(f"{where} must be a duration like \"5m\" or a number of seconds, got {value!r}")
    if math.isnan(seconds):
        raise OptionError(f"{where} must be a number, got NaN")
    # A number beyond Go's range: the longest duration there is, never an
    # expiry time past what a date can hold.
    return math.inf if seconds < 0 else min(seconds, MAX_DURATION)
