"""The library layer: a loaded model with generate, chat, embed and tokenize.

The CLI, the server and user code all go through :class:`Model`, so a prompt
is rendered, an option is merged and a result is shaped the same way whoever
asks. A model is a registry name, a GGUF path (any shard of a split model) or
a Hugging Face directory (converted once into a cached GGUF).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from ember import options as opts
from ember.engine import Context, LoadedModel, MemoryReport
from ember.engine.scheduler import Chunk, Handle, Scheduler
from ember.errors import ContextOverflowError, EmberError, OptionError, TemplateError
from ember.progress import ProgressCallback

FALLBACK_NOTE = "this model has no chat template: messages are sent as plain text for completion"


@dataclass
class ModelInfo:
    """What a model is (``Model.info``)."""

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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
    load_duration: int = 0  # ns
    total_duration: int = 0  # ns
    message: dict[str, Any] | None = None
    context: list[int] = field(default_factory=list)

    @property
    def tool_calls(self) -> list[dict[str, Any]]:
        return list((self.message or {}).get("tool_calls") or [])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class StreamChunk:
    """One streamed piece; the last has ``done=True`` and ``result`` set."""

    text: str
    done: bool = False
    result: Result | None = None


@dataclass
class _Prepared:
    tokens: list[int]
    options: dict[str, Any]
    grammar: str | None
    chat: bool
    tools: bool
    t0: float


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


class Model:
    """A model loaded for generation. Use as a context manager, or call close().

    Thread-safe: requests from any number of threads (or asyncio tasks) are
    scheduled together on ``num_parallel`` sequences; each gets its own output.
    """

    def __init__(
        self,
        model: str | Path,
        *,
        num_parallel: int = 1,
        max_queue: int = 512,
        lora: Sequence[tuple[str | os.PathLike[str], float]] | None = None,
        progress: ProgressCallback | None = None,
        **options: Any,
    ) -> None:
        from ember.registry import resolve

        t0 = time.perf_counter()
        ref = str(model)
        path = Path(ref).expanduser()
        if path.is_dir() and (path / "config.json").is_file():  # a Hugging Face checkpoint, not a registry name
            ref = str(converted_gguf(path, progress=progress))
        self.resolved = resolve(ref)
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

    def _load_template(self) -> Any:
        from ember.templates import ChatTemplate

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

    # --- prompts ---------------------------------------------------------
    def render_chat(self, messages: list[dict[str, Any]], *, tools: list[dict[str, Any]] | None = None) -> str:
        """The exact prompt text a chat request produces (what llama.cpp sees)."""
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
        from ember.templates import ChatTemplate

        tmpl = ChatTemplate.parse(template) if template else self.template
        sys_text = self.resolved.system if system is None else system
        if tmpl is None:
            return f"{sys_text}\n\n{prompt}" if sys_text else prompt
        return str(tmpl.render_prompt(prompt, system=sys_text or "", suffix=suffix))

    def _tokens_for(self, text: str, truncate: bool, num_keep: int) -> list[int]:
        # Templates that start with the BOS text already carry it; don't add a second one.
        bos = self.engine.token_text(self.engine.bos_id) if self.engine.bos_id >= 0 else ""
        add_special = not (bos and text.startswith(bos))
        tokens = self.engine.tokenize(text, add_special, True)
        limit = self.scheduler.num_ctx - 1
        if len(tokens) > limit:
            if not truncate:
                raise ContextOverflowError(
                    f"the prompt has {len(tokens)} tokens but the context holds {self.scheduler.num_ctx} "
                    "(num_ctx); shorten it, raise num_ctx, or ask for truncation"
                )
            keep = min(max(num_keep, 0), limit // 2)
            tokens = tokens[:keep] + tokens[len(tokens) - (limit - keep) :]
        return tokens

    def _request_options(self, options: dict[str, Any]) -> dict[str, Any]:
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

    def _prepare(self, text: str, options: dict[str, Any], format: Any, truncate: bool, chat: bool, tools: bool) -> _Prepared:
        t0 = time.perf_counter()
        o = self._request_options(options)
        tokens = self._tokens_for(text, truncate, o["num_keep"])
        return _Prepared(tokens, o, _grammar_for(format), chat, tools, t0)

    # --- generation ------------------------------------------------------
    def generate(
        self,
        prompt: str = "",
        *,
        system: str | None = None,
        template: str | None = None,
        suffix: str = "",
        raw: bool = False,
        format: str | dict[str, Any] | None = None,
        stream: bool = False,
        truncate: bool = False,
        options: dict[str, Any] | None = None,
        **kw_options: Any,
    ) -> Result | Iterator[StreamChunk]:
        """Complete ``prompt`` (rendered with the model's template unless ``raw``).

        Options are Ollama's names, as keywords or an ``options`` dict, e.g.
        ``model.generate("Hi", temperature=0, num_predict=50)``. With
        ``stream=True`` an iterator of :class:`StreamChunk` is returned.
        """
        text = self.render_generate(prompt, system=system, template=template, suffix=suffix, raw=raw)
        prep = self._prepare(text, {**(options or {}), **kw_options}, format, truncate, chat=False, tools=False)
        handle = self.scheduler.submit(prep.tokens, prep.options, grammar=prep.grammar)
        chunks = self._sync_stream(handle, prep)
        return chunks if stream else _collect(chunks)

    def chat(
        self,
        messages: list[dict[str, Any]],
        *,
        tools: list[dict[str, Any]] | None = None,
        format: str | dict[str, Any] | None = None,
        stream: bool = False,
        truncate: bool = False,
        options: dict[str, Any] | None = None,
        **kw_options: Any,
    ) -> Result | Iterator[StreamChunk]:
        """Answer a conversation (``[{"role": "user", "content": "..."}]``).

        The result's ``message`` is ``{"role": "assistant", "content": ...}``
        with ``tool_calls`` when the model called one of ``tools``.
        """
        text = self.render_chat(messages, tools=tools)
        prep = self._prepare(text, {**(options or {}), **kw_options}, format, truncate, chat=True, tools=bool(tools))
        handle = self.scheduler.submit(prep.tokens, prep.options, grammar=prep.grammar)
        chunks = self._sync_stream(handle, prep)
        return chunks if stream else _collect(chunks)

    async def agenerate(self, prompt: str = "", *, stream: bool = False, **kwargs: Any) -> Any:
        """Async :meth:`generate`: a Result, or an async iterator when ``stream``."""
        chunks = self._async_submit(False, prompt, kwargs)
        return chunks if stream else await _acollect(chunks)

    async def achat(self, messages: list[dict[str, Any]], *, stream: bool = False, **kwargs: Any) -> Any:
        """Async :meth:`chat`: a Result, or an async iterator when ``stream``."""
        chunks = self._async_submit(True, messages, kwargs)
        return chunks if stream else await _acollect(chunks)

    def _async_submit(self, chat: bool, what: Any, kwargs: dict[str, Any]) -> AsyncIterator[StreamChunk]:
        options = {**(kwargs.pop("options", None) or {})}
        fmt = kwargs.pop("format", None)
        truncate = kwargs.pop("truncate", False)
        if chat:
            tools = kwargs.pop("tools", None)
            text = self.render_chat(what, tools=tools)
        else:
            tools = None
            names = ("system", "template", "suffix", "raw")
            text = self.render_generate(what, **{k: kwargs.pop(k) for k in names if k in kwargs})
        options.update(kwargs)
        prep = self._prepare(text, options, fmt, truncate, chat=chat, tools=bool(tools))
        handle = self.scheduler.submit(prep.tokens, prep.options, grammar=prep.grammar, loop=asyncio.get_running_loop())
        return self._async_stream(handle, prep)

    def _final(self, last: Chunk, text: str, prep: _Prepared) -> Result:
        message: dict[str, Any] | None = None
        if prep.chat:
            message = {"role": "assistant", "content": text}
            if prep.tools:
                from ember.templates.tools import split_tool_calls

                content, calls = split_tool_calls(text, self.template)
                if calls:
                    message = {"role": "assistant", "content": content, "tool_calls": calls}
        return Result(
            model=self.name,
            text=text,
            done_reason=last.done_reason or "stop",
            prompt_tokens=last.prompt_tokens,
            prompt_eval_count=last.prompt_eval_count,
            prompt_eval_duration=last.prompt_eval_duration,
            eval_count=last.eval_count,
            eval_duration=last.eval_duration,
            load_duration=0,
            total_duration=int((time.perf_counter() - prep.t0) * 1e9),
            message=message,
            context=prep.tokens + last.tokens,
        )

    def _sync_stream(self, handle: Handle, prep: _Prepared) -> Iterator[StreamChunk]:
        parts: list[str] = []
        for c in handle:
            parts.append(c.text)
            if c.done:
                yield StreamChunk(c.text, True, self._final(c, "".join(parts), prep))
            elif c.text:
                yield StreamChunk(c.text)

    async def _async_stream(self, handle: Handle, prep: _Prepared) -> AsyncIterator[StreamChunk]:
        parts: list[str] = []
        async for c in handle:
            parts.append(c.text)
            if c.done:
                yield StreamChunk(c.text, True, self._final(c, "".join(parts), prep))
            elif c.text:
                yield StreamChunk(c.text)

    # --- embeddings ------------------------------------------------------
    def embed(self, texts: str | list[str], *, truncate: bool = True, normalize: bool = True) -> list[list[float]]:
        """Mean-pooled (and L2-normalized, as Ollama's /api/embed) embeddings."""
        import numpy as np

        items = [texts] if isinstance(texts, str) else list(texts)
        out: list[list[float]] = []
        with self._embed_lock:
            if self._embed_ctx is None:
                self._embed_ctx = self.engine.new_context(self.scheduler.num_ctx, embeddings=True)
            ctx = self._embed_ctx
            for text in items:
                tokens = self.engine.tokenize(text, True, False) or [self.engine.bos_id]
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
        msg = dict(m)
        msg["content"] = content
        out.append(msg)
    return out


def _collect(chunks: Iterator[StreamChunk]) -> Result:
    for c in chunks:
        if c.done and c.result is not None:
            return c.result
    raise EmberError("generation ended without a result")


async def _acollect(chunks: AsyncIterator[StreamChunk]) -> Result:
    async for c in chunks:
        if c.done and c.result is not None:
            return c.result
    raise EmberError("generation ended without a result")


def _file_type(e: LoadedModel) -> str:
    ftype = e.meta("general.file_type")
    if ftype is None:
        return "unknown"
    try:
        import gguf

        return str(gguf.LlamaFileType(int(ftype)).name.removeprefix("MOSTLY_"))
    except (ValueError, ImportError):
        return str(ftype)


def converted_gguf(model_dir: Path, *, progress: ProgressCallback | None = None) -> Path:
    """A Hugging Face directory converted once to an F16 GGUF in the cache; the
    cache key covers the directory's path, file names, sizes and times."""
    from ember.convert import convert_model
    from ember.demo import cache_dir

    h = hashlib.sha256(str(model_dir.resolve()).encode())
    for f in sorted(model_dir.iterdir()):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    out = cache_dir() / "converted" / f"{model_dir.name}-{h.hexdigest()[:16]}.gguf"
    if not out.is_file():
        convert_model(model_dir, out, outtype="f16", progress=progress)
    return out
