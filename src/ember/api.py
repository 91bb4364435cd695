"""The library layer: a loaded model with generate, chat, embed and tokenize.

The CLI, the server's runners and user code all go through :class:`Model`, so
a prompt is rendered, an option is merged and a result is shaped the same way
whoever asks. Every generation is one :class:`GenerationRequest` passed to
:meth:`Model.submit`; ``generate``, ``chat``, ``agenerate`` and ``achat`` are
thin wrappers that build one.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any, overload

import gguf
import numpy as np
from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

from ember import options as opts
from ember.engine import Context, LoadedModel, MemoryReport
from ember.engine.scheduler import Chunk, Handle, Scheduler
from ember.engine.vision import VisionProjector, VisionPrompt, require_projector
from ember.errors import ContextOverflowError, EmberError, OptionError, TemplateError
from ember.images import Image, ImageInput, load_image
from ember.models import resolve_model
from ember.progress import ProgressCallback
from ember.registry.core import ResolvedModel
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
from ember.templates.thinking import ThinkingParser, check_think
from ember.templates.tools import ToolCallStream, number_calls, split_tool_calls

__all__ = ["FALLBACK_NOTE", "GenerationRequest", "Model", "ModelInfo", "Result", "StreamChunk"]

_REQUEST_FIELDS = {f.name for f in fields(GenerationRequest)} - {"options"}


def _grammar_for(format: str | dict[str, Any] | None) -> str | None:
    """GBNF for Ollama's ``format`` ("json" or a JSON schema)."""
    if format is None or format == "":
        return None

    if format == "json":
        return str(JSON_GBNF)
    if isinstance(format, dict):
        try:
            return str(json_schema_to_gbnf(json.dumps(format)))
        except Exception as e:  # noqa: BLE001 - the converter raises plain exceptions
            raise OptionError(f"format: unsupported JSON schema ({e})") from None
    raise OptionError(f"format must be \"json\" or a JSON schema object, got {format!r}")


@functools.lru_cache(maxsize=4)
def _parse_template(text: str) -> ChatTemplate:
    """A request's own template, parsed once: rendering, the think check and
    the reasoning parser of one request (and its retries) each ask for it."""
    return ChatTemplate.parse(text)


