"""llama.cpp's RPC backend: lend this machine's devices to another process
(``ember worker``), and split a model's layers across this machine and such
workers (the ``rpc`` load option, ``EMBER_RPC``).

The protocol has no authentication or encryption: workers belong on loopback,
a private network or behind an SSH tunnel (docs/multi-machine.md).

llama.cpp's RPC client aborts the process whenever a worker fails. So every
worker is checked here before llama.cpp connects (reachable, same protocol,
free to serve us), and an abort handler turns a worker lost during generation
into one line on stderr and exit status 1 instead of a core dump.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import socket
import struct
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import llama_cpp as lc
import psutil  # type: ignore[import-untyped]

from ember import options as opts
from ember import settings
from ember.engine import llama
from ember.errors import OptionError, WorkerError
from ember.gguf import read_header

log = logging.getLogger("ember.rpc")

PROTOCOL = (7, 0)  # RPC_PROTO_MAJOR/MINOR_VERSION of the pinned llama.cpp
_CMD_GET_DEVICE_MEMORY, _CMD_HELLO, _CMD_DEVICE_COUNT = 11, 14, 15
_CAPS_SIZE = 24  # RPC_CONN_CAPS_SIZE: transport capabilities; zeros ask for plain TCP
PROBE_TIMEOUT = 3.0  # seconds to connect, and for each answer
_ABORT_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_char_p)  # ggml_abort_callback_t


@functools.cache
def _library() -> ctypes.CDLL:
    lib = llama.ggml()
    if not hasattr(lib, "ggml_backend_rpc_start_server"):
        raise WorkerError(
            "this llama-cpp-python was built without llama.cpp's RPC backend (no libggml-rpc); "
            "reinstall it with scripts/install.sh, which builds it with -DGGML_RPC=ON"
        )
    lib.ggml_backend_rpc_add_server.argtypes = [ctypes.c_char_p]
    lib.ggml_backend_rpc_add_server.restype = ctypes.c_void_p
    lib.ggml_backend_rpc_start_server.argtypes = [
        ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.POINTER(ctypes.c_void_p),
    ]
    lib.ggml_backend_rpc_start_server.restype = None
    lib.ggml_backend_cpu_buffer_type.argtypes = []
    lib.ggml_backend_cpu_buffer_type.restype = ctypes.c_void_p
    lib.ggml_set_abort_callback.argtypes = [_ABORT_CALLBACK]
    lib.ggml_set_abort_callback.restype = ctypes.c_void_p
    return lib


# --- the worker side -----------------------------------------------------------
def serve(endpoint: str, devices: Sequence[llama.Device], threads: int, cache_dir: Path | None) -> None:
    """Run llama.cpp's RPC server on ``endpoint`` (an IPv4 ``address:port``) for
    ``devices``. Blocks for good; returns only when it cannot listen."""
    arr = (ctypes.c_void_p * len(devices))(*[d.ptr for d in devices])
    cache = str(cache_dir).encode() if cache_dir else None
    _library().ggml_backend_rpc_start_server(endpoint.encode(), cache, threads, len(devices), arr)


# --- checking a worker ---------------------------------------------------------
class _ProtocolError(Exception):
    pass


def _recv(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise _ProtocolError("closed the connection")
        data += chunk
    return data


def _call(sock: socket.socket, cmd: int, payload: bytes, answer_size: int) -> bytes:
    """One request/answer of the RPC protocol: | cmd u8 | size u64 | payload | -> | size u64 | answer |."""
    sock.sendall(struct.pack("<BQ", cmd, len(payload)) + payload)
    (size,) = struct.unpack("<Q", _recv(sock, 8))
    if size != answer_size:
        raise _ProtocolError(f"answered command {cmd} with {size} bytes instead of {answer_size}")
    return _recv(sock, size)


def resolve(endpoint: str) -> str:
    """``host:port`` with the host resolved to its IPv4 address, as llama.cpp
    will (one name per worker, so this process never opens two connections to it)."""
    host, _, port = endpoint.rpartition(":")
    try:
        return f"{socket.gethostbyname(host)}:{port}"
    except OSError:
        raise WorkerError(f"RPC worker {endpoint}: cannot resolve the host name {host!r}") from None


def probe(endpoint: str, timeout: float = PROBE_TIMEOUT) -> int:
    """Check that ``endpoint`` (``ip:port``) is an RPC worker of our protocol
    version that is free to serve this process; returns its device count."""
    host, _, port = endpoint.rpartition(":")
    try:
        sock = socket.create_connection((host, int(port)), timeout=timeout)
    except TimeoutError:
        raise WorkerError(f"RPC worker {endpoint} did not accept a connection within {timeout:g} s "
                          "(is the address right, and does the firewall let the port through?)") from None
    except OSError as e:
        raise WorkerError(f"RPC worker {endpoint} is unreachable ({e.strerror or e}); "
                          f"start it on that machine with: ember worker --host {endpoint}") from None
    with sock:
        try:
            hello = _call(sock, _CMD_HELLO, bytes(_CAPS_SIZE), 4 + _CAPS_SIZE)
            if hello[0] != PROTOCOL[0] or hello[1] > PROTOCOL[1]:
                raise WorkerError(
                    f"RPC worker {endpoint} speaks RPC protocol {hello[0]}.{hello[1]}.{hello[2]} but this Ember speaks "
                    f"{PROTOCOL[0]}.{PROTOCOL[1]}; run the same Ember (llama.cpp) version on every machine"
                )
            (count,) = struct.unpack("<I", _call(sock, _CMD_DEVICE_COUNT, b"", 4))
        except TimeoutError:
            raise WorkerError(
                f"RPC worker {endpoint} accepted the connection but did not answer within {timeout:g} s; a worker "
                "serves one client at a time: is another process (another model, another server) using it?"
            ) from None
        except (OSError, _ProtocolError) as e:
            detail = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise WorkerError(f"RPC worker {endpoint} failed the handshake ({detail}); is it an RPC worker "
                              "(ember worker) of the same Ember version?") from None
    if count == 0:
        raise WorkerError(f"RPC worker {endpoint} offers no devices")
    return int(count)


def _lost(endpoints: Sequence[str]) -> list[str]:
    """Of the workers this process talks to, those whose connection the other
    side closed (a stopped worker); else those where nothing listens any more;
    else all of them (the network failed: no way to tell)."""
    established = set()
    for conn in psutil.Process().net_connections(kind="tcp"):
        if conn.raddr and conn.status == psutil.CONN_ESTABLISHED:
            established.add(f"{conn.raddr.ip}:{conn.raddr.port}")
    closed = [ep for ep in endpoints if ep not in established]
    if closed:
        return closed
    refused = []
    for ep in endpoints:
        host, _, port = ep.rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=1.0).close()
        except ConnectionRefusedError:
            refused.append(ep)
        except OSError:
            pass
    return refused or list(endpoints)


# --- workers in use by this process ---------------------------------------------
# llama.cpp keeps one connection per worker for as long as any model of this
# process has buffers there; a second connection would wait behind the first
# (a worker serves one client at a time), so workers in use are not probed.
_held_lock = threading.Lock()
_held: dict[str, int] = {}


def _hold(endpoints: Sequence[str]) -> None:
    with _held_lock:
        for ep in endpoints:
            _held[ep] = _held.get(ep, 0) + 1


def release(endpoints: Sequence[str]) -> None:
    """A model using these workers was freed (llama.cpp closed its connections)."""
    with _held_lock:
        for ep in endpoints:
            if _held.get(ep, 0) <= 1:
                _held.pop(ep, None)
            else:
                _held[ep] -= 1


def _in_use(endpoint: str) -> bool:
    with _held_lock:
        return endpoint in _held


# --- a worker lost mid-generation -------------------------------------------------
_abort_handler: Any = None
_aborting = threading.Lock()


def _on_abort(message: bytes | None) -> None:
    """ggml's abort hook (called on the thread that failed, just before abort())."""
    text = (message or b"").decode("utf-8", "replace").strip()
    if "ggml-rpc" not in text:
        os.write(2, (text + "\n").encode())  # not ours: llama.cpp aborts as it always did
        return
    _aborting.acquire()  # other threads that fail too wait here while the first one ends the process
    with _held_lock:
        endpoints = list(_held)
    lost = _lost(endpoints)
    lead = "\n" if sys.stdout.isatty() else ""
    os.write(2, (
        f"{lead}Error: lost the connection to RPC worker {', '.join(lost) or '(unknown)'} (stopped, or the network failed); "
        "llama.cpp cannot continue without it, so this process ends: start the worker again and reload the model\n"
    ).encode())
    os._exit(1)


