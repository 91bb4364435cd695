"""`ember pull` of hub references (hf.co/..., modelscope.cn/...) against a local
HTTP server that serves a folder in the Hugging Face hub's URL layout (tree listing, resolve with X-Repo-Commit/ETag/Range) and
ModelScope's file API, since no hub is reachable here. huggingface_hub itself
does the HF downloads (HF_ENDPOINT points at the server)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

import pytest
from registry_fixtures import snapshot, without_demo, write_tiny_gguf

from ember.errors import DownloadError, InvalidNameError, RemoteModelNotFoundError
from ember.registry import store
from ember.registry.core import resolve
from ember.registry.hub import RemoteFile, _safe_path, select_gguf
from ember.registry.listing import list_models
from ember.registry.names import parse_hub_ref as parse_ref
from ember.registry.pull import pull_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"
LFS_SUFFIXES = (".gguf", ".safetensors", ".bin", ".model")


class Hub:
    """A tiny hub: ``root/{user}/{repo}/...`` files, request log, fault knobs."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.log: list[tuple[str, str, dict[str, str]]] = []
        self.cut_once: dict[str, int] = {}  # path -> bytes to send before dropping the connection (once)
        self.bad_sha: set[str] = set()  # paths whose advertised sha256 is wrong
        self.lock = threading.Lock()

    def files(self, repo: str) -> list[Path]:
        base = self.root / repo
        return sorted(p for p in base.rglob("*") if p.is_file())

    def sha(self, repo: str, path: Path) -> str:
        rel = str(path.relative_to(self.root / repo))
        if rel in self.bad_sha:
            return "f" * 64
        return hashlib.sha256(path.read_bytes()).hexdigest()


