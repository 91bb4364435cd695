"""Ollama's API: the same paths, fields, NDJSON streams and error bodies, so
the ``ollama`` client libraries and the apps built on them work unchanged."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from ember.__about__ import __version__
from ember.errors import EmberError, InvalidFileError, InvalidNameError, ModelNotFoundError, OptionError
from ember.server import schemas as s
from ember.server.common import collect, iso, manager, message_of, ndjson, now_iso, with_progress
from ember.server.manager import Entry, check_options, parse_keep_alive, resolve_name

router = APIRouter(tags=["ollama"])


def _not_found(name: str) -> ModelNotFoundError:
    return ModelNotFoundError(f"model '{name}' not found")


async def _resolve_or_404(name: str) -> Any:
    if not name:
        raise OptionError("model is required")
    try:
        return await asyncio.to_thread(resolve_name, name)
    except ModelNotFoundError:
        raise _not_found(name) from None


def _metrics(result: Any, load_ns: int) -> dict[str, Any]:
    return {
        "total_duration": result.total_duration + load_ns,
        "load_duration": load_ns,
        "prompt_eval_count": result.prompt_eval_count,
        "prompt_eval_duration": result.prompt_eval_duration,
        "eval_count": result.eval_count,
        "eval_duration": result.eval_duration,
    }


async def _load_or_unload(mgr: Any, name: str, options: dict[str, Any], keep_alive: Any, chat: bool) -> dict[str, Any]:
    """An empty prompt: load the model (done_reason "load"), or with
    keep_alive 0 unload it ("unload"), as Ollama does."""
    resolved = await _resolve_or_404(name)
    mgr_ka = parse_keep_alive(keep_alive)
    out: dict[str, Any] = {"model": name, "created_at": now_iso()}
    out.update({"message": {"role": "assistant", "content": ""}} if chat else {"response": ""})
    out["done"] = True
    if mgr_ka == 0:
        await mgr.unload(resolved.name)
        out["done_reason"] = "unload"
        return out
    entry = await mgr.acquire(name, options, mgr_ka)
    mgr.release(entry, mgr_ka)
    out["done_reason"] = "load"
    return out


async def _acquire(request: Request, name: str, options: dict[str, Any], keep_alive: Any) -> tuple[Entry, float, int]:
    mgr = manager(request)
    await _resolve_or_404(name)
    ka = parse_keep_alive(keep_alive)
    t0 = time.perf_counter()
    entry = await mgr.acquire(name, options, ka)
    return entry, ka, int((time.perf_counter() - t0) * 1e9)


def _check_images(images: list[str] | None) -> None:
    if images:
        raise OptionError("images are not supported by this server's models (no vision projector loaded)")


def _context_prefix(model: Any, context: list[int] | None) -> str:
    if not context:
        return ""
    n_vocab = model.engine.n_vocab
    bad = [t for t in context if not 0 <= t < n_vocab]
    if bad:
        raise OptionError(f"context: token id {bad[0]} is out of range (vocabulary size {n_vocab})")
    return str(model.detokenize(list(context)))


# --- generate -----------------------------------------------------------------
@router.post("/api/generate")
async def generate(body: s.GenerateRequest, request: Request) -> Any:
    """Complete a prompt (NDJSON stream unless ``"stream": false``)."""
    options = check_options(body.options)
    _check_images(body.images)
    if not body.model:
        raise OptionError("model is required")
    prompt = body.prompt or ""
    if not prompt and not body.suffix and not body.debug_render_only:
        return await _load_or_unload(manager(request), body.model, options, body.keep_alive, chat=False)
    entry, ka, load_ns = await _acquire(request, body.model, options, body.keep_alive)
    mgr = manager(request)
    try:
        model = entry.model
        text = model.render_generate(prompt, system=body.system, template=body.template, suffix=body.suffix or "", raw=body.raw)
        text = _context_prefix(model, body.context) + text
        if body.debug_render_only:
            mgr.release(entry, ka)
            return {"model": body.model, "created_at": now_iso(), "response": "", "done": False,
                    "_debug_info": {"rendered_template": text}}
        chunks = await model.agenerate(text, raw=True, format=body.format or None, truncate=bool(body.truncate),
                                       options=options, stream=True)
    except BaseException:
        mgr.release(entry, ka)
        raise
    if not body.stream:
        try:
            result = await collect(request, chunks)
        finally:
            mgr.release(entry, ka)
        return {"model": body.model, "created_at": now_iso(), "response": result.text, "done": True,
                "done_reason": result.done_reason, "context": result.context, **_metrics(result, load_ns)}

    async def lines() -> AsyncIterator[dict[str, Any]]:
        try:
            async for c in chunks:
                if c.done and c.result is not None:
                    r = c.result
                    if c.text:
                        yield {"model": body.model, "created_at": now_iso(), "response": c.text, "done": False}
                    yield {"model": body.model, "created_at": now_iso(), "response": "", "done": True,
                           "done_reason": r.done_reason, "context": r.context, **_metrics(r, load_ns)}
                elif c.text:
                    yield {"model": body.model, "created_at": now_iso(), "response": c.text, "done": False}
        except Exception as e:  # noqa: BLE001 - the status line is already sent: report in-stream
            yield {"error": message_of(e)}
        finally:
            with contextlib.suppress(Exception):
                await chunks.aclose()
            mgr.release(entry, ka)

    return ndjson(lines())


# --- chat -------------------------------------------------------------------------
def messages_of(msgs: list[s.Message] | None) -> list[dict[str, Any]]:
    out = []
    for m in msgs or []:
        d = m.model_dump(exclude_none=True)
        if d.get("images"):
            _check_images(d["images"])
        d.pop("images", None)
        out.append(d)
    return out


@router.post("/api/chat")
async def chat(body: s.ChatRequest, request: Request) -> Any:
    """Answer a conversation (NDJSON stream unless ``"stream": false``)."""
    options = check_options(body.options)
    if not body.model:
        raise OptionError("model is required")
    messages = messages_of(body.messages)
    if not messages and not body.debug_render_only:
        return await _load_or_unload(manager(request), body.model, options, body.keep_alive, chat=True)
    entry, ka, load_ns = await _acquire(request, body.model, options, body.keep_alive)
    mgr = manager(request)
    tools = body.tools or None
    try:
        model = entry.model
        if body.debug_render_only:
            text = model.render_chat(messages, tools=tools)
            mgr.release(entry, ka)
            return {"model": body.model, "created_at": now_iso(), "message": {"role": "assistant", "content": ""},
                    "done": False, "_debug_info": {"rendered_template": text}}
        chunks = await model.achat(messages, tools=tools, format=body.format or None, truncate=bool(body.truncate),
                                   options=options, stream=True)
    except BaseException:
        mgr.release(entry, ka)
        raise

    def final(r: Any) -> dict[str, Any]:
        return {"model": body.model, "created_at": now_iso(), "message": {"role": "assistant", "content": ""},
                "done": True, "done_reason": r.done_reason, **_metrics(r, load_ns)}

    if not body.stream or tools:
        # With tools the whole answer is needed to tell a call from text.
        try:
            result = await collect(request, chunks)
        finally:
            mgr.release(entry, ka)
        message = dict(result.message or {"role": "assistant", "content": result.text})
        if not body.stream:
            out = final(result)
            out["message"] = message
            return out

        async def once() -> AsyncIterator[dict[str, Any]]:
            yield {"model": body.model, "created_at": now_iso(), "message": message, "done": False}
            yield final(result)

        return ndjson(once())

    async def lines() -> AsyncIterator[dict[str, Any]]:
        try:
            async for c in chunks:
                if c.text:
                    yield {"model": body.model, "created_at": now_iso(),
                           "message": {"role": "assistant", "content": c.text}, "done": False}
                if c.done and c.result is not None:
                    yield final(c.result)
        except Exception as e:  # noqa: BLE001
            yield {"error": message_of(e)}
        finally:
            with contextlib.suppress(Exception):
                await chunks.aclose()
            mgr.release(entry, ka)

    return ndjson(lines())


# --- embeddings ------------------------------------------------------------------------
def _fit_dimensions(vec: list[float], dims: int | None) -> list[float]:
    if not dims:
        return vec
    if dims < 0 or dims > len(vec):
        raise OptionError(f"dimensions must be between 1 and {len(vec)}, got {dims}")
    cut = vec[:dims]
    n = math.sqrt(sum(x * x for x in cut))
    return [x / n for x in cut] if n > 0 else cut


async def embed_texts(request: Request, name: str, texts: list[str], *, truncate: bool, options: dict[str, Any],
                      keep_alive: Any, normalize: bool = True) -> tuple[list[list[float]], int, int, int]:
    """(vectors, prompt tokens, load ns, total ns) for ``texts`` on model ``name``."""
    t0 = time.perf_counter()
    entry, ka, load_ns = await _acquire(request, name, options, keep_alive)
    try:
        model = entry.model
        vecs = await asyncio.to_thread(model.embed, texts, truncate=truncate, normalize=normalize) if texts else []
        n_tokens = sum(len(model.tokenize(t)) for t in texts)
    finally:
        manager(request).release(entry, ka)
    return vecs, n_tokens, load_ns, int((time.perf_counter() - t0) * 1e9)


@router.post("/api/embed")
async def embed(body: s.EmbedRequest, request: Request) -> Any:
    """Embeddings of one text or a list (L2-normalized)."""
    options = check_options(body.options)
    if not body.model:
        raise OptionError("model is required")
    texts = [body.input] if isinstance(body.input, str) else list(body.input)
    texts = [t for t in texts if t != ""] if isinstance(body.input, str) else texts
    vecs, n, load_ns, total = await embed_texts(request, body.model, texts, truncate=body.truncate, options=options,
                                                keep_alive=body.keep_alive)
    vecs = [_fit_dimensions(v, body.dimensions) for v in vecs]
    return {"model": body.model, "embeddings": vecs, "total_duration": total, "load_duration": load_ns,
            "prompt_eval_count": n}


@router.post("/api/embeddings")
async def embeddings(body: s.EmbeddingsRequest, request: Request) -> Any:
    """The older endpoint: one prompt, an unnormalized embedding."""
    options = check_options(body.options)
    if not body.model:
        raise OptionError("model is required")
    if not body.prompt:
        await _resolve_or_404(body.model)
        return {"embedding": []}
    vecs, _, _, _ = await embed_texts(request, body.model, [body.prompt], truncate=True, options=options,
                                      keep_alive=body.keep_alive, normalize=False)
    return {"embedding": vecs[0]}


# --- models -----------------------------------------------------------------------------
def _digest_hex(d: str | None) -> str:
    return (d or "").removeprefix("sha256:")


@router.get("/api/tags")
async def tags() -> Any:
    """Models in the registry."""
    from ember.registry import list_models

    entries = await asyncio.to_thread(list_models)
    return {"models": [{"name": e.name, "model": e.name, "modified_at": iso(e.modified_at), "size": e.size,
                        "digest": _digest_hex(e.digest), "details": e.details} for e in entries]}


def _capabilities(template: str | None) -> list[str]:
    caps = ["completion"]
    t = template or ""
    if ".Tools" in t or "tools" in t:
        caps.append("tools")
    if ".Suffix" in t:
        caps.append("insert")
    return caps


@router.post("/api/show")
async def show(body: s.NameRequest) -> Any:
    """A model's Modelfile, parameters, template, details and GGUF metadata."""
    from ember.registry import show_model
    from ember.registry.ggufmeta import read_info

    name = body.target()
    if not name:
        raise OptionError("model is required")
    try:
        d = await asyncio.to_thread(show_model, name)
    except (ModelNotFoundError, InvalidNameError, OSError, ValueError):
        # Not in the registry: the demo model or a GGUF path.
        try:
            r = await asyncio.to_thread(resolve_name, name)
        except ModelNotFoundError:
            raise _not_found(name) from None
        info: dict[str, Any] = {}
        with contextlib.suppress(EmberError):
            gi = await asyncio.to_thread(read_info, r.model_paths[0])
            info = dict(gi.metadata)
            info["general.parameter_count"] = gi.n_params
        details = {"parent_model": "", "format": "gguf", "family": str(info.get("general.architecture", "")),
                   "families": None, "parameter_size": "", "quantization_level": ""}
        return {"modelfile": "\n".join(f"FROM {p}" for p in r.model_paths) + "\n", "parameters": "", "template": "",
                "details": details, "model_info": _jsonable(info), "capabilities": ["completion"],
                "modified_at": iso(r.modified_at)}
    out: dict[str, Any] = {
        "modelfile": d.modelfile,
        "parameters": d.parameters,
        "template": d.template or "",
        "details": d.details,
        "model_info": _jsonable(d.model_info),
        "capabilities": _capabilities(d.template),
        "modified_at": iso(d.modified_at),
    }
    if d.system:
        out["system"] = d.system
    if d.license:
        out["license"] = "\n".join(d.license)
    if d.messages:
        out["messages"] = d.messages
    return out


