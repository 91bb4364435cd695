"""``ember worker``: lend this machine's devices to Ember on another machine
(llama.cpp's RPC server, started through libggml-rpc's own entry point)."""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import typer

from ember.cli.app import app
from ember.cli.common import console, err_console
from ember.cli.sizes import format_size
from ember.engine import llama, rpc
from ember.errors import EmberError, OptionError, WorkerError
from ember.options import RPC_PORT

SECURITY_WARNING = (
    "Warning: the RPC protocol has no authentication or encryption. Anyone who can reach {endpoint} can use this "
    "machine's memory and compute and read the model data sent to it. Listen only on a private network you trust, "
    "or keep the worker on 127.0.0.1 and reach it through an SSH tunnel (see docs/multi-machine.md)."
)


def parse_listen(value: str) -> tuple[str, int]:
    """``ADDRESS[:PORT]`` -> (IPv4 address, port); llama.cpp's server binds IPv4 only."""
    host, sep, port_text = value.strip().rpartition(":")
    if not sep:
        host, port_text = value.strip(), str(RPC_PORT)
    if host == "localhost":
        host = "127.0.0.1"
    try:
        address = str(ipaddress.IPv4Address(host))
    except ValueError:
        raise OptionError(f"--host {value!r}: use an IPv4 ADDRESS:PORT such as 127.0.0.1:{RPC_PORT} "
                          f"or 0.0.0.0:{RPC_PORT} (llama.cpp's RPC server listens on IPv4 only)") from None
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise OptionError(f"--host {value!r}: the port must be a number from 1 to 65535")
    return address, int(port_text)


def _choose_devices(names: str | None) -> list[Any]:
    """The devices to offer: those named, else the GPUs, else the CPU (as rpc-server does)."""
    found = llama.devices()
    if names:
        by_name = {d.name.lower(): d for d in found}
        chosen = []
        for name in (n.strip() for n in names.split(",") if n.strip()):
            if name.lower() not in by_name:
                raise OptionError(f"--device {name!r}: no such device; this machine has {', '.join(d.name for d in found)}")
            chosen.append(by_name[name.lower()])
        return chosen
    return llama.gpu_devices() or [d for d in found if d.kind == llama.DEVICE_CPU][:1]


def _check_port(address: str, port: int) -> None:
    """Fail with one line now if the address cannot be bound (llama.cpp would
    only print 'Failed to create server socket' and return)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((address, port))
        except OSError as e:
            raise EmberError(f"cannot listen on {address}:{port}: {e.strerror or e}") from None


@app.command()
def worker(
    host: str = typer.Option(f"127.0.0.1:{RPC_PORT}", "--host", help="ADDRESS:PORT to listen on (IPv4). Default: this machine only."),
    threads: int = typer.Option(0, "--threads", "-t", help="CPU threads (0: the number of physical cores)."),
    cache: Path = typer.Option(None, "--cache", help="Keep large weights received in DIR, so the next load of the same model skips the network."),
    device: str = typer.Option(None, "--device", help="Devices to offer, comma-separated (default: the GPUs, else the CPU)."),
) -> None:
    """Lend this machine's CPU or GPUs to Ember on another machine (ember run/serve --rpc)."""
    address, port = parse_listen(host)
    endpoint = f"{address}:{port}"
    if threads < 0:
        raise OptionError(f"--threads must be 0 or more, got {threads}")
    devices = _choose_devices(device)
    if cache is not None:
        try:
            cache.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise EmberError(f"--cache {cache}: cannot create it: {e.strerror or e}") from None
    if not ipaddress.IPv4Address(address).is_loopback:
        where = f"port {port} of this machine" if address == "0.0.0.0" else endpoint
        err_console.print(f"[yellow]{SECURITY_WARNING.format(endpoint=where)}[/yellow]", highlight=False, soft_wrap=True)
    _check_port(address, port)

    server = threading.Thread(
        target=rpc.serve, args=(endpoint, devices, threads or llama.physical_cores(), cache), daemon=True, name="rpc-server"
    )
    server.start()
    signal.signal(signal.SIGTERM, _stop)
    try:
        _wait_ready(server, "127.0.0.1" if address == "0.0.0.0" else address, port)
        offered = ", ".join(f"{d.name} ({d.description}, {format_size(d.memory()[0])} free)" for d in devices)
        console.print(f"Ember worker listening on {endpoint}, offering {offered}. Ctrl+C stops it.", highlight=False, soft_wrap=True)
        while server.is_alive():
            server.join(0.5)
    except KeyboardInterrupt:
        _exit(0, "Worker stopped.")
    _exit(1, f"Error: llama.cpp's RPC server on {endpoint} stopped")


def _wait_ready(server: threading.Thread, address: str, port: int) -> None:
    """Until the server answers a handshake (it starts listening after setting up its devices)."""
    deadline = time.monotonic() + 60
    while server.is_alive():
        try:
            rpc.probe(f"{address}:{port}", timeout=2.0)
            return
        except WorkerError:
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
    _exit(1, f"Error: llama.cpp's RPC server did not start on {address}:{port}")


def _stop(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _exit(code: int, message: str) -> None:
    """End the process now: the server thread is blocked in C for good, and
    running C++ destructors under it at interpreter exit could crash."""
    print(message, file=sys.stderr if code else sys.stdout, flush=True)
    sys.stdout.flush()
    os._exit(code)