def _load_draft(ref: str, load_opts: dict[str, Any]) -> LoadedModel:
    """The ``draft`` model (a registry name or a GGUF file), loaded as the
    model is but always on this machine alone."""
    try:
        resolved = resolve_model(ref)
    except EmberError as e:  # not found, or not a model name
        raise OptionError(f"draft: {e}") from None
    return LoadedModel(resolved.model_paths, {**load_opts, "draft": "", "rpc": "none", "tensor_split": ""})


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
        projector: str | os.PathLike[str] | None = None,
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
        self.projector: VisionProjector | None = None
        self.draft: LoadedModel | None = None
        try:
            if self.defaults["draft"]:
                self.draft = _load_draft(self.defaults["draft"], load_opts)
            proj_path = projector or (self.resolved.projector_paths[0] if self.resolved.projector_paths else None)
            if proj_path is not None:
                self.projector = VisionProjector(self.engine, proj_path)
            num_ctx = self.defaults["num_ctx"] or self.engine.default_num_ctx()
            self.defaults["num_ctx"] = num_ctx
            self.scheduler = Scheduler(
                self.engine, num_ctx=num_ctx, num_parallel=max(1, num_parallel), max_queue=max_queue, options=load_opts,
                projector=self.projector, draft_model=self.draft,
            )
            self.template = self._load_template()
        except BaseException:
            if self.projector is not None:
                self.projector.close()
            if self.draft is not None:
                self.draft.close()
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
        if self.projector is not None:
            self.projector.close()
        if self.draft is not None:
            self.draft.close()
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
            capabilities=self.template.capabilities if self.template else [],
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
    @property
    def vision(self) -> bool:
        """Whether the model sees images (a vision projector is loaded)."""
        return self.projector is not None

    def render(self, request: GenerationRequest) -> str:
        """The exact prompt text of a request (what llama.cpp sees); each image
        is the projector's marker in it (see :meth:`images`)."""
        think = self.think_of(request)
        if request.is_chat:
            text = self.render_chat(_with_images(request.messages, request.images) or [], tools=request.tools, think=think)
        else:
            prompt = request.prompt or ""
            if request.images:
                prompt = _place_images(prompt, len(request.images), self._marker())
            text = self.render_generate(
                prompt, system=request.system, template=request.template, suffix=request.suffix, raw=request.raw,
                think=think,
            )
        if request.context:
            text = self.detokenize(self._checked_ids(request.context, "context")) + text
        return text

    def images(self, request: GenerationRequest) -> list[Image]:
        """The request's images in prompt order, validated and decoded (a
        one-line ImageError for a corrupt, oversized or unreadable one)."""
        items: list[ImageInput] = []
        if request.is_chat:
            for m in _with_images(request.messages, request.images) or []:
                if isinstance(m, dict):
                    items.extend(_image_list(m.get("images")))
        else:
            items.extend(_image_list(request.images))
        if items:
            require_projector(self.projector, self.name)
        return [load_image(x, i) for i, x in enumerate(items)]

    def _marker(self) -> str:
        return require_projector(self.projector, self.name).marker

    def template_of(self, template: str | None) -> ChatTemplate | None:
        """The template a request renders with: its own (Ollama's generate
        ``template``) or the model's."""
        return _parse_template(template) if template else self.template

    def think_of(self, request: GenerationRequest) -> bool | str | None:
        """The request's ``think`` as Ollama settles it: on unless asked
        otherwise for a model that can think; refused for one that cannot."""
        think = check_think(request.think)
        tmpl = self.template_of(request.template)
        if tmpl is not None and tmpl.thinking_tags is not None:
            return True if think is None else think
        if think:
            raise OptionError(f'"{self.name}" does not support thinking')
        return think

    def render_chat(
        self, messages: list[dict[str, Any]], *, tools: list[dict[str, Any]] | None = None,
        think: bool | str | None = None,
    ) -> str:
        """The prompt text of a conversation; a message's ``images`` go before
        its text (or at its ``[img]`` placeholders), as Ollama puts them."""
        msgs = _normalize_messages(messages, self._marker if any(isinstance(m, dict) and m.get("images") for m in messages or []) else None)
        msgs = list(self.resolved.messages) + msgs
        if self.resolved.system and not any(m["role"] == "system" for m in msgs):
            msgs.insert(0, {"role": "system", "content": self.resolved.system})
        if self.template is None:
            return "\n\n".join(str(m.get("content") or "") for m in msgs if m.get("content"))
        bos = self.engine.token_text(self.engine.bos_id) if self.engine.bos_id >= 0 else ""
        eos = self.engine.token_text(self.engine.eos_id) if self.engine.eos_id >= 0 else ""
        return str(self.template.render_messages(msgs, tools=tools or None, bos_token=bos, eos_token=eos, think=think))

    def render_generate(
        self, prompt: str, *, system: str | None = None, template: str | None = None, suffix: str = "", raw: bool = False,
        think: bool | str | None = None,
    ) -> str:
        """The prompt text of an Ollama-style generate request."""
        if raw:
            return prompt
        tmpl = self.template_of(template)
        sys_text = self.resolved.system if system is None else system
        if tmpl is None:
            return f"{sys_text}\n\n{prompt}" if sys_text else prompt
        return str(tmpl.render_prompt(prompt, system=sys_text or "", suffix=suffix, think=think))

    def count_tokens(self, request: GenerationRequest) -> int:
        """How many tokens ``request``'s prompt has, as :meth:`submit` would
        send it (before any truncation)."""
        return len(self._tokenize_prompt(self.render(request)))

    def _tokenize_prompt(self, text: str) -> list[int]:
        # Templates that start with the BOS text already carry it; don't add a second one.
        bos = self.engine.token_text(self.engine.bos_id) if self.engine.bos_id >= 0 else ""
        return self.engine.tokenize(text, not (bos and text.startswith(bos)), True)

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
        tokens = self._tokenize_prompt(text)
        if len(tokens) > limit:
            if not truncate:
                raise ContextOverflowError(f"the prompt has {len(tokens)} tokens but {overflow}")
            keep = min(max(num_keep, 0), limit // 2)
            tokens = tokens[:keep] + tokens[len(tokens) - (limit - keep) :]
        return tokens

    def _vision_prompt(self, text: str, images: list[Image]) -> VisionPrompt:
        """Text tokens and image chunks (libmtmd adds the model's image
        delimiters); a prompt with images is never truncated."""
        projector = require_projector(self.projector, self.name)
        bos = self.engine.token_text(self.engine.bos_id) if self.engine.bos_id >= 0 else ""
        vp = projector.tokenize(text, images, add_special=not (bos and text.startswith(bos)))
        num_ctx = self.scheduler.num_ctx
        if vp.n_tokens > num_ctx - 1:
            vp.close()
            raise ContextOverflowError(
                f"the prompt with its images takes {vp.n_tokens} tokens but the context holds {num_ctx} (num_ctx); "
                "send fewer or smaller images, shorten the prompt, or raise num_ctx"
            )
        return vp

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
        top_logprobs = request.logprobs_top()
        images = self.images(request)  # validated before anything else is done
        text = self.render(request)
        prompt: list[int] | VisionPrompt
        if images:
            prompt = self._vision_prompt(text, images)
            tokens = [t for p in prompt.pieces if isinstance(p, list) for t in p]
        else:
            prompt = tokens = self._tokens_for(text, request.truncate, options["num_keep"])
        grammar = _grammar_for(request.format)
        handle = self.scheduler.submit(
            prompt, options, grammar=grammar, loop=loop, logprobs=top_logprobs,
            reasoning=self._thinking_parser(request, text) if grammar else None,  # the format is the answer's
        )
        shaper = _Shaper(self, request, tokens, t0, self._thinking_parser(request, text))
        if loop is None:
            return ChunkStream(shaper.chunks(handle), handle.cancel)
        return AsyncChunkStream(shaper.achunks(handle), handle.cancel)

    def generate(self, prompt: str = "", *, stream: bool = False, **kwargs: Any) -> Result | ChunkStream:
        """Complete ``prompt`` (rendered with the model's template unless ``raw=True``).

        Keywords are :class:`GenerationRequest` fields (``system``, ``template``,
        ``suffix``, ``raw``, ``context``, ``format``, ``truncate``, ``images``, ``options``)
        or Ollama's options, e.g. ``model.generate("Hi", temperature=0,
        num_predict=50)``. With ``stream=True`` a :class:`ChunkStream`.
        """
        chunks = self.submit(_request(kwargs, prompt=prompt))
        return chunks if stream else chunks.result()

    def chat(self, messages: list[dict[str, Any]], *, stream: bool = False, **kwargs: Any) -> Result | ChunkStream:
        """Answer a conversation (``[{"role": "user", "content": "..."}]``);
        keywords as for :meth:`generate`, plus ``tools``. A message's
        ``images`` (and ``images=[...]``, which go with the last user message)
        are file paths, bytes, base64 text or PIL images.

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

    def _thinking_parser(self, request: GenerationRequest, prompt: str) -> ThinkingParser | None:
        """A parser of the reply's reasoning when the request thinks; already
        inside the reasoning when the prompt opened it."""
        if not self.think_of(request):
            return None
        tmpl = self.template_of(request.template)
        tags = tmpl.thinking_tags if tmpl is not None else None
        if tags is None:
            return None
        return ThinkingParser(*tags, started=prompt.rstrip().endswith(tags[0]))

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
        texts, or of token id lists taken as they are. An input longer than
        the context (num_ctx) is cut there with ``truncate``, else refused."""
        return self.embed_counted(texts, truncate=truncate, normalize=normalize)[0]

    def embed_counted(
        self, texts: str | Sequence[str | Sequence[int]], *, truncate: bool = True, normalize: bool = True
    ) -> tuple[list[list[float]], int]:
        """:meth:`embed`, and the number of tokens embedded (after truncation)."""
        items = [texts] if isinstance(texts, str) else list(texts)
        inputs = [
            self.engine.tokenize(x, True, False) if isinstance(x, str) else self._checked_ids(x, "input")
            for x in items
        ]
        out: list[list[float]] = []
        count = 0
        with self._embed_lock:
            if self._embed_ctx is None:
                n_ctx = self.scheduler.num_ctx
                # A non-causal model needs the whole input in one micro-batch.
                whole = None if self.engine.causal else n_ctx
                self._embed_ctx = self.engine.new_context(n_ctx, n_batch=whole, n_ubatch=whole, embeddings=True, pooled=False)
            ctx = self._embed_ctx
            limit = self.scheduler.num_ctx  # as asked for (llama.cpp may round its context up)
            for tokens in inputs:
                tokens = tokens or [self.engine.bos_id]
                if len(tokens) > limit:
                    if not truncate:
                        raise ContextOverflowError(
                            f"input has {len(tokens)} tokens, more than the context length of {limit} (num_ctx); "
                            "set truncate to true to cut it")
                    tokens = tokens[:limit]
                ctx.clear()
                vec = ctx.mean_embedding(tokens)
                count += len(tokens)
                if normalize:
                    n = float(np.linalg.norm(vec))
                    vec = vec / n if n > 0 else vec
                out.append([float(x) for x in vec])
        return out, count


class _Shaper:
    """The scheduler's chunks of one request as StreamChunks, the last one
    carrying the Result. In a chat with tools, text streams as it comes and
    each tool call as soon as it is complete (held back meanwhile: see
    ToolCallStream)."""

    def __init__(
        self, model: Model, request: GenerationRequest, tokens: list[int], t0: float,
        thinking: ThinkingParser | None = None,
    ) -> None:
        self.model = model
        self.chat = request.is_chat
        self.calls = ToolCallStream(model.template) if request.is_chat and request.tools else None
        self.tokens = tokens
        self.t0 = t0
        self.parts: list[str] = []
        self.given: list[str] = []  # the text streamed (with tools: all but the calls)
        self.thinking = thinking
        self.thought: list[str] = []

    def shape(self, c: Chunk) -> StreamChunk | None:
        """The chunk as the caller sees it; None when it has nothing to say
        yet. Logprob entries go with the chunk of their tokens even while
        the parsers hold that text back (as Ollama sends them)."""
        text, thought, lp = c.text, "", c.logprobs
        if self.thinking is not None:
            thought, text = self.thinking.add(c.text)
            if c.done:
                more_thought, more_text = self.thinking.finish()
                thought, text = thought + more_thought, text + more_text
            self.thought.append(thought)
        self.parts.append(text)
        if self.calls is None:
            if not c.done:
                return StreamChunk(text, thinking=thought, logprobs=lp) if text or thought or lp else None
            return StreamChunk(text, True, self._result(c, "".join(self.parts)), thinking=thought, logprobs=lp)
        text, calls = self.calls.feed(text)
        if c.done:
            text += self.calls.finish()
        self.given.append(text)
        if not c.done:
            if text or calls or thought or lp:
                return StreamChunk(text, thinking=thought, tool_calls=calls, logprobs=lp)
            return None
        result = self._result(c, "".join(self.parts))
        late = [] if self.calls.calls else result.tool_calls  # found only in the whole reply (e.g. a fenced JSON call)
        return StreamChunk(text, True, result, thinking=thought, tool_calls=calls + late, logprobs=lp)

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
        thinking = "".join(self.thought)
        if self.chat:
            message = {"role": "assistant", "content": text}
            if self.calls is not None:
                content, calls = split_tool_calls(text, self.model.template)
                if self.calls.calls:  # the calls and text as streamed
                    message = {"role": "assistant", "content": "".join(self.given).rstrip(), "tool_calls": self.calls.calls}
                elif calls:
                    message = {"role": "assistant", "content": content, "tool_calls": number_calls(calls)}
            if thinking:
                message["thinking"] = thinking
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
            thinking=thinking,
            context=self.tokens + last.tokens,
        )


