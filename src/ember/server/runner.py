"""Runners: where the server's loaded models live.

Each model the server loads runs in its own runner process, as Ollama's do: a
model that aborts llama.cpp (a failed assert, a segfault, the OOM killer)
fails only the requests on that model, and unloading a model ends its process,
which gives all its memory back to the OS. The server process never loads a
llama.cpp model.

- :class:`LocalRunner` holds an :class:`ember.api.Model` in this process and
  does every blocking step (load, render, tokenize, embed) in worker threads.
  A runner process runs one; tests use one directly
  (``ModelManager(runner=LocalRunner)``) where a process adds nothing.
- :class:`ProcessRunner` starts ``python -m ember.server.runner FD`` and
  drives the LocalRunner in it over a socket.

The protocol: length-prefixed JSON frames (4-byte big-endian length), many
requests multiplexed on one connection by id. The server sends
``{"op": "load", "spec"}`` first, then ``{"id", "op", ...}`` with op one of
submit, render, embed, running, cancel, close. The runner answers
``{"id", "ok": value}`` or ``{"id", "error": {"type", "message", "status"}}``;
a submit is answered ``ok`` once its prompt is queued, then streams
``{"id", "chunk"}`` frames up to the chunk with ``done``. The runner exits when
its socket closes, so it never outlives the server.
"""

from __future__ import annotations

import abc
import asyncio
import collections
import json
import logging
import os
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from ember import errors, settings
from ember.errors import CancelledError, EmberError, RunnerError
from ember.models import resolved_from_dict, resolved_to_dict
from ember.registry.core import ResolvedModel
from ember.request import AsyncChunkStream, GenerationRequest, ModelInfo, StreamChunk

log = logging.getLogger("ember.runner")

MAX_FRAME = 1 << 30  # a protocol error, not a request: requests are capped far lower


@dataclass
class RunnerSpec:
    """What a runner loads, and how."""

    resolved: ResolvedModel
    num_parallel: int
    max_queue: int
    options: dict[str, Any]  # load options

    def to_dict(self) -> dict[str, Any]:
        return {"resolved": resolved_to_dict(self.resolved), "num_parallel": self.num_parallel,
                "max_queue": self.max_queue, "options": self.options}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunnerSpec:
        return cls(resolved_from_dict(d["resolved"]), int(d["num_parallel"]), int(d["max_queue"]), dict(d["options"]))


class Runner(abc.ABC):
    """A model loaded for the server (see the module doc)."""

    def __init__(self, spec: RunnerSpec) -> None:
        self.spec = spec
        self.name = spec.resolved.name
        self.info: ModelInfo | None = None
        self.defaults: dict[str, Any] = {}  # the model's options in effect (load options included)
        self.memory: dict[str, Any] = {}  # at load: the engine's MemoryReport.to_dict() (bytes by kind and device)
        self.load_duration = 0
        self.error: EmberError | None = None  # why the runner stopped by itself, once it has

    def describe(self) -> dict[str, Any]:
        return {"info": self.info.to_dict() if self.info else None, "defaults": self.defaults,
                "memory": self.memory, "load_duration": self.load_duration}

    def _described(self, d: dict[str, Any]) -> None:
        self.info = ModelInfo.from_dict(d["info"])
        self.defaults = dict(d["defaults"])
        self.memory = dict(d["memory"])
        self.load_duration = int(d["load_duration"])

    @abc.abstractmethod
    async def start(self) -> None:
        """Load the model; raises what the load raised."""

    @abc.abstractmethod
    async def submit(self, request: GenerationRequest) -> AsyncChunkStream:
        """Queue a generation (bad input raises here); its chunks stream back."""

    @abc.abstractmethod
    async def render(self, request: GenerationRequest) -> str:
        """The prompt text a request produces."""

    @abc.abstractmethod
    async def count_tokens(self, request: GenerationRequest) -> int:
        """How many tokens the prompt of a request has."""

    @abc.abstractmethod
    async def embed(self, inputs: list[Any], *, truncate: bool, normalize: bool) -> tuple[list[list[float]], int]:
        """Embeddings of texts (or token id lists) and the number of tokens read."""

    @abc.abstractmethod
    async def running(self) -> int:
        """Requests generating or queued."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Unload: free everything (the process ends)."""

    @abc.abstractmethod
    async def wait(self) -> EmberError | None:
        """Until the runner stops; why, when it stopped by itself (it died)."""


