"""Pulls with Ollama's registry protocol, against a registry this test runs on
loopback: manifests by tag, blobs by digest behind a redirect to another host
name (a "CDN" that honours Range), an optional Bearer challenge, and fault
knobs (a dropped connection, a stalled transfer, content that does not match
its digest). The blobs are real: the demo GGUF, a template, params and a
system prompt, and for vision a tiny model with a projector."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import ollama
import pytest
from registry_fixtures import without_demo, write_tiny_gguf
from server_fixtures import Server

from ember.demo import demo_model_path
from ember.errors import DownloadError, InvalidNameError, RemoteModelNotFoundError
from ember.registry import ggufmeta, store
from ember.registry.core import resolve
from ember.registry.pull import pull_model
from ember.registry.show import show_model

CHUNK = 1 << 20
TEMPLATE = "{{ if .System }}<sys>{{ .System }}</sys>{{ end }}<user>{{ .Prompt }}</user>"
PARAMS = {"stop": ["<|im_end|>"], "temperature": 0.5, "num_predict": 3}


@dataclass
class Registry:
    """What the loopback registry serves, what it saw, and its fault knobs."""

    blobs: dict[str, Path | bytes] = field(default_factory=dict)
    manifests: dict[tuple[str, str, str], bytes] = field(default_factory=dict)
    log: list[tuple[str, str | None, int]] = field(default_factory=list)  # (path, Range, bytes sent)
    token: str | None = None  # require "Authorization: Bearer <token>" on /v2
    cut_once: dict[str, int] = field(default_factory=dict)  # digest -> bytes before dropping the first connection
    hold_after: dict[str, int] = field(default_factory=dict)  # digest -> total bytes after which sending waits
    release: threading.Event = field(default_factory=threading.Event)
    corrupt: set[str] = field(default_factory=set)  # digests served with one byte changed
    sent: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""

    def add_blob(self, data: Path | bytes) -> dict[str, object]:
        raw = data.read_bytes() if isinstance(data, Path) else data
        digest = "sha256:" + hashlib.sha256(raw).hexdigest()
        self.blobs[digest] = data
        return {"digest": digest, "size": len(raw)}

    def add_model(self, ns: str, model: str, tag: str, layers: list[tuple[str, Path | bytes]]) -> bytes:
        """Register a manifest of (media type suffix, content) layers; returns its bytes."""
        docs = [{"mediaType": f"application/vnd.ollama.image.{kind}", **self.add_blob(data)} for kind, data in layers]
        config = self.add_blob(json.dumps({"model_format": "gguf", "model_family": "gemma3", "model_type": "268.10M",
                                           "file_type": "Q4_K_M", "architecture": "amd64", "os": "linux"}).encode())
        manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                               "config": {"mediaType": "application/vnd.docker.container.image.v1+json", **config},
                               "layers": docs}, indent=2).encode()
        self.manifests[(ns, model, tag)] = manifest
        return manifest

    def served(self, digest: str) -> list[tuple[str | None, int]]:
        return [(rng, n) for path, rng, n in self.log if path == f"/cdn/{digest}"]


def _handler(reg: Registry) -> type[BaseHTTPRequestHandler]:
    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            for k, v in {"Content-Length": str(len(body)), **(headers or {})}.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802
            path = self.path.split("?", 1)[0]
            if path == "/token":
                return self._send(200, json.dumps({"token": reg.token}).encode())
            m = re.fullmatch(r"/v2/([^/]+)/([^/]+)/(manifests|blobs)/(.+)", path)
            if m:
                if reg.token and self.headers.get("Authorization") != f"Bearer {reg.token}":
                    challenge = f'Bearer realm="{reg.url}/token",service="test",scope="repository:{m[1]}/{m[2]}:pull"'
                    return self._send(401, b'{"errors":[{"code":"UNAUTHORIZED"}]}', {"WWW-Authenticate": challenge})
                if m[3] == "manifests":
                    data = reg.manifests.get((m[1], m[2], m[4]))
                    if data is None:
                        return self._send(404, b'{"errors":[{"code":"MANIFEST_UNKNOWN"}]}')
                    return self._send(200, data, {"Content-Type": "application/vnd.docker.distribution.manifest.v2+json"})
                if m[4] not in reg.blobs:
                    return self._send(404)
                cdn = reg.url.replace("127.0.0.1", "localhost")  # another host name: the "direct URL"
                return self._send(307, b"", {"Location": f"{cdn}/cdn/{m[4]}"})
            m = re.fullmatch(r"/cdn/(sha256:[0-9a-f]{64})", path)
            if m and m[1] in reg.blobs:
                return self._blob(m[1])
            self._send(404)

        def _blob(self, digest: str) -> None:
            src = reg.blobs[digest]
            size = src.stat().st_size if isinstance(src, Path) else len(src)
            rng = self.headers.get("Range")
            start, end = 0, size - 1
            if rng:
                a, b = re.fullmatch(r"bytes=(\d+)-(\d*)", rng).groups()  # type: ignore[union-attr]
                start, end = int(a), min(int(b) if b else size - 1, size - 1)
            headers = {"Accept-Ranges": "bytes"}
            if rng:
                headers["Content-Range"] = f"bytes {start}-{end}/{size}"
            self.send_response(206 if rng else 200)
            for k, v in {"Content-Length": str(end - start + 1), **headers}.items():
                self.send_header(k, v)
            self.end_headers()
            with reg.lock:
                cut = reg.cut_once.pop(digest, None)
            sent = 0
            try:
                with (open(src, "rb") if isinstance(src, Path) else _Bytes(src)) as f:
                    while start + sent <= end:
                        f.seek(start + sent)
                        chunk = f.read(min(CHUNK, end + 1 - start - sent))
                        if digest in reg.corrupt and start + sent == 0:
                            chunk = bytes([chunk[0] ^ 1]) + chunk[1:]
                        if cut is not None:
                            chunk = chunk[: cut - sent]
                        with reg.lock:
                            limit = reg.hold_after.get(digest)
                            if limit is not None and not reg.release.is_set():
                                chunk = chunk[: max(0, limit - reg.sent.get(digest, 0))]
                            reg.sent[digest] = reg.sent.get(digest, 0) + len(chunk)
                        if chunk:
                            self.wfile.write(chunk)
                            sent += len(chunk)
                        if cut is not None and sent >= cut:
                            self.close_connection = True
                            return
                        if not chunk:  # held: wait for the test to let it go
                            self.wfile.flush()
                            reg.release.wait(30)
            except (BrokenPipeError, ConnectionResetError):
                pass
            finally:
                with reg.lock:
                    reg.log.append((f"/cdn/{digest}", rng, sent))

    return H


class _Bytes:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def __enter__(self) -> _Bytes:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def seek(self, pos: int) -> None:
        self.pos = pos

    def read(self, n: int) -> bytes:
        out = self.data[self.pos : self.pos + n]
        self.pos += len(out)
        return out


@pytest.fixture
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Registry]:
    reg = Registry()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(reg))
    server.daemon_threads = True
    reg.url = f"http://127.0.0.1:{server.server_address[1]}"
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    monkeypatch.setenv("EMBER_REGISTRY", reg.url)
    monkeypatch.setenv("EMBER_MODELS", str(without_demo(tmp_path / "models")))
    try:
        yield reg
    finally:
        reg.release.set()
        server.shutdown()
        server.server_close()


def demo_model(reg: Registry) -> bytes:
    return reg.add_model("library", "tiny", "latest", [
        ("model", Path(demo_model_path())),
        ("template", TEMPLATE.encode()),
        ("system", b"You are terse."),
        ("params", json.dumps(PARAMS).encode()),
    ])


def small_model(reg: Registry, tmp_path: Path, ns: str = "someone", model: str = "small", tag: str = "v1") -> bytes:
    write_tiny_gguf(tmp_path / f"{model}.gguf", n_tensors=8, rows=256, seed=3)
    return reg.add_model(ns, model, tag, [("model", tmp_path / f"{model}.gguf"), ("params", b'{"top_k":7}')])


def test_pull_library_model_uses_its_layers_and_keeps_the_registry_manifest(registry: Registry) -> None:
    manifest = demo_model(registry)
    events: list[tuple[str, int, int]] = []
    m = pull_model("tiny", progress=lambda d, c, t: events.append((d, c, t)))
    # what was registered: the registry's own manifest bytes, the demo GGUF, the text layers used
    assert m.name == "tiny:latest" and m.digest == "sha256:" + hashlib.sha256(manifest).hexdigest()
    path = store.manifests_dir() / "registry.ollama.ai/library/tiny/latest"
    assert path.read_bytes() == manifest
    assert store.hash_file(m.model_paths[0])[0] == "sha256:" + hashlib.sha256(demo_model_path().read_bytes()).hexdigest()
    assert (m.template, m.system) == (TEMPLATE, "You are terse.")
    assert m.parameters == PARAMS
    # Ollama's progress lines, in Ollama's order
    statuses = [d for d, _, _ in events]
    model_digest = json.loads(manifest)["layers"][0]["digest"]
    assert statuses[0] == "pulling manifest"
    assert statuses[-2:] == ["verifying sha256 digest", "writing manifest"]
    pulling = [e for e in events if e[0].startswith("pulling ") and e[0] != "pulling manifest"]
    assert {d for d, _, _ in pulling} == {f"pulling {x['digest'][7:19]}" for x in [*json.loads(manifest)["layers"], json.loads(manifest)["config"]]}
    size = demo_model_path().stat().st_size
    model_events = [(c, t) for d, c, t in pulling if d == f"pulling {model_digest[7:19]}"]
    assert model_events[-1] == (size, size) and all(t == size for _, t in model_events)
    # parallel ranged downloads from the redirect's host
    ranges = [r for r, _ in registry.served(model_digest)]
    assert len(ranges) >= 4 and all(r and r.startswith("bytes=") for r in ranges)
    assert sum(n for _, n in registry.served(model_digest)) == size
    # the show data, in Ollama's shapes
    d = show_model("tiny").to_json()
    assert d["parameters"].splitlines()[0] == 'stop                           "<|im_end|>"'
    assert d["template"] == TEMPLATE and d["system"] == "You are terse." and d["details"]["parameter_size"] == "268.10M"
    assert d["model_info"]["tokenizer.ggml.tokens"] == [] and "tensors" not in d
    verbose = show_model("tiny", verbose=True).to_json()
    assert len(verbose["model_info"]["tokenizer.ggml.tokens"]) == 262144
    tensors = {t["name"]: t for t in verbose["tensors"]}
    assert len(tensors) == ggufmeta.read_info(demo_model_path()).n_tensors
    assert tensors["token_embd.weight"]["shape"] == [640, 262144] and isinstance(tensors["token_embd.weight"]["type"], str)
    json.dumps(verbose, allow_nan=False)  # valid JSON, no NaN
    # a second pull finds every blob and downloads nothing
    registry.log.clear()
    again: list[str] = []
    pull_model("tiny", progress=lambda d, c, t: again.append(d))
    assert not registry.log and again[0] == "pulling manifest"


def test_interrupted_pull_resumes_where_it_stopped(registry: Registry, tmp_path: Path) -> None:
    """Like Ctrl-C: the progress callback raises halfway; nothing is registered;
    the next pull asks only for the bytes that are missing."""
    manifest = demo_model(registry)
    digest = json.loads(manifest)["layers"][0]["digest"]
    size = demo_model_path().stat().st_size
    registry.hold_after[digest] = size // 2  # the "network" stalls at half until released

    class Stop(Exception):
        pass

    def stop_at_half(desc: str, completed: int, total: int) -> None:
        if desc == f"pulling {digest[7:19]}" and completed >= size // 2:
            registry.release.set()  # let the stalled connections go so the parts can stop
            raise Stop

    with pytest.raises(Stop):
        pull_model("tiny", progress=stop_at_half)
    assert not list(store.iter_manifests()) and not store.has_blob(digest)
    first = list(registry.served(digest))
    registry.log.clear()
    m = pull_model("tiny")
    assert store.hash_file(m.model_paths[0])[0] == digest
    second = registry.served(digest)
    assert 0 < sum(n for _, n in second) <= size - size // 2  # only what was missing
    starts = {int(r.split("=")[1].split("-")[0]) for r, _ in second if r}
    part_starts = {int(r.split("=")[1].split("-")[0]) for r, _ in first if r}
    assert starts - part_starts  # resumed inside parts, not from their beginnings
    assert not list((store.downloads_dir() / "blobs").iterdir())  # the resume state went with the download


def test_dropped_connection_is_resumed_within_the_pull(registry: Registry, tmp_path: Path) -> None:
    manifest = small_model(registry, tmp_path)
    digest = json.loads(manifest)["layers"][0]["digest"]
    registry.cut_once[digest] = 100_000
    m = pull_model("someone/small:v1")
    assert m.name == "someone/small:v1" and m.parameters == {"top_k": 7}
    assert store.hash_file(m.model_paths[0])[0] == digest
    size = (tmp_path / "small.gguf").stat().st_size
    assert registry.served(digest) == [(f"bytes=0-{size - 1}", 100_000), (f"bytes=100000-{size - 1}", size - 100_000)]


def test_wrong_digest_registers_nothing(registry: Registry, tmp_path: Path) -> None:
    manifest = small_model(registry, tmp_path)
    digest = json.loads(manifest)["layers"][0]["digest"]
    registry.corrupt.add(digest)
    with pytest.raises(DownloadError, match="digest mismatch, file must be downloaded again"):
        pull_model("someone/small:v1")
    assert not list(store.iter_manifests()) and not store.has_blob(digest)
    assert not store.blobs_dir().exists() or not list(store.blobs_dir().iterdir())  # no other layer was stored either
    assert not (store.downloads_dir() / "blobs" / (digest.replace(":", "-") + ".partial")).exists()
    registry.corrupt.clear()
    assert pull_model("someone/small:v1").digest  # downloaded again, from the start


def test_missing_tag_and_bad_manifests(registry: Registry, tmp_path: Path) -> None:
    small_model(registry, tmp_path)
    with pytest.raises(RemoteModelNotFoundError, match="^pull model manifest: file does not exist$") as ei:
        pull_model("someone/small:v2")
    assert ei.value.status == 404
    registry.manifests[("library", "evil", "latest")] = json.dumps(
        {"config": {"mediaType": "x", "digest": "sha256:../../etc", "size": 1}, "layers": []}).encode()
    with pytest.raises(DownloadError, match="pull model manifest: not a valid manifest"):
        pull_model("evil")
    registry.manifests[("library", "mlx", "latest")] = json.dumps({"config": {"mediaType": "x", "digest": "sha256:" + "a" * 64, "size": 1},
        "layers": [{"mediaType": "application/vnd.ollama.image.tensor", "digest": "sha256:" + "b" * 64, "size": 1}]}).encode()
    with pytest.raises(DownloadError, match="safetensors"):
        pull_model("mlx")
    assert not list(store.iter_manifests())
    r = subprocess.run([sys.executable, "-m", "ember.cli.main", "pull", "someone/small:v2"],
                       capture_output=True, text=True, env=os.environ.copy(), timeout=60)
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1] == "Error: pull model manifest: file does not exist"


def test_token_challenge_and_cli_progress(registry: Registry, tmp_path: Path) -> None:
    small_model(registry, tmp_path)
    registry.token = "t0ken"
    r = subprocess.run([sys.executable, "-m", "ember.cli.main", "pull", "someone/small:v1"],
                       capture_output=True, text=True, env=os.environ.copy(), timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "success"
    assert "pulling manifest" in r.stderr and "verifying sha256 digest" in r.stderr and "writing manifest" in r.stderr
    assert resolve("someone/small:v1").parameters == {"top_k": 7}


def test_projector_layer_gives_vision(registry: Registry, tmp_path: Path) -> None:
    write_tiny_gguf(tmp_path / "m.gguf", seed=1)
    write_tiny_gguf(tmp_path / "proj.gguf", seed=2, arch="clip", general_type="mmproj")
    registry.add_model("library", "vl", "latest", [("model", tmp_path / "m.gguf"), ("projector", tmp_path / "proj.gguf")])
    m = pull_model("vl")
    assert len(m.projector_paths) == 1 and store.hash_file(m.projector_paths[0])[0] == store.hash_file(tmp_path / "proj.gguf")[0]
    d = show_model("vl")
    assert "vision" in d.capabilities and d.to_json()["projector_info"]["general.architecture"] == "clip"


def test_ollama_client_pull_through_ember_serve(registry: Registry, tmp_path: Path) -> None:
    manifest = demo_model(registry)
    srv = Server(tmp_path / "models", EMBER_REGISTRY=registry.url)
    try:
        oc = srv.ollama_client()
        progress = list(oc.pull("tiny", stream=True))
        statuses = [p.status for p in progress]
        assert statuses[0] == "pulling manifest" and statuses[-3:] == ["verifying sha256 digest", "writing manifest", "success"]
        model = json.loads(manifest)["layers"][0]
        lines = [p for p in progress if p.status == f"pulling {model['digest'][7:19]}"]
        assert lines and lines[-1].total == model["size"] and lines[-1].completed == model["size"]
        assert all(p.digest == model["digest"] for p in lines)  # the whole digest, as Ollama's lines carry it
        for p in progress:  # every blob's lines (the config's too) and no others
            assert (p.digest is not None and p.status == f"pulling {p.digest[7:19]}") == (p.status not in (
                "pulling manifest", "verifying sha256 digest", "writing manifest", "success"))
        assert "tiny:latest" in [m.model for m in oc.list().models]
        r = oc.generate(model="tiny", prompt="The sky is")
        assert r.done and r.eval_count is not None and r.eval_count <= PARAMS["num_predict"]
        with pytest.raises(ollama.ResponseError, match="pull model manifest: file does not exist"):
            list(oc.pull("tiny:nope", stream=True))
        r2 = httpx.post(srv.url + "/api/pull", json={"model": "tiny:nope", "stream": False}, timeout=60)
        assert r2.status_code == 404 and r2.json() == {"error": "pull model manifest: file does not exist"}
    finally:
        srv.stop()


def test_a_name_with_a_host_is_pulled_from_that_host(registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    small_model(registry, tmp_path)
    monkeypatch.setenv("EMBER_REGISTRY", "http://127.0.0.1:9")  # not used: the name says where
    host = registry.url.removeprefix("http://")
    with pytest.raises(InvalidNameError, match="insecure"):
        pull_model(f"http://{host}/someone/small:v1")
    m = pull_model(f"http://{host}/someone/small:v1", insecure=True)
    assert m.name == f"{host}/someone/small:v1" and m.parameters == {"top_k": 7}
    assert resolve(f"{host}/someone/small:v1").digest == m.digest
