"""Content-addressed storage in Ollama's layout under ``$EMBER_MODELS``.

``blobs/sha256-<hex>`` hold layers (GGUF files, template text, params JSON...),
``manifests/<host>/<namespace>/<model>/<tag>`` hold Ollama's JSON manifests.

Crash safety: a blob is copied to a temporary file in ``blobs/`` while it is
hashed, checked against the expected digest, fsynced and only then renamed to
its final name; the manifest is written (atomically) after every blob it names
exists. A killed ``create`` therefore leaves at most a stray temporary file or
an unreferenced blob, never a manifest that points at a missing or partial blob.

Pruning vs. concurrent writers: a create or pull holds a *shared* ``flock``
on ``.lock`` from its first blob write to its manifest write; pruning needs the
*exclusive* lock and is skipped (not waited for) while any writer runs, so it
never removes a blob that a running create is about to reference (the kernel
drops the lock of a killed process). Pruning removes at once the layers of the
manifest just deleted or replaced that nothing else references, and the
temporary files and work folders of processes that no longer exist (their
names carry the writer's host and process id: a killed create); other
unreferenced files (blobs uploaded through the API for a create still to come,
temporary files of live or foreign processes) only once they are an hour old,
so a client's upload-then-create is never raced. Where ``fcntl`` is missing
(Windows) only those candidates and files older than a day go.

Downloads of a pull (``downloads/``) are kept between runs so a pull resumes;
pruning removes those untouched for a week.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ember import settings
from ember.errors import DigestMismatchError, InvalidFileError
from ember.fsutil import atomic_write_bytes, link_or_copy, open_regular
from ember.progress import ProgressCallback
from ember.registry.names import ModelName

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

MANIFEST_MEDIA = "application/vnd.docker.distribution.manifest.v2+json"
CONFIG_MEDIA = "application/vnd.docker.container.image.v1+json"
MEDIA_MODEL = "application/vnd.ollama.image.model"
MEDIA_ADAPTER = "application/vnd.ollama.image.adapter"
MEDIA_PROJECTOR = "application/vnd.ollama.image.projector"
MEDIA_TEMPLATE = "application/vnd.ollama.image.template"
MEDIA_SYSTEM = "application/vnd.ollama.image.system"
MEDIA_PARAMS = "application/vnd.ollama.image.params"
MEDIA_MESSAGES = "application/vnd.ollama.image.messages"
MEDIA_LICENSE = "application/vnd.ollama.image.license"
# In a registry where the demo model was offered once (ember.registry.bundled).
OFFERED_MARKER = ".demo-offered"

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_CHUNK = 4 << 20
TMP_PREFIX = ".partial-"
# Temporary names: .partial-<host hash>-<pid>-<random>, so pruning can tell a
# killed writer's leftovers (same host, process gone) from a live one's.
_OWNED = re.compile(r"\.partial-([0-9a-f]{8})-(\d+)-")
GRACE_S = 3600.0
UNLOCKED_GRACE_S = 24 * 3600
DOWNLOAD_GRACE_S = 7 * 24 * 3600


@dataclass(frozen=True)
class Layer:
    media_type: str
    digest: str
    size: int

    def to_json(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


@dataclass
class Manifest:
    config: Layer
    layers: list[Layer]
    digest: str  # sha256 of the manifest file's bytes
    path: Path
    name: ModelName
    mtime: float

    def of_type(self, media_type: str) -> list[Layer]:
        return [layer for layer in self.layers if layer.media_type == media_type]


def root() -> Path:
    return settings.models_dir()


def blobs_dir() -> Path:
    return root() / "blobs"


def manifests_dir() -> Path:
    return root() / "manifests"


def blob_path(digest: str) -> Path:
    if not _DIGEST.fullmatch(digest):
        raise InvalidFileError(f"invalid digest {digest[:80]!r}: expected sha256:<64 hex digits>")
    return blobs_dir() / digest.replace(":", "-")


def _hash_file(path: Path, label: str, progress: ProgressCallback | None) -> tuple[str, int]:
    h = hashlib.sha256()
    total = path.stat().st_size
    done = 0
    with open_regular(path) as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            done += len(chunk)
            if progress:
                progress(label, done, total)
    if progress:
        progress(label, total, total)
    return "sha256:" + h.hexdigest(), done


def hash_file(path: Path, progress: ProgressCallback | None = None) -> tuple[str, int]:
    return _hash_file(path, f"hashing {path.name}", progress)


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def temp_prefix() -> str:
    """Prefix of this process's temporary blobs and work folders."""
    return f"{TMP_PREFIX}{_host_tag()}-{os.getpid()}-"