class LocalRunner(Runner):
    """The model in this process; blocking work runs in worker threads."""

    model: Any  # ember.api.Model

    def __init__(self, spec: RunnerSpec) -> None:
        super().__init__(spec)
        self._stopped = asyncio.Event()

    async def start(self) -> None:
        # lazy: the engine is imported where a model is loaded: the server
        # process itself, which only starts runners, never imports llama.cpp.
        from ember.api import Model

        s = self.spec
        self.model = await asyncio.to_thread(
            Model, s.resolved, num_parallel=s.num_parallel, max_queue=s.max_queue, **s.options
        )
        m = self.model
        self.info = m.info
        self.defaults = dict(m.defaults)
        self.memory = m.memory.to_dict()
        self.load_duration = m.load_duration

    async def submit(self, request: GenerationRequest) -> AsyncChunkStream:
        loop = asyncio.get_running_loop()
        queued = asyncio.ensure_future(asyncio.to_thread(self.model.submit, request, loop=loop))
        try:
            return await asyncio.shield(queued)
        except asyncio.CancelledError:  # the client left while the prompt was prepared: free its sequence
            queued.add_done_callback(lambda f: f.cancelled() or f.exception() or loop.create_task(f.result().aclose()))
            raise

    async def render(self, request: GenerationRequest) -> str:
        return str(await asyncio.to_thread(self.model.render, request))

    async def count_tokens(self, request: GenerationRequest) -> int:
        return int(await asyncio.to_thread(self.model.count_tokens, request))

    async def embed(self, inputs: list[Any], *, truncate: bool, normalize: bool) -> tuple[list[list[float]], int]:
        if not inputs:
            return [], 0
        return await asyncio.to_thread(self.model.embed_counted, inputs, truncate=truncate, normalize=normalize)

    async def running(self) -> int:
        return int(self.model.scheduler.active)

    async def close(self) -> None:
        await asyncio.to_thread(self.model.close)
        self._stopped.set()

    async def wait(self) -> EmberError | None:
        await self._stopped.wait()
        return None


# --- the protocol ---------------------------------------------------------------------
def encode_frame(obj: Any) -> bytes:
    data = json.dumps(obj, separators=(",", ":")).encode()
    return len(data).to_bytes(4, "big") + data


async def read_frame(reader: asyncio.StreamReader) -> Any:
    """The next frame, or None at the end of the stream."""
    try:
        head = await reader.readexactly(4)
    except asyncio.IncompleteReadError as e:
        if e.partial:
            raise
        return None
    n = int.from_bytes(head, "big")
    if n > MAX_FRAME:
        raise ValueError(f"runner frame of {n} bytes")
    return json.loads(await reader.readexactly(n))


def encode_error(e: BaseException) -> dict[str, Any]:
    if isinstance(e, EmberError):
        return {"type": type(e).__name__, "message": e.message, "status": e.status}
    return {"type": "EngineError", "message": f"internal error: {type(e).__name__}: {e}", "status": 500}


def decode_error(d: dict[str, Any]) -> EmberError:
    """The runner's error as the same EmberError class, with the same status."""
    cls = getattr(errors, str(d.get("type")), None)
    if not (isinstance(cls, type) and issubclass(cls, EmberError)):
        cls = EmberError
    e = cls(str(d.get("message")))
    e.status = int(d.get("status") or e.status)
    return e


def _raise_if_error(frame: Any) -> None:
    if isinstance(frame, BaseException):
        raise frame
    if "error" in frame:
        raise decode_error(frame["error"])


