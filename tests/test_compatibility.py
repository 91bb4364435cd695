"""docs/compatibility.md is the truth about the server: every route the server
answers is listed as served, every endpoint listed as served is answered, and
every request field of every route is in that route's field table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ember.server import create_app

DOC = (Path(__file__).resolve().parent.parent / "docs" / "compatibility.md").read_text()


def _endpoints() -> dict[tuple[str, str], str]:
    table = DOC.split("## Endpoints", 1)[1].split("## ", 1)[0]
    rows = re.findall(r"^\| (GET|HEAD|POST|PUT|DELETE) \| `([^`]+)` \| \w+ \| ([^|]+) \|$", table, re.M)
    return {(m, p): status.strip() for m, p, status in rows}


def _served() -> set[tuple[str, str]]:
    spec = create_app().openapi()
    routes = {(m.upper(), p) for p, ops in spec["paths"].items() for m in ops}
    return routes | {("GET", "/"), ("HEAD", "/")}  # the web page (not in the OpenAPI document)


def _fields(method: str, path: str) -> list[str]:
    spec = create_app().openapi()
    body = spec["paths"][path][method.lower()].get("requestBody", {}).get("content", {}).get("application/json")
    if body is None:
        return []
    name = body["schema"]["$ref"].rsplit("/", 1)[1]
    return list(spec["components"]["schemas"][name].get("properties", {}))


def _section(method: str, path: str) -> str:
    for m in re.finditer(r"^### (.+)$", DOC, re.M):
        if f"`{method} {path}`" in m.group(1):
            return DOC[m.end():].split("\n### ", 1)[0]
    raise AssertionError(f"no field table for {method} {path} in docs/compatibility.md")


def test_every_route_is_listed_as_served_and_nothing_else_is() -> None:
    listed = _endpoints()
    assert len(listed) > 20
    served_listed = {k for k, status in listed.items() if not status.startswith("not served")}
    assert _served() == served_listed


@pytest.mark.parametrize("method,path", sorted(k for k in _served() if k[0] in ("POST", "DELETE")))
def test_every_request_field_is_in_the_routes_table(method: str, path: str) -> None:
    fields = _fields(method, path)
    if not fields:
        pytest.skip("no JSON body")
    section = _section(method, path)
    missing = [f for f in fields if f"| `{f}` |" not in section]
    assert missing == [], f"{method} {path}: fields not in docs/compatibility.md: {missing}"
