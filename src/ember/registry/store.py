"""Content-addressed storage in Ollama's layout under ``$EMBER_MODELS``.

``blobs/sha256-<hex>`` hold layers (GGUF files, template text, params JSON...),
``manifests/<host>/<namespace>/<model>/<tag>`` hold Ollama's JSON manifests.

Crash safety: a blob is copied to a temporary file in ``blobs/`` while it is
hashed, checked against the expected digest, fsynced and only then renamed to
its final name; the manifest is written (atomically) after every blob it names
exists. A killed ``create`` therefore leaves at most a stray temporary file or
an unreferenced blob, never a manifest that points at a missing or partial blob.

Pruning vs. concurrent creates: a create holds a *shared* ``flock`` on
``.lock`` from its first blob write to its manifest write; pruning needs the
*exclusive* lock and is skipped (not waited for) when any create is running, so
it never removes a blob or temporary file that a running create is about to
reference (the kernel drops the lock of a killed process). Pruning then removes
at once the layers of the manifest just deleted or replaced that nothing else
references; other unreferenced files (leftovers of killed creates, blobs
uploaded through the API for a create still to come) only once they are an
hour old, so a client's upload-then-create is never raced. Where ``fcntl`` is
missing (Windows) only those candidates and files older than a day go.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ember import settings
from ember.errors import InvalidFileError
from ember.fsutil import atomic_write_bytes
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

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_CHUNK = 4 << 20
TMP_PREFIX = ".partial-"
GRACE_S = 3600.0
UNLOCKED_GRACE_S = 24 * 3600


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
        raise InvalidFileError(f"invalid digest {digest!r}: expected sha256:<64 hex digits>")
    return blobs_dir() / digest.replace(":", "-")


def _hash_file(path: Path, label: str, progress: ProgressCallback | None) -> tuple[str, int]:
    h = hashlib.sha256()
    total = path.stat().st_size
    done = 0
    with open(path, "rb") as f:
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


def has_blob(digest: str, size: int | None = None) -> bool:
    p = blob_path(digest)
    try:
        st = p.stat()
    except FileNotFoundError:
        return False
    return size is None or st.st_size == size


def _temp_blob() -> Path:
    d = blobs_dir()
    d.mkdir(parents=True, exist_ok=True)
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=".tmp", dir=d)
    os.close(fd)
    return Path(tmp)


def _install(tmp: Path, digest: str) -> None:
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
    must have (a pull's advertised sha256).
    """
    digest, size = hash_file(path, progress)
    if expected and digest != expected:
        raise InvalidFileError(f"{path}: sha256 {digest[7:19]}... does not match the expected {expected[7:19]}...; download it again")
    if has_blob(digest, size):
        if move:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        return digest, size
    tmp = _temp_blob()
    try:
        if move:
            os.replace(path, tmp)
        else:
            h = hashlib.sha256()
            label = f"copying {path.name}"
            done = 0
            with open(path, "rb") as src, open(tmp, "wb") as dst:
                while chunk := src.read(_CHUNK):
                    h.update(chunk)
                    dst.write(chunk)
                    done += len(chunk)
                    if progress:
                        progress(label, done, size)
            if "sha256:" + h.hexdigest() != digest:
                raise InvalidFileError(f"{path} changed while it was being stored; try again")
        _install(tmp, digest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return digest, size


def add_bytes(data: bytes) -> tuple[str, int]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    if has_blob(digest, len(data)):
        return digest, len(data)
    tmp = _temp_blob()
    try:
        tmp.write_bytes(data)
        _install(tmp, digest)
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


def write_manifest(name: ModelName, config: Layer, layers: list[Layer]) -> str:
    """Write a manifest after checking every blob it names exists with its size.

    Any other spelling of the same name (names are case-insensitive) is
    removed afterwards, so one name has one manifest.
    """
    for layer in [config, *layers]:
        if not has_blob(layer.digest, layer.size):
            raise InvalidFileError(f"blob {layer.digest} is missing or incomplete; create the model again")
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
        doc = json.loads(data)
        config = _layer(doc["config"])
        layers = [_layer(x) for x in doc.get("layers") or []]
    except (ValueError, KeyError, TypeError) as e:
        raise InvalidFileError(f"manifest {path} is damaged ({e}); remove the model with 'ember rm' and create it again") from None
    return Manifest(config, layers, "sha256:" + hashlib.sha256(data).hexdigest(), path, name, path.stat().st_mtime)


def _layer(x: dict[str, Any]) -> Layer:
    digest = x["digest"]
    blob_path(digest)  # validates the digest's form (no path tricks)
    return Layer(x["mediaType"], digest, int(x["size"]))


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
    removed = []
    mdir = manifests_dir()  # temporary files of manifest writes that were killed
    if mdir.is_dir():
        for t in mdir.glob("*/*/*/.*.tmp"):
            with contextlib.suppress(OSError):
                if now - t.stat().st_mtime >= min_age:
                    t.unlink()
    work = root() / "tmp"  # work folders of creates (conversions, quantizations)
    if work.is_dir():
        for d in work.iterdir():
            with contextlib.suppress(OSError):
                if now - d.stat().st_mtime >= min_age:
                    shutil.rmtree(d) if d.is_dir() else d.unlink()
    for b in blobs_dir().iterdir():
        try:
            mtime = b.stat().st_mtime
        except FileNotFoundError:
            continue
        if b.name.startswith(TMP_PREFIX):
            if now - mtime < min_age:
                continue
            with contextlib.suppress(FileNotFoundError):
                b.unlink()
            continue
        digest = b.name.replace("-", ":", 1)
        if digest not in candidates and now - mtime < min_age:
            continue
        if _DIGEST.fullmatch(digest) and digest not in used:
            with contextlib.suppress(FileNotFoundError):
                b.unlink()
            removed.append(digest)
    return removed
