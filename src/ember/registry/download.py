"""One blob, downloaded in parallel byte ranges, resumable across runs.

In ``downloads/blobs/`` a blob being pulled is ``sha256-<hex>.partial`` (the
data, preallocated) and ``sha256-<hex>.parts.json`` (``{"size": N, "parts":
[[offset, length, done], ...]}``), rewritten about once a second and when the
download stops. A later run continues each part where the JSON says it
stopped; bytes written after the last save are simply fetched again, and the
sha256 check that follows every download catches anything else.

The blob is split into up to 16 parts of 32 MiB to 1 GiB, each fetched with
its own ``Range`` request in its own thread. A connection that drops after
delivering data is resumed at once; one that fails without data is retried
up to 5 times with growing pauses; a 4xx answer stops the download. Ctrl-C,
or an exception raised by the progress callback, stops every part and keeps
what arrived, so the next pull resumes.
"""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import httpx

from ember.errors import DownloadError
from ember.fsutil import atomic_write_bytes
from ember.progress import ProgressCallback

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

MAX_PARTS = 16
MIN_PART = 32 << 20
MAX_PART = 1 << 30
RETRIES = 5
SAVE_EVERY_S = 1.0
TIMEOUT = httpx.Timeout(30.0, connect=10.0)


@dataclass
class Part:
    offset: int
    length: int
    done: int = 0


class _Retry(Exception):
    """A transient failure of one part (a 5xx answer, a short body)."""


def plan_parts(size: int) -> list[Part]:
    """Ollama's split: size/16, clamped to [32 MiB, 1 GiB] per part."""
    step = min(max(-(-size // MAX_PARTS), MIN_PART), MAX_PART)
    return [Part(off, min(step, size - off)) for off in range(0, size, step)] or [Part(0, 0)]


def _load_parts(state: Path, data: Path, size: int) -> list[Part] | None:
    """The saved parts when they describe this blob and the data file is whole-sized."""
    try:
        doc = json.loads(state.read_bytes())
        parts = [Part(int(o), int(n), int(d)) for o, n, d in doc["parts"]]
        ok = doc["size"] == size and data.stat().st_size == size
    except (OSError, ValueError, KeyError, TypeError):
        return None
    pos = 0
    for p in parts:
        ok = ok and p.offset == pos and p.length >= 0 and 0 <= p.done <= p.length
        pos += p.length
    return parts if ok and pos == size else None


def _save(state: Path, size: int, parts: list[Part], lock: threading.Lock) -> None:
    with lock:
        doc = {"size": size, "parts": [[p.offset, p.length, p.done] for p in parts]}
    atomic_write_bytes(state, json.dumps(doc).encode())


def fetch(url: str, digest: str, size: int, folder: Path, *, label: str,
          progress: ProgressCallback | None = None) -> Path:
    """Download ``size`` bytes from ``url`` (a direct blob URL that honours
    ``Range``) into ``folder``; return the data file (its content unverified)."""
    folder.mkdir(parents=True, exist_ok=True)
    base = folder / digest.replace(":", "-")
    data, state = base.with_name(base.name + ".partial"), base.with_name(base.name + ".parts.json")
    fd = os.open(data, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)  # another pull of the same blob finishes its run first
        parts = _load_parts(state, data, size)
        if parts is None:
            os.ftruncate(fd, 0)
            os.ftruncate(fd, size)
            parts = plan_parts(size)
        _download(url, fd, parts, state, size, label, progress)
    finally:
        os.close(fd)
    return data


def discard(data: Path) -> None:
    """Forget a download: stored in the registry, or failed verification."""
    data.unlink(missing_ok=True)
    data.with_name(data.name.removesuffix(".partial") + ".parts.json").unlink(missing_ok=True)


def _download(url: str, fd: int, parts: list[Part], state: Path, size: int, label: str,
              progress: ProgressCallback | None) -> None:
    lock = threading.Lock()
    cancel = threading.Event()
    todo = [p for p in parts if p.done < p.length]

    def report() -> None:
        if progress:
            with lock:
                completed = sum(p.done for p in parts)
            progress(label, completed, size)

    report()
    if not todo:
        return
    pool = ThreadPoolExecutor(max_workers=len(todo), thread_name_prefix="ember-pull")
    try:
        futures: set[Future[None]] = {pool.submit(_fetch_part, url, fd, p, lock, cancel) for p in todo}
        saved = time.monotonic()
        while futures:
            finished, futures = wait(futures, timeout=0.1, return_when=FIRST_EXCEPTION)
            for f in finished:
                f.result()  # a failed part stops the download
            report()
            if time.monotonic() - saved >= SAVE_EVERY_S:
                _save(state, size, parts, lock)
                saved = time.monotonic()
    finally:
        cancel.set()
        pool.shutdown(wait=True, cancel_futures=True)
        _save(state, size, parts, lock)


def _fetch_part(url: str, fd: int, part: Part, lock: threading.Lock, cancel: threading.Event) -> None:
    failures = 0
    with httpx.Client(timeout=TIMEOUT, follow_redirects=True, headers={"Accept-Encoding": "identity"}) as client:
        while part.done < part.length and not cancel.is_set():
            received = 0
            try:
                start, end = part.offset + part.done, part.offset + part.length - 1
                with client.stream("GET", url, headers={"Range": f"bytes={start}-{end}"}) as r:
                    if r.status_code >= 500:
                        raise _Retry(f"the server answered {r.status_code}")
                    if r.status_code not in (200, 206) or (r.status_code == 200 and start != 0):
                        raise DownloadError(f"{url.split('?')[0]} answered {r.status_code} to a ranged download; "
                                            "run the pull again to resume")
                    for chunk in r.iter_raw():
                        chunk = chunk[: part.length - part.done]
                        os.pwrite(fd, chunk, part.offset + part.done)
                        with lock:
                            part.done += len(chunk)
                        received += len(chunk)
                        if cancel.is_set() or part.done >= part.length:
                            return
                raise _Retry("the connection closed early")
            except (httpx.TransportError, _Retry) as e:
                if received:
                    continue  # it was moving: resume at once from where it stopped
                failures += 1
                if failures > RETRIES:
                    raise DownloadError(f"download failed after {RETRIES} retries ({e}); run the pull again to resume") from None
                cancel.wait(min(0.25 * 2**failures, 8.0))
