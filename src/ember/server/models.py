"""Ollama's model-management routes over the registry: tags, show, copy,
delete, pull, create, blobs, and the server's own ps and version. The route
bodies are thin: the registry does the work, in worker threads."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

from ember import options as opts
from ember.__about__ import OLLAMA_API_VERSION, __version__
from ember.errors import EmberError, InvalidFileError, InvalidNameError, ModelNotFoundError, OptionError
from ember.gguf.inspect import format_params
from ember.registry import store
from ember.registry.core import copy_model, delete_model, shown
from ember.registry.create import create_model, looks_like_path
from ember.registry.listing import list_models
from ember.registry.modelfile import Modelfile, parse_modelfile
from ember.registry.names import parse_name
from ember.registry.pull import pull_model
from ember.registry.show import show_model
from ember.server import schemas as s
from ember.server.common import manager, ndjson, with_progress
from ember.server.manager import Entry

router = APIRouter(tags=["ollama"])


def _not_found(name: str) -> ModelNotFoundError:
    return ModelNotFoundError(f"model '{name}' not found")


def _digest_hex(d: str | None) -> str:
    return (d or "").removeprefix("sha256:")


@router.get("/api/tags")
@router.head("/api/tags", operation_id="tags_head")
async def tags() -> Any:
    """Models in the registry."""
    entries = await asyncio.to_thread(list_models)
    return {"models": [e.to_json() for e in entries]}


@router.post("/api/show")
async def show(body: s.NameRequest, request: Request) -> Any:
    """A model's Modelfile, parameters, template, details and GGUF metadata
    (Ollama's shape; long arrays and tensors only with ``verbose``)."""
    name = body.target()
    if not name:
        raise OptionError("model is required")
    await manager(request).resolve(name)  # unknown names are 404s; paths only where the server allows them
    try:
        details = await asyncio.to_thread(show_model, name, verbose=body.verbose)
    except (ModelNotFoundError, InvalidNameError, OSError, ValueError):
        raise _not_found(name) from None
    return details.to_json()


@router.post("/api/copy")
async def copy(body: s.CopyRequest) -> Response:
    """Copy a model under a new name (the blobs are shared)."""
    try:
        await asyncio.to_thread(copy_model, body.source, body.destination)
    except ModelNotFoundError:
        raise _not_found(body.source) from None
    return Response(status_code=200)


@router.delete("/api/delete")
async def delete(body: s.NameRequest) -> Response:
    """Remove a model (blobs nothing else uses are deleted)."""
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
    """Download a model (Ollama's registry, Hugging Face or ModelScope) and register it."""
    ref = body.target()
    if not ref:
        raise OptionError("model is required")
    result = _status_response(body.stream, lambda progress: pull_model(ref, insecure=body.insecure, progress=progress))
    return await result if asyncio.iscoroutine(result) else result


@router.post("/api/create")
async def create(body: s.CreateRequest) -> Any:
    """Create a model from Ollama's JSON form (from/files/adapters/template/...)
    or from Modelfile text (``modelfile``)."""
    name = body.target()
    if not name:
        raise OptionError("model is required")
    parse_name(name)  # a bad name is a 400 before anything starts
    mf, upload_dirs = _modelfile_of(body)

    def job(progress: Any) -> None:
        try:
            create_model(name, mf, quantize=body.quantize or None, progress=progress, files_under=store.root())
        finally:
            for d in upload_dirs:
                shutil.rmtree(d, ignore_errors=True)

    result = _status_response(body.stream, job)
    return await result if asyncio.iscoroutine(result) else result


def _link_blobs(files: dict[str, str], where: str) -> Path:
    """A folder of symlinks ``filename -> blob`` so the registry sees the
    uploaded files under their own names (shards, config.json, ...)."""
    for fname, digest in files.items():
        if not isinstance(fname, str) or not fname or fname != Path(fname).name or fname.startswith("."):
            raise OptionError(f"{where}: invalid file name {fname!r} (a plain file name is needed)")
        digest = digest.replace("-", ":", 1) if digest.startswith("sha256-") else digest
        if not store.has_blob(digest):
            raise OptionError(f"{where}: blob {digest} for {fname} not found; upload it with POST /api/blobs/{digest}")
    root = store.root() / "tmp"
    root.mkdir(parents=True, exist_ok=True)
    d = Path(tempfile.mkdtemp(prefix=store.temp_prefix(), dir=root))  # pruned once this process is gone
    for fname, digest in files.items():
        digest = digest.replace("-", ":", 1) if digest.startswith("sha256-") else digest
        os.symlink(store.blob_path(digest), d / fname)
    return d


def _remote_source(value: str, where: str, what: str) -> str:
    """A FROM or ADAPTER value from a client: an uploaded blob (``@sha256:...``,
    as Ollama's clients write it) becomes the blob's file; anything else must
    be a model name. Paths on this machine get the same answer whether they
    exist or not: over HTTP, nothing outside the model store is read."""
    if value.startswith("@"):
        digest = _blob_digest(value[1:])
        if not store.has_blob(digest):
            raise OptionError(f"{where}: blob {digest} not found; upload it with POST /api/blobs/{digest}")
        return str(store.blob_path(digest))
    if what == "ADAPTER" or looks_like_path(value) or len(value) > 255:
        kind = "an uploaded blob (@sha256:<digest>)" if what == "ADAPTER" else "a model name or an uploaded blob (@sha256:<digest>)"
        raise OptionError(f"{where}: {what} {shown(value)} is not {kind}; the server reads no paths of its own, "
                          "upload files with POST /api/blobs/<digest>")
    return value


def _modelfile_of(body: s.CreateRequest) -> tuple[Any, list[Path]]:
    if body.modelfile is not None and not (body.from_ or body.files):
        mf = parse_modelfile(body.modelfile, filename="modelfile")
        mf.from_ = [_remote_source(v, mf.where("from", i), "FROM") for i, v in enumerate(mf.from_)]
        mf.adapters = [_remote_source(v, mf.where("adapter", i), "ADAPTER") for i, v in enumerate(mf.adapters)]
        return mf, []
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
            mf.from_ = [_remote_source(body.from_, "from", "FROM")]
        else:
            raise OptionError("give 'from' (a model name) or 'files' (uploaded blobs)")
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


def _blob_digest(digest: str) -> str:
    d = digest.replace("-", ":", 1) if digest.startswith("sha256-") else digest
    try:
        store.blob_path(d)
    except InvalidFileError as e:
        raise OptionError(str(e)) from None
    return d


@router.head("/api/blobs/{digest}")
async def blob_exists(digest: str) -> Response:
    """200 when the blob is stored, else 404."""
    return Response(status_code=200 if store.has_blob(_blob_digest(digest)) else 404)


@router.post("/api/blobs/{digest}", status_code=201)
async def blob_upload(digest: str, request: Request) -> Response:
    """Store the request body as a blob; its sha256 must match ``digest``."""
    d = _blob_digest(digest)
    if store.has_blob(d):
        return Response(status_code=200)
    tmp = store.temp_blob()
    try:
        h = hashlib.sha256()
        with open(tmp, "wb") as f:
            try:
                async for chunk in request.stream():
                    h.update(chunk)
                    await asyncio.to_thread(f.write, chunk)
            except ClientDisconnect:  # the client gave up: nothing to store, nobody to answer
                return Response(status_code=499)
        if "sha256:" + h.hexdigest() != d:
            raise OptionError(f"digest mismatch: the body's sha256 is {h.hexdigest()[:12]}..., not {d[7:19]}...")
        await asyncio.to_thread(store.install, tmp, d)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return Response(status_code=201)


async def _running(entry: Entry) -> int:
    """Requests generating or queued on a model (0 when its runner cannot say)."""
    try:
        assert entry.runner is not None
        return await asyncio.wait_for(entry.runner.running(), 5)
    except Exception:  # noqa: BLE001 - a report, never a failure
        return 0


@router.get("/api/ps")
async def ps(request: Request) -> Any:
    """Loaded models with size and expiry."""
    entries = manager(request).entries()
    running = await asyncio.gather(*(_running(e) for e in entries))
    out = []
    for e, n in zip(entries, running):
        assert e.runner is not None and e.runner.info is not None
        info, mem = e.runner.info, e.runner.memory
        out.append({
            "name": e.name, "model": e.name, "size": info.size + mem.get("kv_cache_bytes", 0) + mem.get("compute_bytes", 0),
            "digest": _digest_hex(e.resolved.digest),
            "details": {"parent_model": "", "format": "gguf", "family": info.architecture, "families": [info.architecture],
                        "parameter_size": format_params(info.parameters), "quantization_level": info.quantization},
            "expires_at": e.expires_iso(), "size_vram": 0, "context_length": info.num_ctx,
            "num_parallel": info.num_parallel, "active_requests": e.refs, "running": n,
            "devices": mem.get("devices", {}),  # bytes per device (CPU, GPUs, RPC workers) and kind
        })
    return {"models": out}


@router.get("/api/version")
@router.head("/api/version", operation_id="version_head")
async def version() -> Any:
    """The Ollama API version served (clients compare it), and Ember's own."""
    return {"version": OLLAMA_API_VERSION, "ember_version": __version__}
