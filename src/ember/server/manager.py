"""Loaded models of a running server: load on first use (once, however many
requests ask at the same time), keep alive for a while after the last request,
evict idle models when memory is short or too many are loaded, reload when a
request needs different load options, forget a model whose runner died (the
next request loads it again).

Each model lives in a runner (``server/runner.py``): by default a process of
its own; ``ModelManager(runner=...)`` swaps in another kind. Every blocking
step (resolving, loading, closing) runs off the event loop, so it keeps
serving other models' streams meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import psutil  # type: ignore[import-untyped]

from ember import options as opts
from ember import settings
from ember.errors import EmberError, EngineError, ModelNotFoundError, OptionError
from ember.models import model_key, resolve_model
from ember.registry.core import ResolvedModel
from ember.server.runner import ProcessRunner, Runner, RunnerSpec

log = logging.getLogger("ember.server")

FOREVER_ISO = "2318-01-01T00:00:00Z"  # Ollama shows this far-future time for "forever"

# Options a request may give that never reload (or key) a loaded model: with
# batch_invariant one client would otherwise make the model run one sequence
# at a time for everyone after it. It is the request's own (the scheduler's).
NEVER_RELOADS = frozenset({"batch_invariant"})


class ServerBusyError(EmberError):
    """The model is busy and cannot be reloaded or evicted now; retry later."""

    status = 503


def parse_keep_alive(value: Any, where: str = "keep_alive") -> float:
    """A request's keep_alive in seconds (``math.inf``: forever); unset is EMBER_KEEP_ALIVE's."""
    return settings.keep_alive() if value is None else opts.parse_duration(value, where)


def check_options(options: Any) -> dict[str, Any]:
    """Ollama ``options`` from a request, checked by ember.options (names, types,
    and the ranges that keep llama.cpp's C integers sane)."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise OptionError("options must be an object of option names to values")
    if options.get("rpc") is not None:  # a client must not make the server connect to addresses it picks
        raise OptionError("options.rpc: RPC workers are the server's to choose (ember serve --rpc, EMBER_RPC, "
                          "or PARAMETER rpc in a Modelfile), not a request's")
    return opts.coerce_request(options)


@dataclass
class Entry:
    """One loaded (or loading) model."""

    key: str  # the identity of what is loaded (ember.models.model_key)
    resolved: ResolvedModel
    load_options: dict[str, Any]
    runner: Runner | None = None  # once loaded
    loading: asyncio.Future[None] | None = None
    refs: int = 0
    keep_alive: float = settings.DEFAULT_KEEP_ALIVE
    expires_at: float = math.inf  # time.time() when an idle model unloads
    last_used: float = field(default_factory=time.monotonic)
    size: int = 0
    load_duration: int = 0

    @property
    def name(self) -> str:
        return self.resolved.name

    def expires_iso(self) -> str:
        try:
            return datetime.fromtimestamp(self.expires_at, tz=UTC).isoformat().replace("+00:00", "Z")
        except (OverflowError, ValueError, OSError):  # forever (or past what a date holds)
            return FOREVER_ISO


class ModelManager:
    """The server's loaded models (see the module doc).

    ``runner`` makes the runner of a model (default: a process each);
    Remote clients name registry models only, never paths on the server;
    ``allow_paths=True`` is for a manager serving a trusted caller.
    """

    def __init__(
        self,
        *,
        num_parallel: int | None = None,
        max_queue: int | None = None,
        max_loaded: int | None = None,
        runner: Callable[[RunnerSpec], Runner] = ProcessRunner,
        allow_paths: bool = False,
    ) -> None:
        self.num_parallel = num_parallel or settings.num_parallel()
        self.max_queue = max_queue or settings.max_queue()
        self.max_loaded = max_loaded or settings.max_loaded_models()
        settings.keep_alive()  # a malformed EMBER_KEEP_ALIVE fails at start, not at the first request
        self.runner = runner
        self.allow_paths = allow_paths
        self._models: dict[str, Entry] = {}
        self._lock = asyncio.Lock()
        self._reaper: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # closing runners, watching runners

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
        await asyncio.gather(*(e.runner.close() for e in entries if e.runner is not None), return_exceptions=True)
        for t in list(self._tasks):
            t.cancel()
            with contextlib.suppress(BaseException):
                await t

    async def _reap_loop(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            now = time.time()
            async with self._lock:
                for e in list(self._models.values()):
                    if e.runner is not None and e.refs == 0 and e.expires_at <= now:
                        self._unload_locked(e)

    def _background(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- use ----------------------------------------------------------------
    async def resolve(self, name: str) -> ResolvedModel:
        """What ``name`` loads on this server (off the event loop)."""
        if not isinstance(name, str):
            raise OptionError("model must be a string")
        try:
            return await asyncio.to_thread(resolve_model, name, allow_paths=self.allow_paths)
        except ModelNotFoundError:  # Ollama's words: its clients match them
            raise ModelNotFoundError(f"model '{name[:200]}' not found") from None

    async def _draft_file(self, draft: str) -> str:
        """The file of a ``draft`` model (a request's option or a Modelfile's
        PARAMETER), resolved as model names are: no server path over HTTP."""
        try:
            resolved = await asyncio.to_thread(resolve_model, draft, allow_paths=self.allow_paths)
        except EmberError as e:  # not found, or not a model name
            raise OptionError(f"draft: {e}") from None
        return str(resolved.model_paths[0])

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
        resolved = await self.resolve(name)
        key = model_key(resolved)
        wanted = {k: v for k, v in options.items() if k in opts.LOAD_OPTIONS and k not in NEVER_RELOADS}
        draft = wanted.get("draft", resolved.parameters.get("draft"))
        if draft:
            wanted["draft"] = await self._draft_file(draft)
        while True:
            async with self._lock:
                entry = self._models.get(key)
                if entry is not None and entry.runner is not None and entry.runner.error is not None:
                    del self._models[key]  # its runner died: load it again
                    entry = None
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
                    entry = Entry(key=key, resolved=resolved, load_options=wanted, size=resolved.size)
                    entry.loading = asyncio.get_running_loop().create_future()
                    self._models[key] = entry
                    self._background(self._load(entry))
                    fut = entry.loading
            await asyncio.shield(fut)
            # loaded: loop again to take a reference (or reload if options differ)

    def release(self, entry: Entry, keep_alive: float) -> None:
        entry.refs = max(0, entry.refs - 1)
        entry.last_used = time.monotonic()
        entry.keep_alive = keep_alive
        entry.expires_at = math.inf if math.isinf(keep_alive) else time.time() + keep_alive

    def _compatible(self, entry: Entry, wanted: dict[str, Any]) -> bool:
        assert entry.runner is not None
        defaults = entry.runner.defaults
        for k, v in wanted.items():
            if k == "num_ctx" and v == 0:
                continue
            if defaults.get(k) != v:
                return False
        return True

    async def _load(self, entry: Entry) -> None:
        assert entry.loading is not None
        t0 = time.perf_counter()
        runner = self.runner(RunnerSpec(entry.resolved, self.num_parallel, self.max_queue, entry.load_options))
        try:
            await runner.start()
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
        entry.runner = runner
        entry.load_duration = int((time.perf_counter() - t0) * 1e9)
        entry.size = runner.info.size if runner.info else entry.size
        fut, entry.loading = entry.loading, None
        fut.set_result(None)
        self._background(self._forget_when_stopped(entry))

    async def _forget_when_stopped(self, entry: Entry) -> None:
        """A runner that dies leaves the loaded models (and /api/ps) at once."""
        assert entry.runner is not None
        await entry.runner.wait()
        async with self._lock:
            if self._models.get(entry.key) is entry:
                del self._models[entry.key]

    async def _make_room_locked(self, size: int) -> None:
        """Unload idle models (least recently used first) until one more fits
        the loaded-model limit and the available memory."""

        def idle() -> list[Entry]:
            return sorted((e for e in self._models.values() if e.runner is not None and e.refs == 0), key=lambda e: e.last_used)

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
        if entry.runner is not None:
            await entry.runner.close()

    def _unload_locked(self, entry: Entry) -> None:
        self._models.pop(entry.key, None)
        if entry.runner is not None:
            self._background(entry.runner.close())

    # --- control ------------------------------------------------------------
    async def unload(self, name: str) -> bool:
        """Unload ``name`` now when idle, else as soon as its requests finish.
        Returns False when it is not loaded."""
        key = model_key(await self.resolve(name))
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
        """The loaded models (not those still loading)."""
        return [e for e in self._models.values() if e.runner is not None]
