"""Requests a browser can be tricked into sending never run.

* DNS rebinding: a page on ``evil.example`` whose name comes to resolve to
  127.0.0.1 reaches a loopback server with ``Host: evil.example``. On a
  loopback bind only loopback host names (and ``EMBER_ALLOWED_HOSTS``) are
  served; others get 403 (the attack behind Ollama's CVE-2024-28224).
* Cross-site requests: a request whose ``Origin`` is neither allowed
  (``EMBER_ORIGINS``, pages on this machine) nor this server's own gets 403
  before any route runs; CORS headers alone only hide the answer.
* Form posts: a browser sends ``text/plain`` or form bodies cross-site without
  asking first, so state-changing routes need a JSON body type. Only
  ``curl -d``'s form type is let through, and only without an ``Origin`` (no
  browser sent it), because Ollama's own examples use it.

Accepted bodies are then marked ``application/json``: Ollama parses every body
as JSON whatever its declared type, and so do the routes here.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any
from urllib.parse import urlsplit

from fastapi.responses import JSONResponse

from ember import settings
from ember.server.common import error_body

# Origins always allowed: pages served from this machine, and desktop app shells.
LOCAL_ORIGINS = r"(https?://(localhost|127\.0\.0\.1|\[::1\]|0\.0\.0\.0)(:\d+)?)|(app|tauri|file|vscode-webview)://.*"
_LOCAL_ORIGIN = re.compile(LOCAL_ORIGINS)
JSON_TYPES = ("application/json",)
CURL_FORM = "application/x-www-form-urlencoded"


def _host_name(value: str) -> str:
    """``Host`` header -> lower-case name without port or brackets."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:].partition("]")[0]
    if value.count(":") > 1:  # a bare IPv6 address
        return value
    return value.partition(":")[0].rstrip(".")


def is_loopback(host: str) -> bool:
    """A loopback address or name (``localhost``, ``*.localhost``, 127/8, ::1),
    given without port."""
    host = host.strip().strip("[]").lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_allowed(host_header: str, bind_host: str, extra: list[str]) -> bool:
    """Whether a request for ``Host: host_header`` is served on ``bind_host``."""
    if not is_loopback(bind_host) or "*" in extra:
        return True  # reachable from the network anyway: any name may lead here
    name = _host_name(host_header)
    return not name or is_loopback(name) or name in extra


def origin_allowed(origin: str, host_header: str, allowed: list[str]) -> bool:
    """An allowed origin, a page on this machine, or this server's own pages."""
    origin = origin.strip().rstrip("/")
    if "*" in allowed or origin in allowed or _LOCAL_ORIGIN.fullmatch(origin):
        return True
    parts = urlsplit(origin)
    return parts.scheme in ("http", "https") and bool(parts.netloc) and parts.netloc.lower() == host_header.strip().lower()


def _json_required(method: str, path: str) -> bool:
    return method in ("POST", "PUT", "DELETE", "PATCH") and path.startswith(("/api/", "/v1/")) and not path.startswith("/api/blobs/")


class RequestGuard:
    """Pure ASGI middleware (streams and disconnects pass through untouched):
    the Host, Origin and body-type checks of the module doc, outermost."""

    def __init__(self, app: Any, bind_host: str) -> None:
        self.app = app
        self.bind_host = bind_host
        self.extra_hosts = settings.allowed_hosts()
        self.origins = settings.origins()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, method = scope.get("path", ""), scope.get("method", "")
        headers = {k: v.decode("latin-1") for k, v in scope.get("headers") or []}
        host, origin = headers.get(b"host", ""), headers.get(b"origin")
        problem = None
        if not host_allowed(host, self.bind_host, self.extra_hosts):
            problem = (403, f"host {_host_name(host)[:100]!r} is not allowed on this loopback server; "
                            "add it to EMBER_ALLOWED_HOSTS")
        elif origin is not None and method != "OPTIONS" and not origin_allowed(origin, host, self.origins):
            problem = (403, f"origin {origin[:100]!r} is not allowed; add it to EMBER_ORIGINS")
        elif _json_required(method, path):
            ctype = headers.get(b"content-type", "").partition(";")[0].strip().lower()
            if ctype and not (ctype in JSON_TYPES or ctype.endswith("+json") or (ctype == CURL_FORM and origin is None)):
                problem = (415, f"the request body must be JSON (Content-Type: application/json), not {ctype[:100]!r}")
            else:
                fields = [(k, v) for k, v in scope.get("headers") or [] if k != b"content-type"]
                scope = dict(scope, headers=[*fields, (b"content-type", b"application/json")])
        if problem is not None:
            status, message = problem
            await JSONResponse(error_body(path, message, status), status_code=status)(scope, receive, send)
            return
        await self.app(scope, receive, send)