def install_abort_handler() -> None:
    global _abort_handler
    with _held_lock:
        if _abort_handler is None:
            _abort_handler = _ABORT_CALLBACK(_on_abort)
            _library().ggml_set_abort_callback(_abort_handler)


# --- placing a model's layers ---------------------------------------------------
@dataclass
class Placement:
    """Where llama.cpp puts one model's layers: its offload devices in llama.cpp's
    order (the workers' devices first, so only activations cross the network,
    then local GPUs), how many layers go to them, and each one's share."""

    endpoints: list[str]
    devices: list[llama.Device]
    n_gpu_layers: int
    split: list[float]
    skipped: list[str] = field(default_factory=list)  # EMBER_RPC workers left out: unreachable
    output_here: bool = False  # the output layer's weight stays on this machine's CPU
    _keep: list[Any] = field(default_factory=list, repr=False)

    def apply(self, params: Any) -> None:
        """Set ``llama_model_params``; the arrays live as long as this object."""
        devices = (ctypes.c_void_p * (len(self.devices) + 1))(*[d.ptr for d in self.devices], None)
        split = (ctypes.c_float * lc.llama_max_devices())(*self.split)
        self._keep = [devices, split]
        params.devices = ctypes.cast(devices, ctypes.c_void_p).value
        params.tensor_split = split
        params.n_gpu_layers = self.n_gpu_layers
        if self.output_here:
            # Logits (n_vocab floats a token: 1 MiB for Gemma 3) would otherwise
            # come back over the network from the last worker; the hidden state
            # the output matmul needs is a few KiB. (A model with tied embeddings
            # loads its output weight under token_embd's name.)
            lib = _library()
            overrides = (_Override * 2)(_Override(rb"^(output|token_embd)\.weight$", lib.ggml_backend_cpu_buffer_type()),
                                        _Override(None, None))
            self._keep.append(overrides)
            params.tensor_buft_overrides = ctypes.cast(overrides, ctypes.c_void_p).value