def _orphaned(name: str) -> bool:
    """True when ``name`` is a temporary file of a process on this host that
    no longer exists (a killed create or pull)."""
    m = _OWNED.match(name)
    if m is None or fcntl is None or m.group(1) != _host_tag():
        return False  # no owner recorded, another host, or Windows (os.kill would terminate)
    try:
        os.kill(int(m.group(2)), 0)
    except ProcessLookupError:
        return True
    except (OSError, OverflowError):
        return False
    return False


def has_blob(digest: str, size: int | None = None) -> bool:
    p = blob_path(digest)
    try:
        st = p.stat()
    except FileNotFoundError:
        return False
    return size is None or st.st_size == size


def temp_blob() -> Path:
    """A new empty temporary file in ``blobs/`` (install it with :func:`install`)."""
    d = blobs_dir()
    d.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(), suffix=".tmp", dir=d)
    os.close(fd)
    return Path(tmp)


def install(tmp: Path, digest: str) -> None:
    """Rename a complete, verified temporary blob to its final name (fsynced)."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, blob_path(digest))
    with contextlib.suppress(OSError):
        fd = os.open(blobs_dir(), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def add_file(path: Path, progress: ProgressCallback | None = None, *, move: bool = False,
             expected: str | None = None) -> tuple[str, int]:
    """Store a file as a blob; return (digest, size).

    The file is hashed first so an identical blob is not written twice; a
    missing blob is then copied while hashed again, and the copy is installed
    only if both hashes agree (the source did not change underneath us).
    ``move=True`` renames the file into place instead of copying (same file
    system: downloads and conversions). ``expected`` is a digest the content
    must have (a pull's advertised sha256): :class:`DigestMismatchError`
    otherwise, and nothing is stored.
    """
    digest, size = hash_file(path, progress)
    if expected and digest != expected:
        raise DigestMismatchError(
            f"{path}: sha256 {digest[7:19]}... does not match the expected {expected[7:19]}...", expected, digest
        )
    if has_blob(digest, size):
        if move:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        return digest, size
    tmp = temp_blob()
    try:
        if move:
            os.replace(path, tmp)
        else:
            h = hashlib.sha256()
            label = f"copying {path.name}"
            done = 0
            with open_regular(path) as src, open(tmp, "wb") as dst:
                while chunk := src.read(_CHUNK):
                    h.update(chunk)
                    dst.write(chunk)
                    done += len(chunk)
                    if progress:
                        progress(label, done, size)
            if "sha256:" + h.hexdigest() != digest:
                raise InvalidFileError(f"{path} changed while it was being stored; try again")
        install(tmp, digest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return digest, size


def add_known_file(path: Path, digest: str) -> int:
    """Store a file whose digest is already known and verified (the demo
    model, checked by its package) without reading it: a hard link, reflink
    or copy into a temporary blob, then renamed. Returns the size."""
    size = path.stat().st_size
    if has_blob(digest, size):
        return size
    tmp = temp_blob()
    try:
        tmp.unlink()
        link_or_copy(path, tmp)
        if tmp.stat().st_size != size:
            raise InvalidFileError(f"{path} changed while it was being stored; try again")
        install(tmp, digest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return size


def add_bytes(data: bytes) -> tuple[str, int]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    if has_blob(digest, len(data)):
        return digest, len(data)
    tmp = temp_blob()
    try:
        tmp.write_bytes(data)
        install(tmp, digest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return digest, len(data)


def add_json(value: Any) -> tuple[str, int]:
    return add_bytes(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode())


def read_blob_text(digest: str) -> str:
    return blob_path(digest).read_text(encoding="utf-8")


def read_blob_json(digest: str) -> Any:
    return json.loads(blob_path(digest).read_bytes())


def verify_blob(digest: str) -> bool:
    """True when the blob exists and its content hashes to its name."""
    p = blob_path(digest)
    if not p.is_file():
        return False
    return _hash_file(p, "", None)[0] == digest


# ---------------------------------------------------------------- manifests


def manifest_bytes(config: Layer, layers: list[Layer]) -> bytes:
    doc = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA,
        "config": config.to_json(),
        "layers": [layer.to_json() for layer in layers],
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def write_manifest(name: ModelName, config: Layer, layers: list[Layer], data: bytes | None = None) -> str:
    """Write a manifest after checking every blob it names exists with its size;
    return its digest. ``data`` is the manifest's text when it came from a
    registry (kept byte for byte, so its digest is the registry's).

    Any other spelling of the same name (names are case-insensitive) is
    removed afterwards, so one name has one manifest.
    """
    for layer in [config, *layers]:
        if not has_blob(layer.digest, layer.size):
            raise InvalidFileError(f"blob {layer.digest} is missing or incomplete; create the model again")
    if data is None:
        data = manifest_bytes(config, layers)
    existing = find_manifest_path(name)
    path = manifests_dir() / name.manifest_relpath()
    atomic_write_bytes(path, data)
    if existing is not None and existing != path:
        with contextlib.suppress(FileNotFoundError):
            existing.unlink()
        _remove_empty_dirs(existing.parent)
    return "sha256:" + hashlib.sha256(data).hexdigest()


def find_manifest_path(name: ModelName) -> Path | None:
    """The manifest file for ``name``, matching every part case-insensitively."""
    d = manifests_dir()
    exact = d / name.manifest_relpath()
    if exact.is_file():
        return exact
    cur = d
    for part in name.parts():
        if not cur.is_dir():
            return None
        match = None
        with contextlib.suppress(OSError):
            for entry in cur.iterdir():
                if entry.name.lower() == part.lower():
                    match = entry
                    break
        if match is None:
            return None
        cur = match
    return cur if cur.is_file() else None


def read_manifest(path: Path) -> Manifest:
    data = path.read_bytes()
    rel = path.relative_to(manifests_dir()).parts
    name = ModelName(*rel) if len(rel) == 4 else ModelName("?", "?", "?", "?")
    try:
        config, layers = parse_manifest(data)
    except InvalidFileError as e:
        raise InvalidFileError(f"manifest {path} is damaged ({e}); remove the model with 'ember rm' and create it again") from None
    return Manifest(config, layers, "sha256:" + hashlib.sha256(data).hexdigest(), path, name, path.stat().st_mtime)


def parse_manifest(data: bytes) -> tuple[Layer, list[Layer]]:
    """(config, layers) of a manifest's JSON; every digest is checked for its
    form (a digest becomes a file name) and every size for its type."""
    try:
        doc = json.loads(data)
        config = _layer(doc["config"])
        layers = [_layer(x) for x in doc.get("layers") or []]
    except (ValueError, KeyError, TypeError, AttributeError, InvalidFileError) as e:
        raise InvalidFileError(f"not a valid manifest ({type(e).__name__}: {e})") from None
    return config, layers


def _layer(x: dict[str, Any]) -> Layer:
    digest, media, size = x["digest"], x["mediaType"], x["size"]
    blob_path(digest)  # validates the digest's form (no path tricks)
    if not isinstance(media, str) or not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise TypeError(f"layer {digest[:19]}... has a bad mediaType or size")
    return Layer(media, digest, size)


def iter_manifests() -> Iterator[Path]:
    d = manifests_dir()
    if not d.is_dir():
        return
    for p in sorted(d.glob("*/*/*/*")):
        if p.is_file() and not p.name.startswith("."):
            yield p


def delete_manifest(path: Path) -> None:
    path.unlink()
    _remove_empty_dirs(path.parent)


def _remove_empty_dirs(d: Path) -> None:
    top = manifests_dir()
    while d != top and top in d.parents:
        try:
            d.rmdir()
        except OSError:
            return
        d = d.parent


# ---------------------------------------------------------------- locking and pruning


@contextlib.contextmanager
def writing() -> Iterator[None]:
    """Held (shared) while a create/pull/copy writes blobs and its manifest."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    root().mkdir(parents=True, exist_ok=True)
    with open(root() / ".lock", "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def prune(candidates: Iterable[str] = (), *, min_age: float = GRACE_S) -> list[str]:
    """Remove blobs no manifest references; returns the removed digests.

    ``candidates`` (the layers of a manifest just deleted or replaced) go at
    once when nothing references them any more. Anything else unreferenced
    (leftovers of killed writes, blobs uploaded for a create that has not
    happened yet, temporary files) goes only once it is ``min_age`` seconds
    old. Skipped entirely (returns []) while a create/pull/copy is writing.
    """
    if not blobs_dir().is_dir():
        return []
    if fcntl is None:  # pragma: no cover
        return _prune(set(candidates), max(min_age, UNLOCKED_GRACE_S))
    with open(root() / ".lock", "a+b") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return []
        try:
            return _prune(set(candidates), min_age)
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def referenced_digests() -> set[str]:
    used: set[str] = set()
    for p in iter_manifests():
        try:
            m = read_manifest(p)
        except (InvalidFileError, OSError):
            # A damaged manifest: keep every blob rather than guess.
            return {b.name.replace("-", ":", 1) for b in blobs_dir().iterdir()}
        used.add(m.config.digest)
        used.update(layer.digest for layer in m.layers)
    return used


def _prune(candidates: set[str], min_age: float) -> list[str]:
    used = referenced_digests()
    now = time.time()

    def stale(p: Path, age: float = min_age) -> bool:
        try:
            return _orphaned(p.name) or now - p.stat().st_mtime >= age
        except FileNotFoundError:
            return False

    mdir = manifests_dir()  # temporary files of manifest writes that were killed
    if mdir.is_dir():
        for t in mdir.glob("*/*/*/.*.tmp"):
            if stale(t):
                with contextlib.suppress(OSError):
                    t.unlink()
    for folder, age in ((root() / "tmp", min_age), *((d, DOWNLOAD_GRACE_S) for d in _download_dirs())):
        # work folders of creates (conversions, quantizations), API uploads; downloads of pulls
        if folder.is_dir():
            for d in folder.iterdir():
                if stale(d, age):
                    with contextlib.suppress(OSError):
                        shutil.rmtree(d) if d.is_dir() else d.unlink()
    removed = []
    for b in blobs_dir().iterdir():
        if b.name.startswith(TMP_PREFIX):
            if stale(b):
                with contextlib.suppress(FileNotFoundError):
                    b.unlink()
            continue
        digest = b.name.replace("-", ":", 1)
        if digest not in candidates and not stale(b):
            continue
        if _DIGEST.fullmatch(digest) and digest not in used:
            with contextlib.suppress(FileNotFoundError):
                b.unlink()
            removed.append(digest)
    return removed


def downloads_dir() -> Path:
    """Resumable downloads of pulls (kept between runs, pruned after a week)."""
    return root() / "downloads"


def _download_dirs() -> list[Path]:
    d = downloads_dir()
    return [p for p in d.iterdir() if p.is_dir()] if d.is_dir() else []


# The server's blob upload route used these names before they became public.
_temp_blob = temp_blob
_install = install
