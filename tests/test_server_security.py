"""Attacks on `ember serve` by untrusted clients (issue 13): server paths,
DNS rebinding and cross-site requests, far-future keep_alive, slow clients,
oversized names, dropped uploads and leftovers of killed creates. Each test is
named after its attack; a real server on a loopback port."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from gguf_fixtures import write_tiny_gguf
from server_fixtures import Server, create, upload

from ember.demo import demo_model_path

EVIL = "https://evil.example"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("security-models"), EMBER_ALLOWED_HOSTS="proxy.internal",
                 EMBER_HEADER_TIMEOUT="1", EMBER_NUM_PARALLEL="1")
    try:
        create(srv.url, "small", f"FROM {demo_model_path()}\nPARAMETER num_ctx 128\n")
        yield srv
    finally:
        srv.stop()


def names(server: Server) -> list[str]:
    return [m["name"] for m in httpx.get(server.url + "/api/tags", timeout=30).json()["models"]]


# --- 8: remote clients name models, never paths on the server -----------------------------------
@pytest.fixture(scope="module")
def server_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Files that exist on the server's machine, each with a twin path of the
    same length that does not: the answers must not tell them apart."""
    d = tmp_path_factory.mktemp("server-side")
    write_tiny_gguf(d / "exists.gguf")
    (d / "exists.txt").write_text("root:x:0:0\n")
    ckpt = d / "exists"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (ckpt / "model.safetensors").write_bytes(b"\0" * 16)
    return {"gguf": d / "exists.gguf", "text": d / "exists.txt", "folder": ckpt}


def _twin(path: Path) -> Path:
    return path.with_name(path.name.replace("exists", "absent"))


def _answers(server: Server, route: str, body_of: object, path: Path) -> tuple[tuple[int, str], tuple[int, str]]:
    """The answers for an existing path and its missing twin, with the path
    itself made the same in both messages."""
    out = []
    for p in (path, _twin(path)):
        body = body_of(str(p))  # type: ignore[operator]
        r = httpx.post(server.url + route, json=body, timeout=60)
        text = r.text.replace("absent", "exists")
        out.append((r.status_code, text))
    return out[0], out[1]


