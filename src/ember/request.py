"""The plain data of a generation: the request, the chunks streamed back, the
final result, and what a loaded model is.

Nothing here imports the engine, and everything converts to JSON and back
(``to_dict``/``from_dict``): the server sends these across the boundary of
its runner processes, and its routes use them without loading llama.cpp.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from ember.errors import EmberError, OptionError

MAX_TOP_LOGPROBS = 20  # alternatives per token at most (OpenAI's and Ollama's bound)


def _from_dict(cls: Any, data: Any, what: str) -> Any:
    if not isinstance(data, dict):
        raise OptionError(f"{what} must be an object")
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class GenerationRequest:
    """One completion (``prompt``) or chat turn (``messages``), with Ollama's
    fields: a generate request sets ``prompt``, a chat request ``messages``."""

    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    system: str | None = None  # generate: replaces the model's SYSTEM
    template: str | None = None  # generate: replaces the model's TEMPLATE
    suffix: str = ""
    raw: bool = False  # generate: the prompt as it is, no template
    context: list[int] | None = None  # generate: token ids of an earlier exchange, put before the prompt
    tools: list[dict[str, Any]] | None = None
    format: str | dict[str, Any] | None = None  # "json" or a JSON schema
    think: bool | str | None = None  # true/false or "low"/"medium"/"high"; None: on for models that think
    truncate: bool = False  # cut a prompt that does not fit num_ctx instead of refusing it
    images: list[Any] | None = None  # base64 (a server's clients); the library also takes paths, bytes, PIL images
    options: dict[str, Any] = field(default_factory=dict)  # Ollama's option names
    logprobs: bool = False  # each generated token's log probability (StreamChunk/Result.logprobs)
    top_logprobs: int = 0  # and this many most likely alternatives (0..MAX_TOP_LOGPROBS)

    @property
    def is_chat(self) -> bool:
        return self.messages is not None

    def logprobs_top(self) -> int | None:
        """How many alternatives to report per token; None: no logprobs."""
        top = self.top_logprobs
        if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_TOP_LOGPROBS:
            raise OptionError(f"top_logprobs must be an integer between 0 and {MAX_TOP_LOGPROBS}, got {top!r}")
        if not isinstance(self.logprobs, bool):
            raise OptionError(f"logprobs must be true or false, got {self.logprobs!r}")
        return top if self.logprobs else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> GenerationRequest:
        return _from_dict(cls, data, "request")  # type: ignore[no-any-return]


@dataclass
class Result:
    """A finished generation. ``message`` is set for chat, ``text`` always."""

    model: str
    text: str
    done_reason: str
    prompt_tokens: int = 0
    prompt_eval_count: int = 0
    prompt_eval_duration: int = 0  # ns
    eval_count: int = 0
    eval_duration: int = 0  # ns
    draft_count: int = 0  # tokens drafted for speculative decoding (num_draft)
    draft_accepted: int = 0  # drafted tokens the model accepted (each saved a decode step)
    load_duration: int = 0  # ns: loading the model for this request
    total_duration: int = 0  # ns, load included
    message: dict[str, Any] | None = None
    context: list[int] = field(default_factory=list)
    thinking: str = ""  # the reasoning, apart from ``text`` (also message["thinking"] for chat)
    # With logprobs asked for: one entry per generated token (assembled from the chunks by result()).
    logprobs: list[dict[str, Any]] | None = None

    @property
    def tool_calls(self) -> list[dict[str, Any]]:
        return list((self.message or {}).get("tool_calls") or [])

    def with_load_duration(self, ns: int) -> Result:
        """The same result when loading took ``ns`` (what a server measured)."""
        out = Result(**{f.name: getattr(self, f.name) for f in fields(self)})
        out.total_duration = self.total_duration - self.load_duration + ns
        out.load_duration = ns
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> Result:
        return _from_dict(cls, data, "result")  # type: ignore[no-any-return]


@dataclass
class StreamChunk:
    """One streamed piece of output; the last has ``done=True`` and ``result``.

    With ``tools`` each call comes in ``tool_calls`` as soon as it is complete
    (with ``id`` and ``function.index``); text that may start a call is held
    back until it is known to be text.
    """

    text: str = ""
    done: bool = False
    result: Result | None = None
    thinking: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    logprobs: list[dict[str, Any]] | None = None

    def to_dict(self) -> dict[str, Any]:
        """Only what is set: chunks cross the runner boundary once per token."""
        out: dict[str, Any] = {"text": self.text}
        if self.done:
            out["done"] = True
        if self.result is not None:
            out["result"] = self.result.to_dict()
        if self.thinking:
            out["thinking"] = self.thinking
        if self.tool_calls:
            out["tool_calls"] = self.tool_calls
        if self.logprobs is not None:
            out["logprobs"] = self.logprobs
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StreamChunk:
        chunk: StreamChunk = _from_dict(cls, data, "chunk")
        if chunk.result is not None:
            chunk.result = Result.from_dict(chunk.result)
        return chunk


def _no_result() -> EmberError:
    return EmberError("generation ended without a result")


class _Logprobs:
    """The logprob entries of a stream's chunks, gathered into its Result
    (each entry crosses the runner boundary once, in its chunk)."""

    def __init__(self) -> None:
        self.entries: list[dict[str, Any]] = []

    def add(self, c: StreamChunk) -> bool:
        """Take a chunk's entries; True at the last chunk (its result then has them all)."""
        if c.logprobs:
            self.entries.extend(c.logprobs)
        if not (c.done and c.result is not None):
            return False
        if c.logprobs is not None:
            c.result.logprobs = self.entries
        return True