class _Override(ctypes.Structure):
    """llama_model_tensor_buft_override: tensors matching ``pattern`` go to ``buft``."""

    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


def placement_for(paths: Sequence[Path], options: dict[str, Any]) -> Placement | None:
    """The placement a load's options ask for (``rpc``, else ``EMBER_RPC``;
    ``tensor_split``; ``num_gpu``), or None for llama.cpp's default."""
    explicit = options["rpc"].strip()
    workers = opts.parse_workers(explicit) if explicit else settings.rpc_workers()
    shares = opts.parse_tensor_split(options["tensor_split"])
    if not workers and not shares:
        return None

    header = read_header(paths[0])
    n_layer = int(header.get(f"{header.get('general.architecture')}.block_count") or 0)
    model_bytes = sum(p.stat().st_size for p in paths)
    return place(workers, required=bool(explicit), num_gpu=options["num_gpu"], shares=shares,
                 n_layer=n_layer, model_bytes=model_bytes)


def _reachable(workers: Sequence[str], required: bool) -> tuple[list[str], dict[str, str]]:
    """The workers as ``ip:port``, each checked (unless this process already
    talks to it), and why those left out were (only when not ``required``)."""
    endpoints: list[str] = []
    skipped: dict[str, str] = {}
    for ep in workers:
        try:
            canonical = resolve(ep)
            if canonical in endpoints:
                raise OptionError(f"rpc: {ep} is {canonical}, which is already listed")
            if not _in_use(canonical):
                _library()
                probe(canonical)
            endpoints.append(canonical)
        except WorkerError as e:
            if required:
                raise
            skipped[ep] = str(e)
            log.warning("%s; loading without it", e)
    return endpoints, skipped


