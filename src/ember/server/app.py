"""The FastAPI application: Ollama's API (``/api/*``), OpenAI's (``/v1/*``,
the Responses API included), Anthropic's Messages API (``/v1/messages``),
the web chat page at ``/``, JSON errors everywhere, CORS and optional bearer
auth. ``create_app()`` builds one; ``ember serve`` runs it with uvicorn."""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from ember import settings
from ember.__about__ import __version__
from ember.errors import BodyTooLargeError, EmberError
from ember.registry import store
from ember.server import anthropic, models, ollama, openai, responses
from ember.server.common import error_body
from ember.server.guards import LOCAL_ORIGINS, RequestGuard
from ember.server.manager import ModelManager

log = logging.getLogger("ember.server")

WEB_DIR = Path(__file__).parent / "web"
OPEN_PATHS = ("/", "/api/version")


def error_response(request: Request, status: int, message: str) -> JSONResponse:
    headers = {"Retry-After": "1"} if status == 503 else None
    return JSONResponse(error_body(request.url.path, message, status), status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if err.get("type") == "json_invalid":
            return "invalid JSON in the request body: " + str(err.get("ctx", {}).get("error", err.get("msg", "")))
        where = ".".join(loc) or "body"
        parts.append(f"{where}: {err.get('msg', 'invalid value')}")
    return "; ".join(parts) or "invalid request"


class _AuthMiddleware:
    """``Authorization: Bearer $EMBER_API_KEY`` on every route but the open ones
    (pure ASGI, so streaming responses and disconnects pass through untouched)."""

    def __init__(self, app: Any, key: str) -> None:
        self.app = app
        self.key = key.encode()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if scope.get("method") == "OPTIONS" or path in OPEN_PATHS or path.startswith("/web/"):
            await self.app(scope, receive, send)
            return
        auth, api_key = "", ""
        for k, v in scope.get("headers") or []:
            if k == b"authorization":
                auth = v.decode("latin-1")
            elif k == b"x-api-key":  # Anthropic's SDK sends its key here
                api_key = v.decode("latin-1")
        scheme, _, token = auth.partition(" ")
        if not (scheme.lower() == "bearer" and token.strip()) and api_key:
            scheme, token = "bearer", api_key
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.key):
            await self.app(scope, receive, send)
            return
        response = JSONResponse(
            error_body(path, "unauthorized: send 'Authorization: Bearer <EMBER_API_KEY>'", 401),
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )
        await response(scope, receive, send)


class _BodyLimitMiddleware:
    """Read a request body up to ``limit`` bytes before the app sees it, and
    answer 413 beyond that, so no route parses (or a runner tokenizes) more.
    Blob uploads stream to disk and are not limited."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("path", "").startswith("/api/blobs/"):
            await self.app(scope, receive, send)
            return
        parts: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before sending its body
            size += len(message.get("body", b""))
            if size <= self.limit:
                parts.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        if size > self.limit:
            response = JSONResponse(error_body(scope.get("path", ""), BodyTooLargeError(
                f"the request body has {size} bytes, more than the {self.limit} this server accepts "
                "(EMBER_MAX_BODY_SIZE)").message, 413), status_code=413)
            await response(scope, receive, send)
            return
        body, replayed = b"".join(parts), False

        async def replay() -> Any:
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: the client's disconnect
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


async def _prune_leftovers() -> None:
    """What killed creates and pulls left in the registry (temporary blobs,
    work and upload folders of processes that are gone) goes when a server
    starts, in the background; a registry that cannot be written is left alone."""
    try:
        await asyncio.to_thread(store.prune)
    except (OSError, EmberError) as e:
        log.warning("could not clean up the model registry: %s", e)


def create_app(manager: ModelManager | None = None, *, host: str | None = None) -> FastAPI:
    """A fresh application with its own model manager (settings from EMBER_*).
    ``host`` is the address it is served on (default: EMBER_HOST's): on a
    loopback address only loopback host names are answered (server/guards.py).
    Remote clients name models, never paths on this machine."""
    mgr = manager or ModelManager()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        mgr.start()
        pruning = asyncio.ensure_future(_prune_leftovers())
        try:
            yield
        finally:
            await mgr.close()
            await pruning

    app = FastAPI(
        title="Ember",
        version=__version__,
        description="Ollama- and OpenAI-compatible API for local GGUF models.",
        lifespan=lifespan,
    )
    app.state.manager = mgr

    @app.exception_handler(EmberError)
    async def _ember_error(request: Request, exc: EmberError) -> JSONResponse:
        return error_response(request, exc.status, exc.message)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(request, 400, _validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 404 and exc.detail == "Not Found":
            return error_response(request, 404, f"404 page not found: no endpoint {request.method} {request.url.path[:200]}")
        return error_response(request, exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(request, 500, f"internal error: {type(exc).__name__}: {exc}")

    app.include_router(ollama.router)
    app.include_router(openai.router)
    app.include_router(anthropic.router)
    app.include_router(responses.router)
    app.include_router(models.router)

    index = WEB_DIR / "index.html"

    @app.get("/", include_in_schema=False)
    async def root() -> Response:
        if index.is_file():
            return HTMLResponse(index.read_text(encoding="utf-8"))
        return PlainTextResponse("Ember is running")

    @app.head("/", include_in_schema=False)
    async def root_head() -> Response:
        return Response(status_code=200, media_type="text/html" if index.is_file() else "text/plain")

    if WEB_DIR.is_dir():
        app.mount("/web", StaticFiles(directory=WEB_DIR, check_dir=False), name="web")

    app.add_middleware(_BodyLimitMiddleware, limit=settings.max_body_size())
    key = settings.api_key()
    if key:
        app.add_middleware(_AuthMiddleware, key=key)
    app.add_middleware(RequestGuard, bind_host=host if host is not None else split_host(settings.host())[0])
    # Added last, so outermost: even a 401 or 415 carries the CORS headers.
    app.add_middleware(
        CORSMiddleware,
        allow_origins=settings.origins(),
        allow_origin_regex=LOCAL_ORIGINS,
        allow_methods=["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS"],
        allow_headers=["*"],
        expose_headers=["Retry-After"],
    )
    return app


def split_host(value: str) -> tuple[str, int]:
    """``host:port`` (IPv6 in brackets) -> (host, port)."""
    m = re.fullmatch(r"\[?([^\]]*?)\]?:(\d+)", value)
    if not m:
        raise EmberError(f"EMBER_HOST must look like 127.0.0.1:11434, got {value!r}")
    port = int(m.group(2))
    if not 0 <= port <= 65535:
        raise EmberError(f"EMBER_HOST: port {port} is out of range")
    return m.group(1) or "127.0.0.1", port
