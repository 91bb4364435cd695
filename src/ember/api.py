"""The library layer: a loaded model with generate, chat, embed and tokenize.

The CLI, the server's runners and user code all go through :class:`Model`, so
a prompt is rendered, an option is merged and a result is shaped the same way
whoever asks. Every generation is one :class:`GenerationRequest` passed to
:meth:`Model.submit`; ``generate``, ``chat``, ``agenerate`` and ``achat`` are
thin wrappers that build one.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any, overload

from ember import options as opts
from ember.engine import Context, LoadedModel, MemoryReport
from ember.engine.scheduler import Chunk, Handle, Scheduler
from ember.errors import ContextOverflowError, OptionError, TemplateError
from ember.models import resolve_model
from ember.progress import ProgressCallback
from ember.registry import ResolvedModel
from ember.request import (
    FALLBACK_NOTE,
    AsyncChunkStream,
    ChunkStream,
    GenerationRequest,
    ModelInfo,
    Result,
    StreamChunk,
)
from ember.templates import ChatTemplate
from ember.templates.tools import split_tool_calls

__all__ = ["FALLBACK_NOTE", "GenerationRequest", "Model", "ModelInfo", "Result", "StreamChunk"]

_REQUEST_FIELDS = {f.name for f in fields(GenerationRequest)} - {"options"}


def _grammar_for(format: str | dict[str, Any] | None) -> str | None:
    """GBNF for Ollama's ``format`` ("json" or a JSON schema)."""
    if format is None or format == "":
        return None
    from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

    if format == "json":
        return str(JSON_GBNF)
    if isinstance(format, dict):
        try:
            return str(json_schema_to_gbnf(json.dumps(format)))
        except Exception as e:  # noqa: BLE001 - the converter raises plain exceptions
            raise OptionError(f"format: unsupported JSON schema ({e})") from None
    raise OptionError(f"format must be \"json\" or a JSON schema object, got {format!r}")


def _request(kwargs: dict[str, Any], **what: Any) -> GenerationRequest:
    """A request from a wrapper's keywords: request fields by name (system,
    format, truncate, ...), everything else an Ollama option."""
    if "messages" in what and not isinstance(what["messages"], list):
        raise OptionError("messages must be a list of {role, content} objects")
    options = dict(kwargs.pop("options", None) or {})
    given = {k: kwargs.pop(k) for k in list(kwargs) if k in _REQUEST_FIELDS}
    options.update(kwargs)
    return GenerationRequest(**what, **given, options=options)


