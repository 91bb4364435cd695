"""Atomic file writes: a temporary file in the destination folder, fsync, rename.
An interrupted command never leaves a half-written file under a final name."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


def _read_umask() -> int:
    # Read once at import: os.umask() can only be read by setting it, which is
    # not safe while other threads create files.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; rename it onto ``dest`` on success.

    For writers that want a path (gguf-py, llama.cpp). The temporary file is
    removed if the block raises or the process is interrupted before rename.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    # mkstemp makes the file private (0600); outputs get the usual umask-derived mode.
    os.fchmod(fd, 0o666 & ~_UMASK)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        _fsync_file(tmp_path)
        os.replace(tmp_path, dest)
        _fsync_dir(dest.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_open(dest: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """Like :func:`atomic_path` but yields an open binary file."""
    with atomic_path(dest) as tmp, open(tmp, "wb") as f:
        yield f


def atomic_write_bytes(dest: str | os.PathLike[str], data: bytes) -> None:
    with atomic_open(dest) as f:
        f.write(data)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