def _image_list(images: Any) -> list[ImageInput]:
    if images is None:
        return []
    if not isinstance(images, (list, tuple)):
        raise OptionError("images must be a list of images (file paths, bytes, base64 text or PIL images)")
    return list(images)


def _with_images(messages: list[dict[str, Any]] | None, images: Any) -> list[dict[str, Any]] | None:
    """The conversation with ``images`` added to its last user message."""
    extra = _image_list(images)
    if not extra or not isinstance(messages, list):
        return messages
    for i in range(len(messages) - 1, -1, -1):
        m = messages[i]
        if isinstance(m, dict) and m.get("role") == "user":
            out = list(messages)
            out[i] = {**m, "images": _image_list(m.get("images")) + extra}
            return out
    raise OptionError("images need a user message to go with")


def _place_images(text: str, n: int, marker: str) -> str:
    """``text`` with ``n`` image markers: at its ``[img]`` placeholders, the
    rest in front (as Ollama places images); markers already there count."""
    n -= text.count(marker)
    for _ in range(max(n, 0)):
        if "[img]" not in text:
            break
        text = text.replace("[img]", marker, 1)
        n -= 1
    return marker * max(n, 0) + text


def _normalize_messages(messages: list[dict[str, Any]], marker: Any = None) -> list[dict[str, Any]]:
    """Messages with text content; ``marker()`` gives the image marker when
    some message has images."""
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
        images = m.get("images")
        if images:
            if not isinstance(images, (list, tuple)):
                raise OptionError(f"messages[{i}].images must be a list of images")
            content = _place_images(content, len(images), marker())
            msg.pop("images")
        msg["content"] = content
        out.append(msg)
    return out


def _file_type(e: LoadedModel) -> str:
    ftype = e.meta("general.file_type")
    if ftype is None:
        return "unknown"
    try:
        return str(gguf.LlamaFileType(int(ftype)).name.removeprefix("MOSTLY_"))
    except ValueError:
        return str(ftype)