def _jsonable(info: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in info.items():
        if isinstance(v, (list, tuple)) and len(v) > 64:
            out[k] = None  # Ollama leaves long arrays (the vocabulary) out unless verbose
        elif isinstance(v, (str, int, float, bool)) or v is None:
            out[k] = v
        elif isinstance(v, (list, tuple)):
            out[k] = [x if isinstance(x, (str, int, float, bool)) else str(x) for x in v]
        elif isinstance(v, bytes):
            out[k] = v.decode("utf-8", "replace")
        else:
            out[k] = str(v)
    return out


@router.post("/api/copy")
async def copy(body: s.CopyRequest) -> Response:
    """Copy a model under a new name (the blobs are shared)."""
    from ember.registry import copy_model

    try:
        await asyncio.to_thread(copy_model, body.source, body.destination)
    except ModelNotFoundError:
        raise _not_found(body.source) from None
    return Response(status_code=200)


@router.delete("/api/delete")
async def delete(body: s.NameRequest) -> Response:
    """Remove a model (blobs nothing else uses are deleted)."""
    from ember.registry import delete_model

    name = body.target()
    if not name:
        raise OptionError("model is required")
    try:
        await asyncio.to_thread(delete_model, name)
    except ModelNotFoundError:
        raise _not_found(name) from None
    return Response(status_code=200)


def _status_response(stream: bool, fn: Any) -> Any:
    """Run a slow registry job: an NDJSON status stream, or one JSON answer."""
    if stream:
        return ndjson(with_progress(fn))

    async def run() -> Any:
        try:
            await asyncio.to_thread(fn, None)
        except EmberError as e:
            return JSONResponse({"error": e.message}, status_code=e.status)
        return {"status": "success"}

    return run()


@router.post("/api/pull")
async def pull(body: s.PullRequest) -> Any:
    """Download a model from Hugging Face or ModelScope and register it."""
    from ember.registry import pull_model

    ref = body.target()
    if not ref:
        raise OptionError("model is required")
    result = _status_response(body.stream, lambda progress: pull_model(ref, progress=progress))
    return await result if asyncio.iscoroutine(result) else result


@router.post("/api/create")
async def create(body: s.CreateRequest) -> Any:
    """Create a model from Ollama's JSON form (from/files/adapters/template/...)
    or from Modelfile text (``modelfile``)."""
    from ember.registry import create_model, parse_name

    name = body.target()
    if not name:
        raise OptionError("model is required")
    parse_name(name)  # a bad name is a 400 before anything starts
    mf, upload_dirs = _modelfile_of(body)

    def job(progress: Any) -> None:
        try:
            create_model(name, mf, quantize=body.quantize or None, progress=progress)
        finally:
            for d in upload_dirs:
                shutil.rmtree(d, ignore_errors=True)

    result = _status_response(body.stream, job)
    return await result if asyncio.iscoroutine(result) else result


def _link_blobs(files: dict[str, str], where: str) -> Path:
    """A folder of symlinks ``filename -> blob`` so the registry sees the
    uploaded files under their own names (shards, config.json, ...)."""
    from ember.registry import store

    for fname, digest in files.items():
        if not isinstance(fname, str) or not fname or fname != Path(fname).name or fname.startswith("."):
            raise OptionError(f"{where}: invalid file name {fname!r} (a plain file name is needed)")
        digest = digest.replace("-", ":", 1) if digest.startswith("sha256-") else digest
        if not store.has_blob(digest):
            raise OptionError(f"{where}: blob {digest} for {fname} not found; upload it with POST /api/blobs/{digest}")
    root = store.root() / "tmp"
    root.mkdir(parents=True, exist_ok=True)
    d = Path(tempfile.mkdtemp(prefix="upload-", dir=root))
    for fname, digest in files.items():
        digest = digest.replace("-", ":", 1) if digest.startswith("sha256-") else digest
        os.symlink(store.blob_path(digest), d / fname)
    return d


def _modelfile_of(body: s.CreateRequest) -> tuple[Any, list[Path]]:
    from ember import options as opts
    from ember.registry import Modelfile, parse_modelfile

    if body.modelfile is not None and not (body.from_ or body.files):
        base = Path(body.path).expanduser().parent if body.path else None
        return parse_modelfile(body.modelfile, base_dir=base, filename="modelfile"), []
    mf = Modelfile(filename="create request")
    dirs: list[Path] = []
    try:
        if body.files:
            upload = _link_blobs(body.files, "files")
            dirs.append(upload)
            names = sorted(body.files)
            ggufs = [n for n in names if n.lower().endswith(".gguf")]
            mf.from_ = [str(upload / n) for n in ggufs] if ggufs else [str(upload)]
        elif body.from_:
            mf.from_ = [body.from_]
        else:
            raise OptionError("give 'from' (a model name or path) or 'files' (uploaded blobs)")
        if body.adapters:
            adir = _link_blobs(body.adapters, "adapters")
            dirs.append(adir)
            mf.adapters = [str(adir / n) for n in sorted(body.adapters)]
        mf.template = body.template
        mf.system = body.system
        mf.parameters = opts.coerce_all(body.parameters or {})
        for i, m in enumerate(body.messages or []):
            role, content = m.get("role"), m.get("content")
            if not isinstance(role, str) or not isinstance(content, str):
                raise OptionError(f"messages[{i}] needs string 'role' and 'content'")
            mf.messages.append({"role": role, "content": content})
        if body.license is not None:
            mf.licenses = [body.license] if isinstance(body.license, str) else list(body.license)
    except BaseException:
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)
        raise
    return mf, dirs


