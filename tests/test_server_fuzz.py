"""Fuzzing the HTTP API: schemathesis generates requests from /openapi.json
(bounded), plus hand-written malformed bodies. No answer may be a 5xx and the
server must stay up."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from server_fixtures import Server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Server:
    srv = Server(tmp_path_factory.mktemp("fuzz-models"))
    yield srv
    srv.stop()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_generated_requests_never_5xx(server: Server, mode: GenerationMode) -> None:
    """Every operation in /openapi.json, with bodies valid by the schema
    (positive) and violating it (negative)."""
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    # Pull reaches out to the internet (502 when it is unreachable, which it is here).
    ops = [r.ok() for r in schema.exclude(path="/api/pull").get_all_operations()]
    assert len(ops) >= 17
    failures: list[tuple[object, ...]] = []
    for op in ops:

        @given(case=op.as_strategy(generation_mode=mode))
        @settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case: schemathesis.Case) -> None:
            r = case.call(base_url=server.url, timeout=60)
            if r.status_code >= 500 or (r.status_code >= 400 and case.method != "HEAD" and "error" not in r.json()):
                failures.append((case.method, case.path, case.path_parameters, case.body, r.status_code, r.text[:300]))

        try:
            check()
        except Unsatisfiable:  # nothing to get wrong (no parameters, no body)
            assert mode == GenerationMode.NEGATIVE
    assert not failures, failures[:5]
    assert server.alive()


MALFORMED = [
    ("/api/generate", b""),
    ("/api/generate", b"null"),
    ("/api/generate", b"[]"),
    ("/api/generate", b'"just a string"'),
    ("/api/generate", b"{\"model\": \"demo\", \"prompt\": \"x\"" ),
    ("/api/generate", b'{"model": 1e999, "prompt": "x"}'),
    ("/api/generate", b'{"model": "demo", "prompt": "x", "options": {"temperature": NaN}}'),
    ("/api/generate", b'{"model": "demo", "prompt": "x", "options": {"temperature": Infinity}}'),
    ("/api/generate", b'{"model": "demo", "prompt": "x", "options": {"seed": 1e400}}'),
    ("/api/generate", b'{"model": "demo", "prompt": "x", "options": {"num_predict": 99999999999999999999999}}'),
    ("/api/generate", b'{"model": "demo", "prompt": "x", "options": [1, 2]}'),
    ("/api/generate", b'{"model": "demo", "prompt": "x", "keep_alive": "5 fortnights"}'),
    ("/api/generate", b'{"model": "demo", "prompt": "x", "keep_alive": true}'),
    ("/api/generate", b'{"model": "demo", "prompt": "x", "format": {"type": "nonsense"}}'),
    ("/api/generate", b'{"model": "demo", "prompt": "x", "template": "{{ .Broken "}'),
    ("/api/generate", b'{"model": "demo", "prompt": "x", "context": [1e30]}'),
    ("/api/generate", b'{"model": "demo", "prompt": "x", "images": ["aGVsbG8="]}'),
    ("/api/generate", b'{"model": "../../etc/passwd", "prompt": "x"}'),
    ("/api/generate", b'{"model": "' + b"a" * 100000 + b'", "prompt": "x"}'),
    ("/api/generate", b"[" * 5000 + b"]" * 5000),
    ("/api/chat", b'{"model": "demo", "messages": [{"content": "no role"}]}'),
    ("/api/chat", b'{"model": "demo", "messages": [{"role": "user", "content": 5}]}'),
    ("/api/chat", b'{"model": "demo", "messages": [{"role": "user", "content": "x"}], "tools": "all"}'),
    ("/api/embed", b'{"model": "demo", "input": [1, 2, 3]}'),
    ("/api/embed", b'{"model": "demo", "input": "x", "dimensions": -4}'),
    ("/api/create", b'{"model": "m", "files": {"../../evil.gguf": "sha256:00"}}'),
    ("/api/create", b'{"model": "m", "modelfile": "FROM\\n"}'),
    ("/api/create", b'{"model": "m", "modelfile": "PARAMETER temperature hot\\nFROM x"}'),
    ("/api/create", b'{"model": "m", "from": "/dev/zero", "stream": false}'),
    ("/api/create", b'{"model": "m", "from": "/", "stream": false}'),
    ("/api/copy", b'{"source": "", "destination": ""}'),
    ("/api/delete", b'{"model": ":::"}'),
    ("/api/delete", b'{"model": "' + b"x" * 5000 + b'"}'),
    ("/api/show", b'{"model": "' + b"x" * 5000 + b'"}'),
    ("/api/show", b'{"model": "\\u0000"}'),
    ("/api/blobs/sha256:" + "a" * 64, b"some bytes"),
    ("/api/blobs/../../etc", b"x"),
    ("/v1/chat/completions", b'{"model": "demo", "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema"}}'),
    ("/v1/chat/completions", b'{"model": "demo", "messages": [{"role": "user", "content": "x"}], "temperature": "warm"}'),
    ("/v1/chat/completions", b'{"model": "demo", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1e20}'),
    ("/v1/chat/completions", b'{"model": "demo", "messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{not json"}}]}]}'),
    ("/v1/completions", b'{"model": "demo", "prompt": [], "n": 0}'),
    ("/v1/embeddings", b'{"model": "demo", "input": [[999999999]]}'),
    ("/v1/embeddings", b'{"model": "demo", "input": []}'),
]


def test_malformed_bodies_are_4xx(server: Server) -> None:
    with httpx.Client(timeout=120) as client:
        for path, body in MALFORMED:
            method = "DELETE" if path == "/api/delete" else "POST"
            r = client.request(method, server.url + path, content=body, headers={"content-type": "application/json"})
            assert 400 <= r.status_code < 500, (path, body[:200], r.status_code, r.text[:300])
            err = r.json()["error"]
            assert isinstance(err, (str, dict)) and err, (path, r.text)
            assert server.alive(), path
    # an empty conversation with a huge negative keep_alive just loads (forever)
    r = httpx.post(server.url + "/api/chat", content=b'{"model": "demo", "messages": null, "keep_alive": -1e308}', timeout=120)
    assert r.status_code == 200 and r.json()["done_reason"] == "load"
    assert [m["expires_at"][:4] for m in httpx.get(server.url + "/api/ps").json()["models"]] == ["2318"]
    # and a request after all that still works
    r = httpx.post(server.url + "/api/generate", json={"model": "demo", "prompt": "Hi", "stream": False,
                                                       "options": {"num_predict": 2}}, timeout=120)
    assert r.status_code == 200 and json.loads(r.text)["done"] is True
    assert Path(server.log).is_file()