def _handler(hub: Hub) -> type[BaseHTTPRequestHandler]:
    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def _json(self, obj: object, status: int = 200, headers: dict[str, str] | None = None) -> None:
            body = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _not_found(self, code: str) -> None:
            self._json({"error": code}, 404, {"X-Error-Code": code, "X-Error-Message": code})

        def do_HEAD(self) -> None:
            self.do_GET()

        def do_GET(self) -> None:
            url = urlparse(self.path)
            path = unquote(url.path)
            with hub.lock:
                hub.log.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))
            m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(/.*)?", path)
            if m:
                repo = m.group(1)
                if not (hub.root / repo).is_dir():
                    return self._not_found("RepoNotFound")
                items = []
                for f in hub.files(repo):
                    rel = str(f.relative_to(hub.root / repo))
                    item = {"type": "file", "path": rel, "size": f.stat().st_size, "oid": hashlib.sha1(f.read_bytes()).hexdigest()}
                    if rel.endswith(LFS_SUFFIXES):
                        item["lfs"] = {"oid": hub.sha(repo, f), "size": f.stat().st_size, "pointerSize": 134}
                    items.append(item)
                return self._json(items)
            m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
            if m:
                return self._file(m.group(1), m.group(3), hf=True)
            m = re.fullmatch(r"/api/v1/models/([^/]+/[^/]+)/repo/files", path)
            if m:
                repo = m.group(1)
                if not (hub.root / repo).is_dir():
                    return self._json({"Code": 404, "Message": "not found"}, 404)
                files = [
                    {"Name": f.name, "Path": str(f.relative_to(hub.root / repo)), "Size": f.stat().st_size,
                     "Sha256": hub.sha(repo, f), "Type": "blob"}
                    for f in hub.files(repo)
                ]
                return self._json({"Code": 200, "Data": {"Files": files}})
            m = re.fullmatch(r"/api/v1/models/([^/]+/[^/]+)/repo", path)
            if m:
                q = parse_qs(url.query)
                return self._file(m.group(1), q["FilePath"][0], hf=False)
            self._not_found("EntryNotFound")

        def _file(self, repo: str, rel: str, hf: bool) -> None:
            f = hub.root / repo / rel
            if not (hub.root / repo).is_dir():
                return self._not_found("RepoNotFound")
            if not f.is_file() or ".." in rel:
                return self._not_found("EntryNotFound")
            data = f.read_bytes()
            start = 0
            rng = self.headers.get("Range")
            if rng:
                start = int(re.match(r"bytes=(\d+)-", rng).group(1))  # type: ignore[union-attr]
            body = data[start:]
            self.send_response(206 if rng else 200)
            if hf:
                self.send_header("X-Repo-Commit", COMMIT)
                etag = hashlib.sha256(data).hexdigest() if rel.endswith(LFS_SUFFIXES) else hashlib.sha1(data).hexdigest()
                self.send_header("ETag", f'"{etag}"')
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(len(body)))
            if rng:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            if self.command == "HEAD":
                return
            cut = None
            with hub.lock:
                if rel in hub.cut_once and not rng:
                    cut = hub.cut_once.pop(rel)
            if cut is not None:
                self.wfile.write(body[:cut])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(2)
                return
            self.wfile.write(body)

    return H


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Hub, str]]:
    h = Hub(tmp_path / "hub")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(h))
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", url)
    monkeypatch.setenv("EMBER_REGISTRY", url)  # serves no Ollama manifests: every Ollama name is missing
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("EMBER_PULL_SOURCE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("EMBER_MODELS", str(without_demo(tmp_path / "models")))
    try:
        yield h, url
    finally:
        server.shutdown()
        server.server_close()


def gguf_repo(h: Hub) -> Path:
    repo = h.root / "acme" / "Tiny-GGUF"
    repo.mkdir(parents=True)
    write_tiny_gguf(repo / "tiny-q4_k_m.gguf", n_tensors=8, rows=512, split_max_tensors=4, seed=1)
    write_tiny_gguf(repo / "tiny-Q8_0.gguf", seed=2)
    write_tiny_gguf(repo / "tiny-IQ4_XS.gguf", seed=3)
    write_tiny_gguf(repo / "mmproj-tiny-f16.gguf", seed=4, arch="clip")
    (repo / "README.md").write_text("# tiny\n")
    return repo


def test_pull_split_quant_with_cli(hub: tuple[Hub, str], tmp_path: Path) -> None:
    h, _url = hub
    repo = gguf_repo(h)
    env = {**os.environ, "HF_TOKEN": "hf_secret_test_token"}
    r = subprocess.run([sys.executable, "-m", "ember.cli.main", "pull", "hf.co/acme/Tiny-GGUF:Q4_K_M"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("success")
    m = resolve("hf.co/acme/tiny-gguf:q4_k_m")
    assert m.name == "hf.co/acme/Tiny-GGUF:Q4_K_M"
    served = [repo / "tiny-q4_k_m-00001-of-00002.gguf", repo / "tiny-q4_k_m-00002-of-00002.gguf"]
    assert [store.hash_file(p)[0] for p in m.model_paths] == [store.hash_file(p)[0] for p in served]
    assert [store.hash_file(p)[0] for p in m.projector_paths] == [store.hash_file(repo / "mmproj-tiny-f16.gguf")[0]]
    # only what was asked for was downloaded, with the token
    got = {unquote(p).rsplit("/", 1)[-1] for method, p, _ in h.log if method == "GET" and "/resolve/" in p}
    assert got == {"tiny-q4_k_m-00001-of-00002.gguf", "tiny-q4_k_m-00002-of-00002.gguf", "mmproj-tiny-f16.gguf"}
    ours = [hdr for _, p, hdr in h.log if "/tree/" in p or "/resolve/" in p]
    assert ours and all(hdr.get("authorization") == "Bearer hf_secret_test_token" for hdr in ours)
    # downloads moved into blobs, staging removed
    assert not list((tmp_path / "models" / "downloads").rglob("*.gguf"))
    listing = subprocess.run([sys.executable, "-m", "ember.cli.main", "list"], capture_output=True, text=True, env=env).stdout
    assert "hf.co/acme/Tiny-GGUF:Q4_K_M" in listing


def test_pull_default_quant_and_only_gguf(hub: tuple[Hub, str]) -> None:
    h, _ = hub
    gguf_repo(h)
    m = pull_model("hf.co/acme/Tiny-GGUF")
    assert m.name == "hf.co/acme/Tiny-GGUF:latest" and len(m.model_paths) == 2  # Q4_K_M by default
    one = h.root / "solo" / "One"
    one.mkdir(parents=True)
    write_tiny_gguf(one / "whatever-f32.gguf", seed=9)
    assert len(pull_model("huggingface.co/solo/One").model_paths) == 1
    iq = pull_model("hf.co/acme/Tiny-GGUF:iq4_xs")  # case-insensitive, IQ4_XS is not Q4_XS
    assert store.hash_file(iq.model_paths[0])[0] == store.hash_file(h.root / "acme/Tiny-GGUF/tiny-IQ4_XS.gguf")[0]


def test_pull_resumes_an_interrupted_download(hub: tuple[Hub, str]) -> None:
    """huggingface_hub writes 10 MiB chunks to DIR/.cache/.../*.incomplete and resumes
    from there with a Range request; a 12 MB file cut after 11 MB shows it."""
    h, _ = hub
    repo = h.root / "acme" / "Big-GGUF"
    repo.mkdir(parents=True)
    write_tiny_gguf(repo / "big-Q8_0.gguf", n_tensors=48, rows=4096, seed=5)
    size = (repo / "big-Q8_0.gguf").stat().st_size
    assert size > 11_000_000
    h.cut_once["big-Q8_0.gguf"] = 11_000_000
    try:
        m = pull_model("hf.co/acme/Big-GGUF:Q8_0")
    except DownloadError:
        m = pull_model("hf.co/acme/Big-GGUF:Q8_0")  # the next pull resumes
    assert store.hash_file(m.model_paths[0])[0] == store.hash_file(repo / "big-Q8_0.gguf")[0]
    ranges = [hdr.get("range") for method, p, hdr in h.log if method == "GET" and p.endswith("big-Q8_0.gguf")]
    assert ranges[0] is None and ranges[-1] == f"bytes={10 * 1024 * 1024}-", ranges


def test_pull_rejects_a_file_that_does_not_match_its_sha256(hub: tuple[Hub, str], tmp_path: Path) -> None:
    h, _ = hub
    gguf_repo(h)
    h.bad_sha.add("tiny-Q8_0.gguf")
    with pytest.raises(DownloadError, match="sha256"):
        pull_model("hf.co/acme/Tiny-GGUF:Q8_0")
    manifests = tmp_path / "models" / "manifests"
    assert not manifests.exists() or not any(p.is_file() for p in manifests.rglob("*"))


def test_pull_errors(hub: tuple[Hub, str], tmp_path: Path) -> None:
    h, _ = hub
    gguf_repo(h)
    before = snapshot(tmp_path / "models")
    with pytest.raises(DownloadError, match=r"no GGUF file for Q5_K_M; available: .*tiny-Q8_0\.gguf"):
        pull_model("hf.co/acme/Tiny-GGUF:Q5_K_M")
    with pytest.raises(DownloadError, match="repository nobody/nothing not found"):
        pull_model("hf.co/nobody/nothing")
    # names without a hub host are Ollama names: pulled from EMBER_REGISTRY (which has none of them)
    with pytest.raises(RemoteModelNotFoundError, match="^pull model manifest: file does not exist$"):
        pull_model("qwen2.5:7b")
    with pytest.raises(RemoteModelNotFoundError):
        pull_model("acme/Tiny-GGUF")
    with pytest.raises(InvalidNameError, match="over plain http without insecure"):
        pull_model("http://example.com/a/b")
    r = subprocess.run([sys.executable, "-m", "ember.cli.main", "pull", "hf.co/acme/Tiny-GGUF:Q5_K_M"],
                       capture_output=True, text=True, env=os.environ.copy(), timeout=120)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("Error: ")
    after = {k: v for k, v in snapshot(tmp_path / "models").items() if not k.startswith("downloads")}
    assert after == before


def test_pull_from_modelscope(hub: tuple[Hub, str], monkeypatch: pytest.MonkeyPatch) -> None:
    h, _ = hub
    repo = gguf_repo(h)
    m = pull_model("modelscope.cn/acme/Tiny-GGUF:Q8_0")
    assert m.name == "modelscope.cn/acme/Tiny-GGUF:Q8_0"
    assert store.hash_file(m.model_paths[0])[0] == store.hash_file(repo / "tiny-Q8_0.gguf")[0]
    assert any("/api/v1/models/acme/Tiny-GGUF/repo" in p for _, p, _ in h.log)
    # EMBER_PULL_SOURCE=modelscope sends hf.co references to ModelScope
    h.log.clear()
    monkeypatch.setenv("EMBER_PULL_SOURCE", "modelscope")
    m2 = pull_model("hf.co/acme/Tiny-GGUF:Q4_K_M")
    assert len(m2.model_paths) == 2
    assert h.log and all(p.startswith("/api/v1/") for _, p, _ in h.log)
    # resume works there too
    h.cut_once["tiny-IQ4_XS.gguf"] = 700
    with pytest.raises(DownloadError, match="run the pull again"):
        pull_model("modelscope.cn/acme/Tiny-GGUF:IQ4_XS")
    m3 = pull_model("modelscope.cn/acme/Tiny-GGUF:IQ4_XS")
    assert store.hash_file(m3.model_paths[0])[0] == store.hash_file(repo / "tiny-IQ4_XS.gguf")[0]
    assert any(hdr.get("range") == "bytes=700-" for _, _, hdr in h.log)


def test_unsafe_paths_from_a_hub_are_ignored() -> None:
    assert _safe_path("a/b-Q4_K_M.gguf") and _safe_path("x.gguf")
    for bad in ("../x.gguf", "a/../../x.gguf", "/etc/x.gguf", "a//b.gguf", "./x.gguf", "C:/x.gguf", "..\\x.gguf", ""):
        assert not _safe_path(bad), bad


def test_select_and_parse_ref() -> None:
    files = [RemoteFile(p, 1, None) for p in [
        "a-Q4_K_M-00002-of-00002.gguf", "a-Q4_K_M-00001-of-00002.gguf", "a-Q4_K_S.gguf", "a-Q4_K.gguf",
        "sub/a-Q6_K.gguf", "mmproj-a-f16.gguf", "mmproj-a-q8_0.gguf", "README.md"]]
    shards, proj = select_gguf(files, "q4_k_m", "r")
    assert [f.path for f in shards] == ["a-Q4_K_M-00001-of-00002.gguf", "a-Q4_K_M-00002-of-00002.gguf"]
    assert [f.path for f in proj] == ["mmproj-a-f16.gguf"]
    assert [f.path for f in select_gguf(files, "Q4_K", "r")[0]] == ["a-Q4_K.gguf"]
    assert [f.path for f in select_gguf(files, "q6_k", "r")[0]] == ["sub/a-Q6_K.gguf"]
    with pytest.raises(DownloadError, match="split in 2 files but the repository has 1"):
        select_gguf([RemoteFile("x-Q8_0-00001-of-00002.gguf", 1, None)], "Q8_0", "r")
    assert parse_ref("https://huggingface.co/u/r:Q8_0").name == "hf.co/u/r:Q8_0"
    assert parse_ref("hf.co/u/r").name == "hf.co/u/r:latest" and parse_ref("hf.co/u/r").source == "hf"
    with pytest.raises(InvalidNameError, match="use hf.co/USER/REPO"):
        parse_ref("u/r")  # an Ollama name now, not a hub reference
    with pytest.raises(InvalidNameError):
        parse_ref("hf.co/u/../r")
    with pytest.raises(InvalidNameError, match="empty quantization"):
        parse_ref("hf.co/u/r:")


def test_pull_safetensors_repo_converts(hub: tuple[Hub, str]) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("llama_cpp")
    from convert_fixtures import LLAMA3_RE, SPECIALS_LLAMA3, make_bpe_tokenizer, pad_vocab

    h, _ = hub
    d = h.root / "acme" / "tiny-llama"
    tok = make_bpe_tokenizer(d, LLAMA3_RE, SPECIALS_LLAMA3, bos="<|begin_of_text|>", eos="<|eot_id|>")
    cfg = transformers.LlamaConfig(
        vocab_size=pad_vocab(len(tok)), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)
    (d / "modeling_evil.py").write_text("raise SystemExit('never downloaded')\n")
    m = pull_model("hf.co/acme/tiny-llama")
    assert m.name == "hf.co/acme/tiny-llama:latest" and len(m.model_paths) == 1
    from ember.registry import ggufmeta

    info = ggufmeta.read_info(m.model_paths[0])
    assert info.architecture == "llama" and info.n_tensors > 0
    fetched = {unquote(p).rsplit("/", 1)[-1] for method, p, _ in h.log if method == "GET" and "/resolve/" in p}
    assert "model.safetensors" in fetched and "config.json" in fetched and "modeling_evil.py" not in fetched


def test_create_from_hub_reference_pulls_it_first(hub: tuple[Hub, str]) -> None:
    """Like Ollama: FROM a hub model that is not here yet pulls it, then builds on it."""
    from ember.registry.create import create_model

    h, _ = hub
    repo = gguf_repo(h)
    m = create_model("mine", "FROM hf.co/acme/Tiny-GGUF:Q8_0\nSYSTEM custom\n")
    assert m.system == "custom"
    assert store.hash_file(m.model_paths[0])[0] == store.hash_file(repo / "tiny-Q8_0.gguf")[0]
    assert {e.name for e in list_models()} == {"mine:latest", "hf.co/acme/Tiny-GGUF:Q8_0"}
    n_get = len(h.log)
    create_model("mine2", "FROM hf.co/acme/tiny-gguf:q8_0\n")  # already here: no download
    assert len(h.log) == n_get