# --- blobs -------------------------------------------------------------------------------
def _blob_digest(digest: str) -> str:
    from ember.registry import store

    d = digest.replace("-", ":", 1) if digest.startswith("sha256-") else digest
    try:
        store.blob_path(d)
    except InvalidFileError as e:
        raise OptionError(str(e)) from None
    return d


@router.head("/api/blobs/{digest}")
async def blob_exists(digest: str) -> Response:
    """200 when the blob is stored, else 404."""
    from ember.registry import store

    return Response(status_code=200 if store.has_blob(_blob_digest(digest)) else 404)


@router.post("/api/blobs/{digest}", status_code=201)
async def blob_upload(digest: str, request: Request) -> Response:
    """Store the request body as a blob; its sha256 must match ``digest``."""
    from ember.registry import store

    d = _blob_digest(digest)
    if store.has_blob(d):
        return Response(status_code=200)
    tmp = store._temp_blob()
    try:
        h = hashlib.sha256()
        with open(tmp, "wb") as f:
            async for chunk in request.stream():
                h.update(chunk)
                await asyncio.to_thread(f.write, chunk)
        if "sha256:" + h.hexdigest() != d:
            raise OptionError(f"digest mismatch: the body's sha256 is {h.hexdigest()[:12]}..., not {d[7:19]}...")
        await asyncio.to_thread(store._install, tmp, d)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return Response(status_code=201)