# --- the server's side ----------------------------------------------------------------------
class ProcessRunner(Runner):
    """The model in a runner process of its own (see the module doc)."""

    def __init__(self, spec: RunnerSpec) -> None:
        super().__init__(spec)
        self._pending: dict[int, asyncio.Future[Any] | asyncio.Queue[Any]] = {}
        self._next_id = 0
        self._stderr: collections.deque[str] = collections.deque(maxlen=40)
        self._closing = False
        self._stopped = asyncio.Event()

    async def start(self) -> None:
        env = dict(os.environ)
        if not settings.debug():
            env.setdefault("GGML_NO_BACKTRACE", "1")  # an abort's message is the last line, not a gdb backtrace
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        try:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "ember.server.runner", str(theirs.fileno()), pass_fds=(theirs.fileno(),),
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
                env=env,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._stderr_task = loop.create_task(self._read_stderr())
        try:
            self._reader, self._writer = await asyncio.open_unix_connection(sock=ours)
            self._send({"op": "load", "spec": self.spec.to_dict()})
            hello = await read_frame(self._reader)
            if hello is None:
                raise await self._death()
            _raise_if_error(hello)
            self._described(hello["ok"])
        except BaseException:
            self._closing = True
            if self.proc.returncode is None:
                self.proc.kill()
            await self.proc.wait()
            ours.close()
            self._stopped.set()
            raise
        self._frames_task = loop.create_task(self._read_frames())

    async def submit(self, request: GenerationRequest) -> AsyncChunkStream:
        rid, queue = self._open(asyncio.Queue())
        self._send({"id": rid, "op": "submit", "request": request.to_dict()})
        try:
            first = await queue.get()
        except BaseException:
            self._cancel(rid)
            raise
        if isinstance(first, BaseException) or "error" in first:
            self._pending.pop(rid, None)
            _raise_if_error(first)
        return AsyncChunkStream(self._chunks(rid, queue), lambda: self._cancel(rid))

    async def _chunks(self, rid: int, queue: asyncio.Queue[Any]) -> AsyncIterator[StreamChunk]:
        while True:
            frame = await queue.get()
            _raise_if_error(frame)
            chunk = StreamChunk.from_dict(frame["chunk"])
            if chunk.done:
                self._pending.pop(rid, None)
            yield chunk
            if chunk.done:
                return

    def _cancel(self, rid: int) -> None:
        if self._pending.pop(rid, None) is not None and self.error is None:
            self._send({"id": rid, "op": "cancel"})

    async def render(self, request: GenerationRequest) -> str:
        return str(await self._call("render", request=request.to_dict()))

    async def count_tokens(self, request: GenerationRequest) -> int:
        return int(await self._call("count_tokens", request=request.to_dict()))

    async def embed(self, inputs: list[Any], *, truncate: bool, normalize: bool) -> tuple[list[list[float]], int]:
        vecs, n = await self._call("embed", inputs=inputs, truncate=truncate, normalize=normalize)
        return vecs, int(n)

    async def running(self) -> int:
        return int(await self._call("running"))

    async def close(self) -> None:
        self._closing = True
        if self.error is None and self.proc.returncode is None:
            self._send({"op": "close"})
        await self._end_process()

    async def wait(self) -> EmberError | None:
        await self._stopped.wait()
        return None if self._closing else self.error

    # --- plumbing ---------------------------------------------------------------
    def _open(self, target: Any) -> tuple[int, Any]:
        if self.error is not None:
            raise type(self.error)(self.error.message)
        self._next_id += 1
        self._pending[self._next_id] = target
        return self._next_id, target

    def _send(self, obj: dict[str, Any]) -> None:
        if not self._writer.is_closing():
            self._writer.write(encode_frame(obj))

    async def _call(self, op: str, **args: Any) -> Any:
        rid, fut = self._open(asyncio.get_running_loop().create_future())
        self._send({"id": rid, "op": op, **args})
        try:
            frame = await fut
        finally:
            self._pending.pop(rid, None)
        _raise_if_error(frame)
        return frame["ok"]

    async def _read_frames(self) -> None:
        try:
            while (frame := await read_frame(self._reader)) is not None:
                target = self._pending.get(frame.get("id"))
                if isinstance(target, asyncio.Queue):
                    target.put_nowait(frame)
                elif target is not None and not target.done():
                    target.set_result(frame)
        except (OSError, ValueError, asyncio.IncompleteReadError):
            pass  # the runner died mid-frame
        if self._closing:
            error: EmberError = CancelledError(f"model {self.name!r} was unloaded")
        else:
            error = await self._death()
            log.warning("%s", error.message)
        self.error = error
        for target in self._pending.values():
            failure = type(error)(error.message)
            if isinstance(target, asyncio.Queue):
                target.put_nowait(failure)
            elif not target.done():
                target.set_exception(failure)
        self._pending.clear()
        self._writer.close()
        self._stopped.set()

    async def _death(self) -> EmberError:
        """Why the runner process ended, naming the model and its last words."""
        rc = await self.proc.wait()
        try:  # the rest of its stderr
            await asyncio.wait_for(asyncio.shield(self._stderr_task), 2)
        except TimeoutError:
            pass
        if rc < 0:
            try:
                how = f"was killed by {signal.Signals(-rc).name}"
            except ValueError:
                how = f"was killed by signal {-rc}"
        else:
            how = f"exited with status {rc}"
        words = _last_words(list(self._stderr))
        return RunnerError(f"model {self.name!r} stopped: its runner process {how}" + (f": {words}" if words else ""))

    async def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        rest = b""
        while data := await self.proc.stderr.read(65536):
            *lines, rest = (rest + data).split(b"\n")
            rest = rest[-65536:]
            for line in lines:
                self._note(line)
        self._note(rest)

    def _note(self, line: bytes) -> None:
        text = line.decode("utf-8", "replace").rstrip()
        if text:
            self._stderr.append(text[:1000])
            log.info("runner %s: %s", self.name, text)

    async def _end_process(self) -> None:
        try:
            await asyncio.wait_for(self.proc.wait(), 10)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
        await self._frames_task  # fails what is still pending, then sets _stopped


