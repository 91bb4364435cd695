"""The one place that talks to llama.cpp through llama-cpp-python's low-level
ctypes API: backend start-up, log routing, and small helpers that hide ctypes."""

from __future__ import annotations

import ctypes
import logging
import os
import threading

import llama_cpp as lc

log = logging.getLogger("ember.llama")

_init_lock = threading.Lock()
_initialized = False
_log_callback = None  # keep a reference: llama.cpp calls it from C


def ensure_backend() -> None:
    """Initialise llama.cpp once per process and silence its stderr chatter
    (set EMBER_DEBUG=1 and enable logging to see it)."""
    global _initialized, _log_callback
    if _initialized:
        return
    with _init_lock:
        if _initialized:
            return
        _log_callback = lc.llama_log_callback(_on_log_capturing)
        lc.llama_log_set(_log_callback, ctypes.c_void_p(0))
        lc.llama_backend_init()
        _initialized = True


def supports_gpu_offload() -> bool:
    ensure_backend()
    return bool(lc.llama_supports_gpu_offload())


def system_info() -> str:
    ensure_backend()
    return (lc.llama_print_system_info() or b"").decode("utf-8", "replace")


def physical_cores() -> int:
    """llama.cpp's default: the number of physical cores (hyper-threads slow it)."""
    try:
        import psutil

        n = psutil.cpu_count(logical=False)
    except Exception:  # noqa: BLE001 - psutil may fail in odd containers
        n = None
    return max(1, n or os.cpu_count() or 1)


GGML_TYPES = {
    "f32": 0,
    "f16": lc.GGML_TYPE_F16,
    "q4_0": lc.GGML_TYPE_Q4_0,
    "q4_1": 3,
    "q5_0": 6,
    "q5_1": 7,
    "q8_0": lc.GGML_TYPE_Q8_0,
    "iq4_nl": 20,
    "bf16": 30,
}


_capture = threading.local()


class _Capture(list):  # type: ignore[type-arg]
    pass


def _on_log_capturing(level: int, text: bytes | None, user_data: ctypes.c_void_p) -> None:
    if not text:
        return
    lines = getattr(_capture, "lines", None)
    s = text.decode("utf-8", "replace")
    if lines is not None:
        lines.append(s)
    if os.environ.get("EMBER_DEBUG"):
        log.debug(s.rstrip())


class capture_log:  # noqa: N801 - used as a context manager like a function
    """Collect llama.cpp's log lines emitted by this thread inside the block
    (buffer sizes, the reason a load failed)."""

    def __enter__(self) -> list[str]:
        self.prev = getattr(_capture, "lines", None)
        _capture.lines = _Capture()
        return _capture.lines  # type: ignore[no-any-return]

    def __exit__(self, *exc: object) -> None:
        _capture.lines = self.prev


def last_error(lines: list[str]) -> str:
    """The most useful line of a failed llama.cpp call's log."""
    text = "".join(lines)
    errors = [ln.strip() for ln in text.splitlines() if "error" in ln.lower() or "failed" in ln.lower()]
    return (errors[0] if errors else (text.strip().splitlines() or ["unknown error"])[-1])[:300]


def buffer_sizes(lines: list[str]) -> dict[str, int]:
    """Parse llama.cpp's '<device> <kind> buffer size = N MiB' lines into bytes."""
    import re

    sizes: dict[str, int] = {}
    for m in re.finditer(r"(\S+)\s+(KV|compute|output|RS)\s+buffer size\s*=\s*([\d.]+)\s*MiB", "".join(lines)):
        key = f"{m.group(1).rstrip(':')} {m.group(2)}"
        sizes[key] = sizes.get(key, 0) + int(float(m.group(3)) * 1024 * 1024)
    return sizes
