"""Loaded models of a running server: load on first use (once, however many
requests ask at the same time), keep alive for a while after the last request,
evict idle models when memory is short or too many are loaded, reload when a
request needs different load options.

Every blocking step (resolving, loading, closing) runs in a worker thread, so
the event loop keeps serving other models' streams meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from ember import options as opts
from ember.errors import EmberError, EngineError, OptionError

log = logging.getLogger("ember.server")

DEFAULT_KEEP_ALIVE = 300.0


def resolve_name(name: str) -> Any:
    """ember.registry.resolve, with names no file system accepts (too long, NUL
    bytes) reported as an unknown model rather than an OS error."""
    from ember.registry import resolve

    from ember.errors import ModelNotFoundError

    try:
        return resolve(name)
    except (OSError, ValueError):
        raise ModelNotFoundError(f"model '{name[:200]}' not found") from None


class ServerBusyError(EmberError):
    """The model is busy and cannot be reloaded or evicted now; retry later."""

    status = 503


def _env_int(name: str, default: int, minimum: int = 1) -> int:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        return max(minimum, int(raw))
    except ValueError:
        raise OptionError(f"{name} must be an integer, got {raw!r}") from None


_DURATION = re.compile(r"(-?\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNIT = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_keep_alive(value: Any, where: str = "keep_alive") -> float:
    """Ollama's keep_alive: a Go duration ("5m", "1h30m", "-1s"), a number of
    seconds, or a numeric string. Negative means forever (``math.inf``)."""
    if value is None:
        return keep_alive_default()
    if isinstance(value, bool):
        raise OptionError(f"{where} must be a duration like \"5m\" or a number of seconds, got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            neg = text.startswith("-")
            body = text.lstrip("+-")
            parts = _DURATION.findall(body)
            if not body or "".join(n + u for n, u in parts) != body:
                raise OptionError(f"{where}: invalid duration {value!r}; use e.g. \"5m\", \"1h\", \"30s\", 0 or -1") from None
            seconds = sum(float(n) * _UNIT[u] for n, u in parts)
            if neg:
                seconds = -seconds
    else:
        raise OptionError(f"{where} must be a duration like \"5m\" or a number of seconds, got {value!r}")
    if math.isnan(seconds):
        raise OptionError(f"{where} must be a number, got NaN")
    return math.inf if seconds < 0 else seconds


def keep_alive_default() -> float:
    raw = os.environ.get("EMBER_KEEP_ALIVE")
    if not raw:
        return DEFAULT_KEEP_ALIVE
    return parse_keep_alive(raw, "EMBER_KEEP_ALIVE")


def check_options(options: Any) -> dict[str, Any]:
    """Ollama ``options`` from a request, checked by ember.options (names, types,
    and the ranges that keep llama.cpp's C integers sane)."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise OptionError("options must be an object of option names to values")
    if "rpc" in options:  # a client must not make the server connect to addresses it picks
        raise OptionError("options.rpc: RPC workers are the server's to choose (ember serve --rpc, EMBER_RPC, "
                          "or PARAMETER rpc in a Modelfile), not a request's")
    return opts.coerce_all(options)


@dataclass
class Entry:
    """One loaded (or loading) model."""

    key: str
    name: str
    load_options: dict[str, Any]
    model: Any = None  # ember.api.Model once loaded
    loading: asyncio.Future[None] | None = None
    refs: int = 0
    keep_alive: float = DEFAULT_KEEP_ALIVE
    expires_at: float = math.inf  # time.time() when an idle model unloads
    last_used: float = field(default_factory=time.monotonic)
    size: int = 0
    load_duration: int = 0
    unloading: bool = False

    def expires_iso(self) -> str:
        if math.isinf(self.expires_at):
            # Ollama shows a far-future time for "forever".
            return "2318-01-01T00:00:00Z"
        return datetime.fromtimestamp(self.expires_at, tz=timezone.utc).isoformat().replace("+00:00", "Z")


class ModelManager:
    """The server's loaded models (see the module doc)."""

    def __init__(
        self,
        *,
        num_parallel: int | None = None,
        max_queue: int | None = None,
        max_loaded: int | None = None,
    ) -> None:
        self.num_parallel = num_parallel or _env_int("EMBER_NUM_PARALLEL", 4)
        self.max_queue = max_queue or _env_int("EMBER_MAX_QUEUE", 512)
        self.max_loaded = max_loaded or _env_int("EMBER_MAX_LOADED_MODELS", 3)
        self._models: dict[str, Entry] = {}
        self._lock = asyncio.Lock()
        self._reaper: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[None]] = set()

    # --- lifecycle of the manager -----------------------------------------
    def start(self) -> None:
        if self._reaper is None:
            self._reaper = asyncio.get_running_loop().create_task(self._reap_loop())

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
            self._reaper = None
        async with self._lock:
            entries = list(self._models.values())
            self._models.clear()
        for e in entries:
            if e.model is not None:
                await asyncio.to_thread(e.model.close)
        for t in list(self._closing):
            with contextlib.suppress(Exception):
                await t

    async def _reap_loop(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            now = time.time()
            async with self._lock:
                for e in list(self._models.values()):
                    if e.model is not None and e.refs == 0 and e.expires_at <= now:
                        self._unload_locked(e)

    # --- use ----------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def use(self, name: str, options: dict[str, Any] | None = None, keep_alive: Any = None) -> AsyncIterator[Entry]:
        """Hold model ``name`` for one request (loading it if needed); on exit
        the keep_alive clock starts. ``options`` are checked request options."""
        ka = parse_keep_alive(keep_alive)
        entry = await self.acquire(name, options or {}, ka)
        try:
            yield entry
        finally:
            self.release(entry, ka)

    async def acquire(self, name: str, options: dict[str, Any], keep_alive: float) -> Entry:
        if not isinstance(name, str) or not name.strip():
            raise OptionError("model is required")
        resolved = await asyncio.to_thread(resolve_name, name)
        key = resolved.name
        wanted = {k: v for k, v in options.items() if k in opts.LOAD_OPTIONS}
        while True:
            async with self._lock:
                entry = self._models.get(key)
                if entry is not None and entry.loading is not None:
                    fut = entry.loading
                elif entry is not None and self._compatible(entry, wanted):
                    entry.refs += 1
                    entry.last_used = time.monotonic()
                    entry.keep_alive = keep_alive
                    entry.expires_at = math.inf
                    return entry
                else:
                    if entry is not None:  # loaded with other load options
                        if entry.refs:
                            raise ServerBusyError(
                                f"model {entry.name!r} is busy with other load options "
                                f"({', '.join(sorted(wanted))}); retry when its requests finish"
                            )
                        self._unload_locked(entry)
                    await self._make_room_locked(resolved.size)
                    entry = Entry(key=key, name=resolved.name, load_options=wanted, size=resolved.size)
                    entry.loading = asyncio.get_running_loop().create_future()
                    self._models[key] = entry
                    asyncio.get_running_loop().create_task(self._load(entry, name))
                    fut = entry.loading
            await asyncio.shield(fut)
            # loaded: loop again to take a reference (or reload if options differ)

    def release(self, entry: Entry, keep_alive: float) -> None:
        entry.refs = max(0, entry.refs - 1)
        entry.last_used = time.monotonic()
        entry.keep_alive = keep_alive
        entry.expires_at = math.inf if math.isinf(keep_alive) else time.time() + keep_alive

    def _compatible(self, entry: Entry, wanted: dict[str, Any]) -> bool:
        defaults = entry.model.defaults
        for k, v in wanted.items():
            if k == "num_ctx" and v == 0:
                continue
            if defaults.get(k) != v:
                return False
        return True

    async def _load(self, entry: Entry, ref: str) -> None:
        from ember.api import Model

        assert entry.loading is not None
        t0 = time.perf_counter()
        try:
            model = await asyncio.to_thread(
                Model, ref, num_parallel=self.num_parallel, max_queue=self.max_queue, **entry.load_options
            )
        except BaseException as e:  # noqa: BLE001 - handed to every waiter
            if isinstance(e, EngineError) and entry.load_options:
                e = OptionError(f"model {entry.name!r} could not be loaded with "
                                f"{', '.join(f'{k}={v}' for k, v in entry.load_options.items())}: {e}")
            elif not isinstance(e, EmberError):
                e = EngineError(f"loading {entry.name!r} failed: {e}")
            async with self._lock:
                if self._models.get(entry.key) is entry:
                    del self._models[entry.key]
            fut, entry.loading = entry.loading, None
            fut.set_exception(e)
            fut.exception()  # mark retrieved: waiters may all be gone
            return
        entry.model = model
        entry.load_duration = int((time.perf_counter() - t0) * 1e9)
        entry.size = model.info.size
        fut, entry.loading = entry.loading, None
        fut.set_result(None)

    async def _make_room_locked(self, size: int) -> None:
        """Unload idle models (least recently used first) until one more fits
        the loaded-model limit and the available memory."""
        import psutil  # type: ignore[import-untyped]

        def idle() -> list[Entry]:
            return sorted((e for e in self._models.values() if e.model is not None and e.refs == 0), key=lambda e: e.last_used)

        while len(self._models) >= self.max_loaded:
            candidates = idle()
            if not candidates:
                raise ServerBusyError(
                    f"{len(self._models)} models are loaded and busy (EMBER_MAX_LOADED_MODELS={self.max_loaded}); retry later"
                )
            await self._unload_now(candidates[0])
        while psutil.virtual_memory().available < size:
            candidates = idle()
            if not candidates:
                break  # nothing to free; let llama.cpp try (mmap pages on demand)
            await self._unload_now(candidates[0])

    async def _unload_now(self, entry: Entry) -> None:
        self._models.pop(entry.key, None)
        entry.unloading = True
        if entry.model is not None:
            await asyncio.to_thread(entry.model.close)

    def _unload_locked(self, entry: Entry) -> None:
        self._models.pop(entry.key, None)
        entry.unloading = True
        if entry.model is not None:
            task = asyncio.get_running_loop().create_task(asyncio.to_thread(entry.model.close))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    # --- control ------------------------------------------------------------
    async def unload(self, name: str) -> bool:
        """Unload ``name`` now when idle, else as soon as its requests finish.
        Returns False when it is not loaded."""
        try:
            key = (await asyncio.to_thread(resolve_name, name)).name
        except EmberError:
            key = name
        async with self._lock:
            entry = self._models.get(key)
            if entry is None:
                return False
            fut = entry.loading
            if fut is None:
                entry.keep_alive = 0
                entry.expires_at = time.time()
                if entry.refs == 0:
                    self._unload_locked(entry)
                return True
        with contextlib.suppress(Exception):
            await asyncio.shield(fut)
        return await self.unload(name)

    def entries(self) -> list[Entry]:
        return [e for e in self._models.values() if e.model is not None]

    def get(self, name: str) -> Entry | None:
        for e in self._models.values():
            if e.name == name and e.model is not None:
                return e
        return None