USE_ROUTES = [
    ("/api/show", lambda p: {"model": p}),
    ("/api/generate", lambda p: {"model": p, "prompt": "hi", "stream": False}),
    ("/api/chat", lambda p: {"model": p, "messages": [{"role": "user", "content": "hi"}], "stream": False}),
    ("/api/embed", lambda p: {"model": p, "input": "hi"}),
    ("/api/embeddings", lambda p: {"model": p, "prompt": "hi"}),
    ("/v1/chat/completions", lambda p: {"model": p, "messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/completions", lambda p: {"model": p, "prompt": "hi"}),
    ("/v1/embeddings", lambda p: {"model": p, "input": "hi"}),
]
CREATE_FORMS = [
    lambda p: {"model": "stolen", "from": p, "stream": False},
    lambda p: {"model": "stolen", "modelfile": f"FROM {p}\n", "stream": False},
    lambda p: {"model": "stolen", "modelfile": f"FROM demo\nADAPTER {p}\n", "stream": False},
    lambda p: {"model": "stolen", "from": "demo", "adapters": {"lora.gguf": p}, "stream": False},
    lambda p: {"model": "stolen", "files": {"model.gguf": p}, "stream": False},
]


@pytest.mark.parametrize("route,body_of", USE_ROUTES, ids=[r for r, _ in USE_ROUTES])
@pytest.mark.parametrize("kind", ["gguf", "text", "folder"])
def test_server_path_as_model_is_not_found_and_no_existence_oracle(server: Server, server_files: dict[str, Path],
                                                                    route: str, body_of: object, kind: str) -> None:
    """`/api/show {"model": "/etc/shadow"}` answered 400 "not a GGUF" but 404 for
    a missing file, and /api/generate loaded any GGUF on the disk."""
    existing, missing = _answers(server, route, body_of, server_files[kind])
    assert existing == missing
    assert existing[0] in (400, 404), existing
    assert not any(str(server_files[kind].parent) in m["name"] for m in server.ps())


@pytest.mark.parametrize("form", range(len(CREATE_FORMS)))
@pytest.mark.parametrize("kind", ["gguf", "text", "folder"])
def test_create_from_server_paths_is_refused_alike(server: Server, server_files: dict[str, Path], form: int, kind: str) -> None:
    """/api/create took server paths in from, FROM, ADAPTER (and started
    conversions of server folders): only names and uploaded blobs now."""
    existing, missing = _answers(server, "/api/create", CREATE_FORMS[form], server_files[kind])
    assert existing == missing
    assert 400 <= existing[0] < 500, existing
    assert "stolen:latest" not in names(server)


def test_create_from_an_uploaded_blob_reference_works(server: Server, tmp_path: Path) -> None:
    """What stays allowed: a file uploaded as a blob and named by digest
    (``FROM @sha256:...``, as Ollama's clients sent it)."""
    write_tiny_gguf(tmp_path / "tiny.gguf")
    digest = upload(server.url, tmp_path / "tiny.gguf")
    r = httpx.post(server.url + "/api/create", json={"model": "uploaded", "modelfile": f"FROM @{digest}\n", "stream": False}, timeout=60)
    assert r.status_code == 200, r.text
    missing = "sha256:" + "1" * 64
    r = httpx.post(server.url + "/api/create", json={"model": "nope", "modelfile": f"FROM @{missing}\n", "stream": False}, timeout=60)
    assert r.status_code == 400 and "POST /api/blobs" in r.json()["error"]


# --- 9: DNS rebinding, cross-site requests -----------------------------------------------------------
@pytest.mark.parametrize("host", ["evil.example", "evil.example:11434", "192.168.1.20", "[2001:db8::1]:80"])
def test_dns_rebinding_host_is_refused(server: Server, host: str) -> None:
    for method, path in (("GET", "/api/tags"), ("GET", "/api/version"), ("GET", "/"), ("POST", "/api/show")):
        r = httpx.request(method, server.url + path, headers={"Host": host}, json={"model": "small"}, timeout=30)
        assert r.status_code == 403 and "EMBER_ALLOWED_HOSTS" in r.json()["error"], (method, path, r.text)


@pytest.mark.parametrize("host", ["localhost", "localhost:8080", "127.0.0.1", "127.0.0.2:1", "[::1]:11434", "app.localhost",
                                  "proxy.internal", "PROXY.internal:443"])
def test_loopback_and_allowed_host_names_are_served(server: Server, host: str) -> None:
    assert httpx.get(server.url + "/api/tags", headers={"Host": host}, timeout=30).status_code == 200


def test_cross_origin_request_is_refused_before_it_runs(server: Server) -> None:
    """A page on another site POSTed to /api/copy and /api/create, and they ran."""
    headers = {"Origin": EVIL, "Content-Type": "application/json"}
    r = httpx.post(server.url + "/api/copy", headers=headers, json={"source": "small", "destination": "xsite"}, timeout=30)
    assert r.status_code == 403 and "EMBER_ORIGINS" in r.json()["error"]
    assert httpx.get(server.url + "/api/tags", headers={"Origin": EVIL}, timeout=30).status_code == 403
    assert "xsite:latest" not in names(server)
    # allowed: pages on this machine and the server's own page
    for origin in ("http://localhost:5173", server.url):
        assert httpx.get(server.url + "/api/tags", headers={"Origin": origin}, timeout=30).status_code == 200


@pytest.mark.parametrize("ctype", ["text/plain", "text/plain;charset=UTF-8", "multipart/form-data; boundary=x"])
@pytest.mark.parametrize("origin", [None, EVIL, "http://localhost:3000"])
def test_cross_site_text_plain_post_does_not_run(server: Server, ctype: str, origin: str | None) -> None:
    """A browser sends text/plain and form bodies cross-site without a
    preflight; they were parsed as JSON and a model appeared."""
    headers = {"Content-Type": ctype, **({"Origin": origin} if origin else {})}
    copy = json.dumps({"source": "small", "destination": "formcopy"})
    r = httpx.post(server.url + "/api/copy", headers=headers, content=copy, timeout=30)
    assert r.status_code in (403, 415), r.text
    create_body = json.dumps({"model": "formmade", "from": "small", "stream": False})
    assert httpx.post(server.url + "/api/create", headers=headers, content=create_body, timeout=30).status_code in (403, 415)
    found = names(server)
    assert "formcopy:latest" not in found and "formmade:latest" not in found


def test_curl_form_body_without_origin_still_works(server: Server) -> None:
    """Ollama's documented `curl -d '{...}'` sends a form content type; no
    browser is involved (no Origin), so it keeps working. The JSON clients too."""
    r = httpx.post(server.url + "/api/show", content=json.dumps({"model": "small"}),
                   headers={"Content-Type": "application/x-www-form-urlencoded"}, timeout=30)
    assert r.status_code == 200, r.text
    r = httpx.post(server.url + "/api/show", content=json.dumps({"model": "small"}),
                   headers={"Content-Type": "application/x-www-form-urlencoded", "Origin": "http://localhost:3000"}, timeout=30)
    assert r.status_code == 415
    assert server.ollama_client().show("small").details.family == "gemma3"


# --- 11: far-future keep_alive ---------------------------------------------------------------------------
@pytest.mark.parametrize("keep_alive", [1e308, 1e15, 10**30, "2562047h"])
def test_far_future_keep_alive_never_breaks_ps(server: Server, keep_alive: object) -> None:
    """keep_alive 1e308 made /api/ps (and `ember ps`) answer 500 until the model unloaded."""
    r = httpx.post(server.url + "/api/generate", json={"model": "small", "prompt": "", "keep_alive": keep_alive}, timeout=120)
    assert r.status_code == 200, r.text
    ps = httpx.get(server.url + "/api/ps", timeout=30)
    assert ps.status_code == 200, ps.text
    (m,) = [m for m in ps.json()["models"] if m["name"] == "small:latest"]
    assert "2318" <= m["expires_at"][:4] <= "2320"  # Go's longest duration: about 292 years
    cli = subprocess.run([sys.executable, "-m", "ember.cli.main", "ps"], env=dict(server.env), capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0 and "small:latest" in cli.stdout, cli.stdout + cli.stderr


@pytest.mark.parametrize("keep_alive", ["99999999h", "2562048h", "1e308", "-99999999h"])
def test_keep_alive_past_gos_duration_range_is_refused(server: Server, keep_alive: str) -> None:
    r = httpx.post(server.url + "/api/generate", json={"model": "small", "prompt": "", "keep_alive": keep_alive}, timeout=120)
    assert r.status_code == 400 and "invalid duration" in r.json()["error"], r.text


# --- 7: slow clients -------------------------------------------------------------------------------------
def _closed_within(sock: socket.socket, seconds: float, trickle: bytes = b"") -> bool:
    """Whether the server closes ``sock`` within ``seconds`` while the client
    sends ``trickle`` one byte at a time."""
    sock.settimeout(0.2)
    deadline = time.monotonic() + seconds
    i = 0
    while time.monotonic() < deadline:
        try:
            if trickle:
                sock.send(trickle[i % len(trickle):i % len(trickle) + 1])
                i += 1
            if sock.recv(4096) == b"":
                return True
        except TimeoutError:
            continue
        except OSError:  # reset, broken pipe: closed
            return True
    return False


@pytest.mark.parametrize("start", [b"", b"GET /api/version HTTP/1.1\r\nHost: 127.0.0.1\r\n", b"POST /api/ge"])
def test_slowloris_connection_is_closed(server: Server, start: bytes) -> None:
    """A client sending its request head a byte at a time (or nothing) held a
    connection forever. EMBER_HEADER_TIMEOUT=1 here: closed well within 10x,
    and the server answers others meanwhile."""
    socks = []
    try:
        for _ in range(3):
            s = socket.create_connection(("127.0.0.1", server.port))
            s.sendall(start)
            socks.append(s)
        assert httpx.get(server.url + "/api/version", timeout=10).status_code == 200
        assert _closed_within(socks[0], 10.0, trickle=b"X-Slow: 1\r\n" if start else b"")
        assert all(_closed_within(s, 10.0) for s in socks[1:])
        assert httpx.get(server.url + "/api/version", timeout=10).status_code == 200
    finally:
        for s in socks:
            s.close()


@pytest.mark.parametrize("path,ctype", [("/api/show", "application/json"), ("/api/blobs/sha256:" + "3" * 64, "application/octet-stream")])
def test_stalled_request_body_connection_is_closed(server: Server, path: str, ctype: str) -> None:
    """A slow POST: headers, a little of the body, then nothing, forever."""
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {ctype}\r\nContent-Length: 1000\r\n\r\n".encode()
                  + b'{"model"')
        assert httpx.get(server.url + "/api/version", timeout=10).status_code == 200
        assert _closed_within(s, 10.0)
    assert "Traceback" not in server.log.read_text(errors="replace")


def test_slow_but_steady_body_is_served(server: Server) -> None:
    """The body deadline is a pause, not a total: a body sent a byte at a
    time, each well within EMBER_HEADER_TIMEOUT, is answered."""
    body = json.dumps({"model": "small"}).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(f"POST /api/show HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode())
        for i in range(len(body)):  # 18 bytes, 0.2 s apart: longer in all than the 1 s deadline
            s.sendall(body[i:i + 1])
            time.sleep(0.2)
        s.settimeout(30)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]


def test_kept_alive_connection_still_serves_requests(server: Server) -> None:
    """The head deadline counts from a request's first byte: a kept-alive
    connection that sends whole requests is served request after request."""
    with httpx.Client(base_url=server.url, timeout=10) as c:
        for _ in range(3):
            assert c.get("/api/version").status_code == 200
            time.sleep(0.6)  # idle between requests, within uvicorn's keep-alive


# --- 12: unhandled errors and leftovers --------------------------------------------------------------
@pytest.mark.parametrize("value", ["a" * 5000, "/" + "a" * 5000, "a/" * 2500, "hf.co/" + "a" * 5000])
def test_5000_character_names_are_clean_4xx(server: Server, value: str) -> None:
    """`from` of 5,000 characters answered 500 (File name too long)."""
    for route, body in (("/api/create", {"model": "long", "from": value, "stream": False}),
                        ("/api/create", {"model": "long", "modelfile": f"FROM {value}\n", "stream": False}),
                        ("/api/create", {"model": "long", "from": "@" + value, "stream": False}),
                        ("/api/show", {"model": value}),
                        ("/api/generate", {"model": value, "prompt": "x", "stream": False}),
                        ("/api/copy", {"source": value, "destination": "x"}),
                        ("/api/delete", {"model": value})):
        r = httpx.request("DELETE" if route == "/api/delete" else "POST", server.url + route, json=body, timeout=60)
        assert 400 <= r.status_code < 500, (route, r.status_code, r.text[:300])
        assert "error" in r.json() and len(r.text) < 1000  # one short line, not the name back


def _partials(models: Path) -> list[Path]:
    return [p for p in (models / "blobs").glob(".partial-*")] + list((models / "tmp").glob("*")) if models.is_dir() else []


def test_client_disconnect_during_blob_upload_is_quiet_and_leaves_no_file(server: Server) -> None:
    """A client dropping its POST /api/blobs logged an "unexpected error" traceback."""
    digest = "sha256:" + "2" * 64
    for _ in range(2):
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            s.sendall(f"POST /api/blobs/{digest} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/octet-stream\r\n"
                      f"Content-Length: 50000000\r\n\r\n".encode() + b"\0" * 300_000)
            time.sleep(0.3)
    deadline = time.monotonic() + 30
    while _partials(server.models_dir) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _partials(server.models_dir)
    assert httpx.head(f"{server.url}/api/blobs/{digest}").status_code == 404
    assert httpx.get(server.url + "/api/version", timeout=10).status_code == 200
    log = server.log.read_text(errors="replace")
    assert "unexpected error" not in log and "Traceback" not in log, log[-3000:]


KILLED_CREATE = """
import os, signal
from ember.registry import derive, store
tmp = store.temp_blob()
tmp.write_bytes(b"half a model")
held = derive.work_dir()  # entered, never left: killed inside
work = held.__enter__()
(work / "converted.gguf").write_bytes(b"half a conversion")
print(tmp, work, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_leftovers_of_a_killed_create_are_removed_at_server_start(tmp_path: Path) -> None:
    """Temporary blobs and work folders of a killed create stayed for an hour."""
    models = tmp_path / "models"
    env = {**os.environ, "EMBER_MODELS": str(models)}
    p = subprocess.run([sys.executable, "-c", KILLED_CREATE], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == -signal.SIGKILL, p.stderr
    left = [Path(x) for x in p.stdout.split()]
    assert left and all(x.exists() for x in left)
    srv = Server(models)
    try:
        deadline = time.monotonic() + 30
        while any(x.exists() for x in left) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(x.exists() for x in left)
        # killed while this server runs: a successful create cleans up after it
        p = subprocess.run([sys.executable, "-c", KILLED_CREATE], env=env, capture_output=True, text=True, timeout=60)
        left = [Path(x) for x in p.stdout.split()]
        assert left and all(x.exists() for x in left)
        create(srv.url, "again", f"FROM {demo_model_path()}\n")
        assert not any(x.exists() for x in left)
    finally:
        srv.stop()
