"""Pull from an Ollama registry (Ollama's public one by default): the Docker
registry v2 subset that Ollama speaks.

- ``GET {base}/v2/{namespace}/{model}/manifests/{tag}`` gives the manifest
  (404: Ollama's ``pull model manifest: file does not exist``);
- ``GET {base}/v2/{namespace}/{model}/blobs/{digest}`` gives a layer, usually
  through a redirect to another host (a CDN); that direct URL is downloaded
  in parallel ranges (:mod:`ember.registry.download`);
- a 401 with a ``Bearer`` challenge is answered once with an anonymous token
  from the challenge's realm (on the same host only).

Progress follows Ollama line for line: ``pulling manifest``, ``pulling
<12 hex digits>`` per layer with ``total``/``completed``, ``verifying sha256
digest``, ``writing manifest`` (the registry's own bytes, so the model's
digest is the registry's), ``removing unused layers`` when a previous version
left some. Every new blob is hashed before anything is registered: a mismatch
deletes the download and writes no manifest. The template, params, system,
messages, license and projector layers are used as Ollama uses them
(:func:`ember.registry.core.from_manifest`).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from urllib.parse import urlencode, urljoin, urlsplit

import httpx

from ember import settings
from ember.__about__ import __version__
from ember.errors import DigestMismatchError, DownloadError, InvalidFileError, RemoteModelNotFoundError
from ember.progress import BlobLabel, ProgressCallback
from ember.registry import download, store
from ember.registry.names import DEFAULT_HOST, ModelName

MAX_MANIFEST = 4 << 20
MAX_REDIRECTS = 10
# Layers Ember cannot run (Ollama's MLX safetensors models).
UNSUPPORTED_MEDIA = ("application/vnd.ollama.image.tensor",)


def registry_base(name: ModelName, scheme: str = "https") -> str:
    """The registry serving ``name``: ``EMBER_REGISTRY`` for Ollama's default
    host, else the name's own host."""
    if name.host.lower() == DEFAULT_HOST:
        return settings.registry_url()
    return f"{scheme}://{name.host}"


class Registry:
    """One registry repository (``namespace/model``) with its HTTP client."""

    def __init__(self, name: ModelName, base: str) -> None:
        self.name = name
        self.base = base.rstrip("/")
        self.repo_url = f"{self.base}/v2/{name.namespace}/{name.model}"
        self.client = httpx.Client(timeout=download.TIMEOUT, follow_redirects=False,
                                   headers={"User-Agent": f"ember/{__version__}"})
        self.token: str | None = None

    def close(self) -> None:
        self.client.close()

    def _get(self, url: str, **headers: str) -> httpx.Response:
        """GET (streamed; the caller closes it), answering one auth challenge."""
        r = self._send(url, headers)
        if r.status_code == 401:
            r.close()
            self.token = self._anonymous_token(r.headers.get("www-authenticate", ""), url)
            r = self._send(url, headers)
        return r

    def _send(self, url: str, headers: dict[str, str]) -> httpx.Response:
        h = dict(headers)
        if self.token:
            h["Authorization"] = f"Bearer {self.token}"
        try:
            return self.client.send(self.client.build_request("GET", url, headers=h), stream=True)
        except httpx.HTTPError as e:
            raise DownloadError(f"cannot reach the registry at {self.base}: {e} (set EMBER_REGISTRY for a mirror)") from None

    def _anonymous_token(self, challenge: str, url: str) -> str:
        fields = dict(_challenge_fields(challenge))
        realm = fields.pop("realm", "")
        if not realm or urlsplit(realm).netloc != urlsplit(url).netloc:
            raise DownloadError(f"{self.name.display}: the registry at {self.base} requires authorization")
        token = None
        with contextlib.suppress(httpx.HTTPError, ValueError, AttributeError):
            r = self.client.get(realm + ("&" if "?" in realm else "?") + urlencode(fields))
            if r.status_code == 200:
                doc = r.json()
                token = doc.get("token") or doc.get("access_token")
        if not isinstance(token, str) or not token:
            raise DownloadError(f"{self.name.display}: the registry at {self.base} refused access (no token from {realm})")
        return token

    def manifest(self) -> bytes:
        r = self._get(f"{self.repo_url}/manifests/{self.name.tag}", Accept=store.MANIFEST_MEDIA)
        try:
            if r.status_code == 404:
                raise RemoteModelNotFoundError("pull model manifest: file does not exist")
            if r.status_code != 200:
                raise DownloadError(f"pull model manifest: {r.status_code}: {_body_text(r)}")
            data = b""
            for chunk in r.iter_bytes():
                data += chunk
                if len(data) > MAX_MANIFEST:
                    raise DownloadError(f"pull model manifest: larger than {MAX_MANIFEST >> 20} MiB")
            return data
        except httpx.HTTPError as e:
            raise DownloadError(f"pull model manifest: {e}") from None
        finally:
            r.close()

    def blob_url(self, digest: str) -> str:
        """The URL the blob's bytes come from: the registry's own, or the first
        redirect to another host (Ollama's "direct URL")."""
        url = f"{self.repo_url}/blobs/{digest}"
        for _ in range(MAX_REDIRECTS):
            r = self._get(url)
            r.close()
            if r.status_code in (301, 302, 303, 307, 308) and r.headers.get("location"):
                target = urljoin(url, r.headers["location"])
                if urlsplit(target).netloc != urlsplit(url).netloc:
                    return target
                url = target
                continue
            if r.status_code == 200:
                return url
            if r.status_code == 404:
                raise RemoteModelNotFoundError(f"{self.name.display}: blob {digest[7:19]} does not exist at {self.base}")
            raise DownloadError(f"{self.name.display}: blob {digest[7:19]}: the registry answered {r.status_code}")
        raise DownloadError(f"{self.name.display}: blob {digest[7:19]}: more than {MAX_REDIRECTS} redirects")