class ChunkStream:
    """The chunks of one generation, in order. Iterate over it, or call
    :meth:`result` for the final :class:`Result`; :meth:`close` (or leaving a
    ``with`` block) stops the generation and frees its sequence."""

    def __init__(self, chunks: Iterator[StreamChunk], cancel: Callable[[], None]) -> None:
        self._chunks = chunks
        self._cancel = cancel

    def __iter__(self) -> ChunkStream:
        return self

    def __next__(self) -> StreamChunk:
        return next(self._chunks)

    def result(self) -> Result:
        """Read to the end; the final result."""
        entries = _Logprobs()
        try:
            for c in self._chunks:
                if entries.add(c):
                    return c.result  # type: ignore[return-value]
            raise _no_result()
        finally:
            self.close()

    def close(self) -> None:
        self._cancel()
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> ChunkStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncChunkStream:
    """The asynchronous form of :class:`ChunkStream`: ``async for``,
    ``await stream.result()``, ``await stream.aclose()``."""

    def __init__(self, chunks: AsyncIterator[StreamChunk], cancel: Callable[[], Awaitable[None] | None]) -> None:
        self._chunks = chunks
        self._cancel = cancel

    def __aiter__(self) -> AsyncChunkStream:
        return self

    async def __anext__(self) -> StreamChunk:
        return await self._chunks.__anext__()

    async def result(self) -> Result:
        """Read to the end; the final result."""
        entries = _Logprobs()
        try:
            async for c in self._chunks:
                if entries.add(c):
                    return c.result  # type: ignore[return-value]
            raise _no_result()
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        pending = self._cancel()
        if pending is not None:
            await pending
        aclose = getattr(self._chunks, "aclose", None)
        if aclose is not None:
            await aclose()

    async def __aenter__(self) -> AsyncChunkStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


# What a model without a chat template does with messages (a note for users).
FALLBACK_NOTE = "this model has no chat template: messages are sent as plain text for completion"


@dataclass
class ModelInfo:
    """What a loaded model is (``Model.info``)."""

    name: str
    architecture: str
    parameters: int
    quantization: str
    context_length: int  # training context
    num_ctx: int  # per-sequence context of this load
    num_parallel: int
    size: int
    paths: list[str]
    template: Literal["go", "jinja"] | None
    has_chat_template: bool
    # What the template can take, in Ollama's words: "tools", "insert", "thinking".
    capabilities: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> ModelInfo:
        return _from_dict(cls, data, "model info")  # type: ignore[no-any-return]