# --- running models ---------------------------------------------------------------------------
@router.get("/api/ps")
async def ps(request: Request) -> Any:
    """Loaded models with size and expiry."""
    out = []
    for e in manager(request).entries():
        info = e.model.info
        out.append({
            "name": e.name, "model": e.name, "size": info.size + _kv_bytes(e.model),
            "digest": _digest_hex(getattr(e.model.resolved, "digest", None)),
            "details": {"parent_model": "", "format": "gguf", "family": info.architecture, "families": [info.architecture],
                        "parameter_size": _param_size(info.parameters), "quantization_level": info.quantization},
            "expires_at": e.expires_iso(), "size_vram": 0, "context_length": info.num_ctx,
            "num_parallel": info.num_parallel, "active_requests": e.refs,
            "running": e.model.scheduler.active,
            "devices": _devices(e.model),
        })
    return {"models": out}


def _kv_bytes(model: Any) -> int:
    try:
        m = model.memory
        return int(m.kv_cache_bytes + m.compute_bytes)
    except Exception:  # noqa: BLE001 - a report, never a failure
        return 0


def _devices(model: Any) -> dict[str, dict[str, int]]:
    """Bytes per device (CPU, GPUs, RPC workers) and kind: what went where."""
    try:
        return dict(model.memory.devices)
    except Exception:  # noqa: BLE001 - a report, never a failure
        return {}


def _param_size(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.1f}B"
    return f"{n / 1e6:.0f}M"


@router.get("/api/version")
async def version() -> Any:
    return {"version": __version__}