def place(
    workers: Sequence[str],
    *,
    required: bool,
    num_gpu: int,
    shares: Sequence[float],
    n_layer: int,
    model_bytes: int,
) -> Placement | None:
    """Check the workers and split the layers: this machine (its CPU, or its GPUs)
    and each worker device get ``shares`` of them (default: in proportion to
    free memory). ``required`` False: unreachable workers are skipped (the
    ``EMBER_RPC`` pool) when the model fits without them. None: llama.cpp's
    default placement on this machine."""
    endpoints, skipped = _reachable(workers, required)
    _hold(endpoints)  # from here on llama.cpp talks to them (and may abort)
    try:
        placement = _split(endpoints, skipped, num_gpu, shares, n_layer, model_bytes)
    except BaseException:
        release(endpoints)
        raise
    if placement is None:
        release(endpoints)
    return placement


def _split(
    endpoints: list[str], skipped: dict[str, str], num_gpu: int, shares: Sequence[float], n_layer: int, model_bytes: int
) -> Placement | None:
    remote: list[llama.Device] = []
    if endpoints:
        install_abort_handler()
        for ep in endpoints:
            reg = _library().ggml_backend_rpc_add_server(ep.encode())
            if not reg:
                raise WorkerError(f"RPC worker {ep} offers no devices")
            remote += llama.registry_devices(reg)
    gpus = llama.gpu_devices()
    cpu = [d for d in llama.devices() if d.kind == llama.DEVICE_CPU][:1]
    local = gpus or cpu
    ours = local + remote  # the order tensor_split is written in
    if shares:
        if len(shares) != len(ours):
            names = [f"{d.name} (this machine)" for d in local] + [d.name + " " + d.description for d in remote]
            raise OptionError(f"tensor_split has {len(shares)} values but there are {len(ours)} devices: {', '.join(names)}")
        weights = list(shares)
    else:
        # Devices with nothing to report count the host's memory, as in llama.cpp.
        weights = [float(d.memory()[0] or cpu[0].memory()[0]) for d in ours]
    if skipped:
        free = sum(d.memory()[0] for d in ours)
        if model_bytes > free:
            raise WorkerError(f"{'; '.join(skipped.values())}; the model ({model_bytes / 2**30:.1f} GiB) does not fit the "
                              f"memory left without it ({free / 2**30:.1f} GiB)")
    if not remote and not gpus:
        return None  # one device, this machine's CPU: nothing to split
    if len(remote) + len(gpus) > lc.llama_max_devices():
        raise OptionError(f"{len(remote) + len(gpus)} devices; llama.cpp takes at most {lc.llama_max_devices()}")
    if gpus:  # llama.cpp splits across devices; this machine's share is its GPUs'
        n_gpu_layers = 999 if num_gpu < 0 else num_gpu
        split = weights[len(local):] + weights[: len(local)]
    else:  # the CPU is no offload device: its share is the layers kept back
        split = weights[1:]
        if num_gpu >= 0:
            n_gpu_layers = num_gpu
        elif sum(split) == 0:
            n_gpu_layers = 0
        else:
            layers = n_layer + 1  # llama.cpp counts the output layer as one more
            kept = min(round(layers * weights[0] / sum(weights)), n_layer)
            n_gpu_layers = layers - kept
        if n_gpu_layers == 0:
            return None  # nothing left for the workers: this machine's CPU only
    return Placement(endpoints, remote + gpus, n_gpu_layers, split, list(skipped), output_here=not gpus)