def _challenge_fields(challenge: str) -> list[tuple[str, str]]:
    """``Bearer realm="...",service="...",scope="..."`` -> its fields."""
    text = challenge.strip()
    if text.lower().startswith("bearer "):
        text = text[7:]
    out = []
    for item in text.split('",'):
        key, _, value = item.partition("=")
        out.append((key.strip(), value.strip().strip('"')))
    return out


def _body_text(r: httpx.Response) -> str:
    with contextlib.suppress(httpx.HTTPError):
        return r.read()[:200].decode("utf-8", "replace").strip()
    return ""


def check_layers(name: ModelName, config: store.Layer, layers: list[store.Layer]) -> None:
    """What a manifest must hold for Ember to run the model."""
    if any(layer.media_type in UNSUPPORTED_MEDIA for layer in layers):
        raise DownloadError(f"{name.display} is a safetensors (MLX) model; ember runs GGUF models")
    if not any(layer.media_type == store.MEDIA_MODEL for layer in layers):
        raise DownloadError(f"{name.display}: the manifest has no model layer")


def pull(name: ModelName, *, scheme: str = "https", progress: ProgressCallback | None = None) -> store.Manifest:
    """Pull ``name`` from its registry and register it; see the module doc."""
    report = progress or (lambda desc, done, total: None)
    reg = Registry(name, registry_base(name, scheme))
    try:
        report("pulling manifest", 0, 0)
        data = reg.manifest()
        try:
            config, layers = store.parse_manifest(data)
        except InvalidFileError as e:
            raise DownloadError(f"pull model manifest: {e}") from None
        check_layers(name, config, layers)
        wanted: dict[str, int] = {}
        for layer in [*layers, config]:
            wanted.setdefault(layer.digest, layer.size)
        fetched: dict[str, Path] = {}
        for digest, size in wanted.items():
            label = BlobLabel(f"pulling {digest[7:19]}", digest)
            if store.has_blob(digest, size):
                report(label, size, size)
                continue
            fetched[digest] = download.fetch(reg.blob_url(digest), digest, size, store.downloads_dir() / "blobs",
                                             label=label, progress=progress)
    finally:
        reg.close()

    report("verifying sha256 digest", 0, 0)
    installed: list[str] = []
    old: store.Manifest | None = None
    try:
        with store.writing():
            for digest, path in fetched.items():
                if not path.exists() and store.has_blob(digest, wanted[digest]):
                    continue  # a concurrent pull of the same blob stored it
                try:
                    store.add_file(path, move=True, expected=digest)
                except DigestMismatchError:
                    download.discard(path)
                    raise DownloadError(
                        f"digest mismatch, file must be downloaded again: layer {digest[7:19]} of {name.display} "
                        "did not match its sha256; nothing was registered"
                    ) from None
                download.discard(path)  # the resume state; the data was moved into blobs/
                installed.append(digest)
            report("writing manifest", 0, 0)
            found = store.find_manifest_path(name)
            with contextlib.suppress(InvalidFileError, OSError):
                old = store.read_manifest(found) if found is not None else None
            store.write_manifest(name, config, layers, data)
    except BaseException:
        store.prune(installed)  # blobs of this failed pull that nothing references
        raise
    if old is not None:
        unused = {old.config.digest, *(layer.digest for layer in old.layers)} - set(wanted)
        if unused:
            report("removing unused layers", 0, 0)
            store.prune(unused)
    found = store.find_manifest_path(name)
    if found is None:  # pragma: no cover - removed by a concurrent rm
        raise DownloadError(f"{name.display} was removed while it was being pulled")
    return store.read_manifest(found)
