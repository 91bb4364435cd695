"""What every caller of llama.cpp shares (through llama-cpp-python's low-level
ctypes API): backend start-up, log routing, device queries and small helpers
that hide ctypes. The engine (models, contexts, samplers, vision, RPC) and the
quantizer call llama.cpp themselves, after start-up here."""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import re
import threading
from dataclasses import dataclass

import llama_cpp as lc
import psutil

from ember import settings

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


def c_log_callback() -> object:
    """The C log callback Ember installed (for libraries that log separately, libmtmd)."""
    ensure_backend()
    return _log_callback


def supports_gpu_offload() -> bool:
    """Whether this machine has a GPU llama.cpp can use. (llama.cpp's own
    ``llama_supports_gpu_offload`` also says yes for any build with the RPC
    backend, which has no local GPU behind it.)"""
    return bool(gpu_devices())


def system_info() -> str:
    ensure_backend()
    return (lc.llama_print_system_info() or b"").decode("utf-8", "replace")


def physical_cores() -> int:
    """llama.cpp's default: the number of physical cores (hyper-threads slow it)."""
    try:
        n = psutil.cpu_count(logical=False)
    except Exception:  # noqa: BLE001 - psutil may fail in odd containers
        n = None
    return max(1, n or os.cpu_count() or 1)


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
    if settings.debug():
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
    """Parse llama.cpp's '<buffer> <kind> buffer size = N MiB' lines into bytes
    (buffers: CPU, CPU_Mapped, CUDA0, RPC0[host:port], ...)."""
    sizes: dict[str, int] = {}
    for m in re.finditer(r"(\S+)\s+(model|KV|compute|output|RS)\s+buffer size\s*=\s*([\d.]+)\s*MiB", "".join(lines)):
        key = f"{m.group(1).rstrip(':')} {m.group(2)}"
        sizes[key] = sizes.get(key, 0) + int(float(m.group(3)) * 1024 * 1024)
    return sizes


_KINDS = {"model": "model", "KV": "kv_cache", "RS": "kv_cache", "compute": "compute", "output": "output"}


def device_totals(sizes: dict[str, int]) -> dict[str, dict[str, int]]:
    """:func:`buffer_sizes` grouped by device: ``{"CPU": {"model": n, "kv_cache": n, ...},
    "RPC0[10.0.0.2:50052]": {...}}``. Host-memory buffers of any backend
    (CPU_Mapped, CPU_REPACK, CUDA_Host) count as the CPU's."""
    out: dict[str, dict[str, int]] = {}
    for key, n in sizes.items():
        buf, _, kind = key.rpartition(" ")
        device = "CPU" if buf.startswith("CPU") or buf.endswith("_Host") else buf
        row = out.setdefault(device, {"model": 0, "kv_cache": 0, "compute": 0, "output": 0})
        row[_KINDS[kind]] += n
    return out


# --- ggml devices -------------------------------------------------------------
# llama-cpp-python binds libllama's functions only; ggml's (devices, the RPC
# backend, the abort hook) are found through libllama itself: a symbol lookup on
# a library also searches the libraries it links. (The wheel ships each library
# as copies, libggml-base.so and libggml-base.so.0: opening one by its own file
# name could load a second copy that llama.cpp never uses.)
DEVICE_CPU, DEVICE_GPU, DEVICE_IGPU = 0, 1, 2


@functools.cache
def ggml() -> ctypes.CDLL:
    """libllama opened again (the copy already loaded), for ggml's functions."""
    lib = ctypes.CDLL(lc.llama_cpp._lib._name)
    vp, sz = ctypes.c_void_p, ctypes.c_size_t
    for fname, args, res in [
        ("ggml_backend_dev_count", [], sz),
        ("ggml_backend_dev_get", [sz], vp),
        ("ggml_backend_dev_name", [vp], ctypes.c_char_p),
        ("ggml_backend_dev_description", [vp], ctypes.c_char_p),
        ("ggml_backend_dev_type", [vp], ctypes.c_int),
        ("ggml_backend_dev_memory", [vp, ctypes.POINTER(sz), ctypes.POINTER(sz)], None),
        ("ggml_backend_reg_dev_count", [vp], sz),
        ("ggml_backend_reg_dev_get", [vp, sz], vp),
    ]:
        f = getattr(lib, fname)
        f.argtypes, f.restype = args, res
    return lib


@dataclass(frozen=True)
class Device:
    """A ggml backend device: this machine's CPU or a GPU, or a worker's device."""

    ptr: int
    name: str
    description: str
    kind: int  # DEVICE_CPU, DEVICE_GPU, DEVICE_IGPU, ...

    @classmethod
    def at(cls, ptr: int) -> Device:
        base = ggml()
        return cls(
            ptr,
            (base.ggml_backend_dev_name(ptr) or b"?").decode("utf-8", "replace"),
            (base.ggml_backend_dev_description(ptr) or b"").decode("utf-8", "replace"),
            int(base.ggml_backend_dev_type(ptr)),
        )

    def memory(self) -> tuple[int, int]:
        """(free, total) bytes, as the device reports them."""
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        ggml().ggml_backend_dev_memory(self.ptr, ctypes.byref(free), ctypes.byref(total))
        return free.value, total.value


def devices() -> list[Device]:
    """This machine's devices, as llama.cpp registered them (the CPU last)."""
    lib = ggml()
    return [Device.at(lib.ggml_backend_dev_get(i)) for i in range(lib.ggml_backend_dev_count())]


def gpu_devices() -> list[Device]:
    """The local devices llama.cpp offloads layers to by default: the discrete
    GPUs, else the integrated ones."""
    found = devices()
    gpus = [d for d in found if d.kind == DEVICE_GPU]
    return gpus or [d for d in found if d.kind == DEVICE_IGPU]


def registry_devices(reg: int) -> list[Device]:
    """The devices of one backend registry (e.g. an RPC worker's)."""
    lib = ggml()
    return [Device.at(lib.ggml_backend_reg_dev_get(reg, i)) for i in range(lib.ggml_backend_reg_dev_count(reg))]