class Model:
    """A model loaded for generation. Use as a context manager, or call close().

    Thread-safe: requests from any number of threads (or asyncio tasks) are
    scheduled together on ``num_parallel`` sequences; each gets its own output.
    """

    def __init__(
        self,
        model: str | Path | ResolvedModel,
        *,
        num_parallel: int = 1,
        max_queue: int = 512,
        lora: Sequence[tuple[str | os.PathLike[str], float]] | None = None,
        progress: ProgressCallback | None = None,
        **options: Any,
    ) -> None:
        t0 = time.perf_counter()
        self.resolved = model if isinstance(model, ResolvedModel) else resolve_model(model, convert=True, progress=progress)
        self.name = self.resolved.name
        self.defaults = opts.merged(self.resolved.parameters, opts.coerce_all(options))
        load_opts = {k: v for k, v in self.defaults.items() if k in opts.LOAD_OPTIONS}
        adapters: list[tuple[str | os.PathLike[str], float]] = [(p, 1.0) for p in self.resolved.adapter_paths]
        self.engine = LoadedModel(self.resolved.model_paths, load_opts, lora=adapters + list(lora or []))
        try:
            num_ctx = self.defaults["num_ctx"] or self.engine.default_num_ctx()
            self.defaults["num_ctx"] = num_ctx
            self.scheduler = Scheduler(
                self.engine, num_ctx=num_ctx, num_parallel=max(1, num_parallel), max_queue=max_queue, options=load_opts
            )
            self.template = self._load_template()
        except BaseException:
            self.engine.close()
            raise
        self.load_duration = int((time.perf_counter() - t0) * 1e9)
        self._load_unreported = True  # the first result reports the load, as Ollama's first request does
        self._max_token_bytes = 0
        self._embed_ctx: Context | None = None
        self._embed_lock = threading.Lock()
        self.closed = False

    # --- lifecycle -------------------------------------------------------
    def close(self) -> None:
        """Free the weights, the KV cache and the scheduler thread."""
        if self.closed:
            return
        self.closed = True
        self.scheduler.close()
        if self._embed_ctx is not None:
            self._embed_ctx.close()
        self.engine.close()

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- description -----------------------------------------------------
    @property
    def info(self) -> ModelInfo:
        e = self.engine
        return ModelInfo(
            name=self.name,
            architecture=e.architecture,
            parameters=e.n_params,
            quantization=_file_type(e),
            context_length=e.n_ctx_train,
            num_ctx=self.scheduler.num_ctx,
            num_parallel=self.scheduler.num_parallel,
            size=sum(p.stat().st_size for p in e.paths),
            paths=[str(p) for p in e.paths],
            template=self.template.kind if self.template else None,
            has_chat_template=self.template is not None,
        )

    @property
    def memory(self) -> MemoryReport:
        return self.scheduler.memory_report()

    @property
    def system(self) -> str | None:
        return self.resolved.system

    def _load_template(self) -> ChatTemplate | None:
        text = self.resolved.template or self.engine.chat_template
        if not text:
            return None
        try:
            return ChatTemplate.parse(text)
        except TemplateError as e:
            where = "TEMPLATE" if self.resolved.template else "the GGUF's chat template"
            raise TemplateError(f"{self.name}: {where} does not parse: {e}") from None

    # --- tokens ----------------------------------------------------------
    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        return self.engine.tokenize(text, add_special, parse_special)

    def detokenize(self, tokens: list[int]) -> str:
        return self.engine.detokenize(tokens)

    def _checked_ids(self, tokens: Sequence[Any], where: str) -> list[int]:
        n_vocab = self.engine.n_vocab
        for t in tokens:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < n_vocab:
                raise OptionError(f"{where}: token id {t!r} is out of range (vocabulary size {n_vocab})")
        return list(tokens)

    # --- prompts ---------------------------------------------------------
    def render(self, request: GenerationRequest) -> str:
        """The exact prompt text of a request (what llama.cpp sees)."""
        if request.images:
            raise OptionError("images are not supported by this model (no vision projector loaded)")
        if request.is_chat:
            text = self.render_chat(request.messages or [], tools=request.tools)
        else:
            text = self.render_generate(
                request.prompt or "", system=request.system, template=request.template, suffix=request.suffix,
                raw=request.raw,
            )
        if request.context:
            text = self.detokenize(self._checked_ids(request.context, "context")) + text
        return text

    def render_chat(self, messages: list[dict[str, Any]], *, tools: list[dict[str, Any]] | None = None) -> str:
        """The prompt text of a conversation."""
        msgs = _normalize_messages(messages)
        msgs = list(self.resolved.messages) + msgs
        if self.resolved.system and not any(m["role"] == "system" for m in msgs):
            msgs.insert(0, {"role": "system", "content": self.resolved.system})
        if self.template is None:
            return "\n\n".join(str(m.get("content") or "") for m in msgs if m.get("content"))
        bos = self.engine.token_text(self.engine.bos_id) if self.engine.bos_id >= 0 else ""
        eos = self.engine.token_text(self.engine.eos_id) if self.engine.eos_id >= 0 else ""
        return str(self.template.render_messages(msgs, tools=tools or None, bos_token=bos, eos_token=eos))

    def render_generate(
        self, prompt: str, *, system: str | None = None, template: str | None = None, suffix: str = "", raw: bool = False
    ) -> str:
        """The prompt text of an Ollama-style generate request."""
        if raw:
            return prompt
        tmpl = ChatTemplate.parse(template) if template else self.template
        sys_text = self.resolved.system if system is None else system
        if tmpl is None:
            return f"{sys_text}\n\n{prompt}" if sys_text else prompt
        return str(tmpl.render_prompt(prompt, system=sys_text or "", suffix=suffix))

    def _tokens_for(self, text: str, truncate: bool, num_keep: int) -> list[int]:
        num_ctx = self.scheduler.num_ctx
        limit = num_ctx - 1
        overflow = (
            f"the context holds {num_ctx} tokens (num_ctx); shorten the prompt, raise num_ctx, or ask for truncation"
        )
        n_bytes = len(text.encode("utf-8", "surrogatepass"))
        # Every token stands for at most the longest token's bytes: a prompt with
        # more bytes than the context can hold is refused without tokenizing it.
        if not truncate and n_bytes > limit and n_bytes > (limit + 2) * self._longest_token_bytes():
            raise ContextOverflowError(f"the prompt has {n_bytes} bytes, more than {num_ctx} tokens can hold; {overflow}")
        # Templates that start with the BOS text already carry it; don't add a second one.
        bos = self.engine.token_text(self.engine.bos_id) if self.engine.bos_id >= 0 else ""
        add_special = not (bos and text.startswith(bos))
        tokens = self.engine.tokenize(text, add_special, True)
        if len(tokens) > limit:
            if not truncate:
                raise ContextOverflowError(f"the prompt has {len(tokens)} tokens but {overflow}")
            keep = min(max(num_keep, 0), limit // 2)
            tokens = tokens[:keep] + tokens[len(tokens) - (limit - keep) :]
        return tokens

    def _longest_token_bytes(self) -> int:
        """An upper bound of any token's length in bytes (its vocabulary text)."""
        if not self._max_token_bytes:
            e = self.engine
            self._max_token_bytes = max((len(e.token_text(t).encode()) for t in range(e.n_vocab)), default=1) or 1
        return self._max_token_bytes

    def _request_options(self, options: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(options, dict):
            raise OptionError("options must be an object of option names to values")
        given = opts.coerce_all(options)
        changed = [k for k in given if k in opts.LOAD_OPTIONS and given[k] != self.defaults.get(k)]
        changed = [k for k in changed if not (k == "num_ctx" and given[k] == 0)]
        if changed:
            raise OptionError(
                f"option {changed[0]!r} changes how the model is loaded; load the model again with it "
                "(the server reloads automatically)"
            )
        merged = dict(self.defaults)
        for k, v in given.items():
            if k == "stop":
                merged["stop"] = list(v)
            elif k not in opts.LOAD_OPTIONS:
                merged[k] = v
        return merged

    # --- generation ------------------------------------------------------
    @overload
    def submit(self, request: GenerationRequest, *, loop: None = None) -> ChunkStream: ...

    @overload
    def submit(self, request: GenerationRequest, *, loop: asyncio.AbstractEventLoop) -> AsyncChunkStream: ...

    def submit(
        self, request: GenerationRequest, *, loop: asyncio.AbstractEventLoop | None = None
    ) -> ChunkStream | AsyncChunkStream:
        """Render, tokenize, check and queue ``request``. Bad input raises here,
        before anything is queued. The chunks stream back in order, to an async
        iterator on ``loop`` when one is given (call from that loop's thread or
        a worker thread)."""
        t0 = time.perf_counter()
        options = self._request_options(request.options)
        tokens = self._tokens_for(self.render(request), request.truncate, options["num_keep"])
        handle = self.scheduler.submit(tokens, options, grammar=_grammar_for(request.format), loop=loop)
        shaper = _Shaper(self, request, tokens, t0)
        if loop is None:
            return ChunkStream(shaper.chunks(handle), handle.cancel)
        return AsyncChunkStream(shaper.achunks(handle), handle.cancel)

    def generate(self, prompt: str = "", *, stream: bool = False, **kwargs: Any) -> Result | ChunkStream:
        """Complete ``prompt`` (rendered with the model's template unless ``raw=True``).

        Keywords are :class:`GenerationRequest` fields (``system``, ``template``,
        ``suffix``, ``raw``, ``context``, ``format``, ``truncate``, ``options``)
        or Ollama's options, e.g. ``model.generate("Hi", temperature=0,
        num_predict=50)``. With ``stream=True`` a :class:`ChunkStream`.
        """
        chunks = self.submit(_request(kwargs, prompt=prompt))
        return chunks if stream else chunks.result()

    def chat(self, messages: list[dict[str, Any]], *, stream: bool = False, **kwargs: Any) -> Result | ChunkStream:
        """Answer a conversation (``[{"role": "user", "content": "..."}]``);
        keywords as for :meth:`generate`, plus ``tools``.

        The result's ``message`` is ``{"role": "assistant", "content": ...}``
        with ``tool_calls`` when the model called one of ``tools``.
        """
        chunks = self.submit(_request(kwargs, messages=messages))
        return chunks if stream else chunks.result()

    async def agenerate(self, prompt: str = "", *, stream: bool = False, **kwargs: Any) -> Result | AsyncChunkStream:
        """Async :meth:`generate`: a Result, or an :class:`AsyncChunkStream` when ``stream``."""
        chunks = self.submit(_request(kwargs, prompt=prompt), loop=asyncio.get_running_loop())
        return chunks if stream else await chunks.result()

    async def achat(self, messages: list[dict[str, Any]], *, stream: bool = False, **kwargs: Any) -> Result | AsyncChunkStream:
        """Async :meth:`chat`: a Result, or an :class:`AsyncChunkStream` when ``stream``."""
        chunks = self.submit(_request(kwargs, messages=messages), loop=asyncio.get_running_loop())
        return chunks if stream else await chunks.result()

    def _take_load_duration(self) -> int:
        if not self._load_unreported:
            return 0
        self._load_unreported = False
        return self.load_duration

    # --- embeddings ------------------------------------------------------
    def embed(
        self, texts: str | Sequence[str | Sequence[int]], *, truncate: bool = True, normalize: bool = True
    ) -> list[list[float]]:
        """Mean-pooled (and L2-normalized, as Ollama's /api/embed) embeddings of
        texts, or of token id lists taken as they are."""
        import numpy as np

        items = [texts] if isinstance(texts, str) else list(texts)
        inputs = [
            self.engine.tokenize(x, True, False) if isinstance(x, str) else self._checked_ids(x, "input")
            for x in items
        ]
        out: list[list[float]] = []
        with self._embed_lock:
            if self._embed_ctx is None:
                self._embed_ctx = self.engine.new_context(self.scheduler.num_ctx, embeddings=True)
            ctx = self._embed_ctx
            for tokens in inputs:
                tokens = tokens or [self.engine.bos_id]
                if len(tokens) > ctx.n_batch:
                    if not truncate:
                        raise ContextOverflowError(f"input has {len(tokens)} tokens, more than the {ctx.n_batch} an embedding batch holds")
                    tokens = tokens[: ctx.n_batch]
                ctx.clear()
                ctx.decode([(t, i, 0, True) for i, t in enumerate(tokens)])
                vec = ctx.sequence_embedding(0)
                if normalize:
                    n = float(np.linalg.norm(vec))
                    vec = vec / n if n > 0 else vec
                out.append([float(x) for x in vec])
        return out


class _Shaper:
    """The scheduler's chunks of one request as StreamChunks, the last one
    carrying the Result (and, for a chat with tools, the parsed tool calls:
    their text is held back, since a call is known only at the end)."""

    def __init__(self, model: Model, request: GenerationRequest, tokens: list[int], t0: float) -> None:
        self.model = model
        self.chat = request.is_chat
        self.tools = bool(request.is_chat and request.tools)
        self.tokens = tokens
        self.t0 = t0
        self.parts: list[str] = []

    def shape(self, c: Chunk) -> StreamChunk | None:
        self.parts.append(c.text)
        if not c.done:
            return StreamChunk(c.text) if c.text and not self.tools else None
        result = self._result(c, "".join(self.parts))
        if self.tools:
            return StreamChunk(str((result.message or {}).get("content") or ""), True, result, tool_calls=result.tool_calls)
        return StreamChunk(c.text, True, result)

    def chunks(self, handle: Handle) -> Iterator[StreamChunk]:
        for c in handle:
            out = self.shape(c)
            if out is not None:
                yield out

    async def achunks(self, handle: Handle) -> AsyncIterator[StreamChunk]:
        async for c in handle:
            out = self.shape(c)
            if out is not None:
                yield out

    def _result(self, last: Chunk, text: str) -> Result:
        message: dict[str, Any] | None = None
        if self.chat:
            message = {"role": "assistant", "content": text}
            if self.tools:
                content, calls = split_tool_calls(text, self.model.template)
                if calls:
                    message = {"role": "assistant", "content": content, "tool_calls": calls}
        load = self.model._take_load_duration()
        return Result(
            model=self.model.name,
            text=text,
            done_reason=last.done_reason or "stop",
            prompt_tokens=last.prompt_tokens,
            prompt_eval_count=last.prompt_eval_count,
            prompt_eval_duration=last.prompt_eval_duration,
            eval_count=last.eval_count,
            eval_duration=last.eval_duration,
            draft_count=last.draft_count,
            draft_accepted=last.draft_accepted,
            load_duration=load,
            total_duration=int((time.perf_counter() - self.t0) * 1e9) + load,
            message=message,
            context=self.tokens + last.tokens,
        )


def _normalize_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    if not isinstance(messages, list):
        raise OptionError("messages must be a list of {role, content} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise OptionError(f"messages[{i}] needs a 'role'")
        content = m.get("content")
        if content is None:
            content = ""
        if isinstance(content, list):  # OpenAI content parts: keep the text ones
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        if not isinstance(content, str):
            raise OptionError(f"messages[{i}].content must be text")
        if m.get("images"):
            raise OptionError(f"messages[{i}].images: images are not supported by this model (no vision projector loaded)")
        msg = dict(m)
        msg["content"] = content
        out.append(msg)
    return out


def _file_type(e: LoadedModel) -> str:
    ftype = e.meta("general.file_type")
    if ftype is None:
        return "unknown"
    try:
        import gguf

        return str(gguf.LlamaFileType(int(ftype)).name.removeprefix("MOSTLY_"))
    except (ValueError, ImportError):
        return str(ftype)