def _last_words(lines: list[str]) -> str:
    """The line of a runner's stderr that says what went wrong (a GGML_ASSERT,
    a Python error), else its last line."""
    picked = next((ln for ln in reversed(lines) if "GGML_ASSERT" in ln or "error" in ln.lower()), lines[-1] if lines else "")
    return re.sub(r"^/\S*/([^/\s]+:\d+:)", r"\1", picked)[:300]  # llama.cpp's build folder says nothing


# --- the runner process -------------------------------------------------------------------------
async def _serve(sock: socket.socket) -> None:
    reader, writer = await asyncio.open_unix_connection(sock=sock)

    def send(obj: dict[str, Any]) -> None:
        writer.write(encode_frame(obj))

    hello = await read_frame(reader)
    if hello is None:
        return
    runner = LocalRunner(RunnerSpec.from_dict(hello["spec"]))
    try:
        await runner.start()
    except Exception as e:  # noqa: BLE001 - reported to the server
        send({"id": 0, "error": encode_error(e)})
        await writer.drain()
        return
    send({"id": 0, "ok": runner.describe()})
    tasks: dict[int, asyncio.Task[None]] = {}

    async def answer(rid: int, frame: dict[str, Any]) -> None:
        op = frame.get("op")
        try:
            if op == "submit":
                stream = await runner.submit(GenerationRequest.from_dict(frame["request"]))
                send({"id": rid, "ok": True})
                async with stream:  # cancelled task: the stream's sequence is freed
                    async for chunk in stream:
                        send({"id": rid, "chunk": chunk.to_dict()})
                        await writer.drain()
                return
            if op == "render":
                value: Any = await runner.render(GenerationRequest.from_dict(frame["request"]))
            elif op == "count_tokens":
                value = await runner.count_tokens(GenerationRequest.from_dict(frame["request"]))
            elif op == "embed":
                value = await runner.embed(frame["inputs"], truncate=bool(frame["truncate"]), normalize=bool(frame["normalize"]))
            elif op == "running":
                value = await runner.running()
            else:
                raise EmberError(f"unknown runner operation {op!r}")
            send({"id": rid, "ok": value})
        except Exception as e:  # noqa: BLE001 - every error goes back to the request that caused it
            send({"id": rid, "error": encode_error(e)})
        finally:
            tasks.pop(rid, None)

    while (frame := await read_frame(reader)) is not None and frame.get("op") != "close":
        rid = int(frame.get("id") or 0)
        if frame.get("op") == "cancel":
            if rid in tasks:
                tasks[rid].cancel()
        else:
            tasks[rid] = asyncio.get_running_loop().create_task(answer(rid, frame))
    for t in list(tasks.values()):
        t.cancel()
    try:
        await asyncio.wait_for(runner.close(), 10)
    except (TimeoutError, Exception):  # noqa: BLE001 - the process ends either way
        pass


def main(argv: list[str] | None = None) -> None:
    """``python -m ember.server.runner FD``: serve one model on the socket FD."""
    fd = int((sys.argv[1:] if argv is None else argv)[0])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C is the server's; the runner ends with its socket
    try:
        asyncio.run(_serve(socket.socket(fileno=fd)))
    finally:
        sys.stderr.flush()
        os._exit(0)  # never wait for a worker thread still inside llama.cpp


if __name__ == "__main__":
    main()
