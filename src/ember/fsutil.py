"""File helpers shared by every layer.

Atomic writes: a temporary file in the destination folder, fsync, rename, so an
interrupted command never leaves a half-written file under a final name.
Untrusted paths: :func:`open_regular` and :func:`path_kind` never block on a
FIFO, a terminal or ``/dev/stdin``, and never fail on a name the OS refuses.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Literal

from ember.errors import InvalidFileError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

_FICLONE = 0x40049409  # Linux ioctl: share the source's extents (btrfs, XFS, bcachefs)


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


def path_kind(path: str | os.PathLike[str]) -> Literal["file", "dir", "other", "missing"]:
    """What ``path`` names, found with ``stat`` (nothing is opened): a regular
    file, a folder, something else (FIFO, device, socket) or nothing. A name
    the OS refuses (too long, a NUL byte, a loop of links) counts as missing."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return "missing"
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    return "other"


def open_regular(path: str | os.PathLike[str]) -> BinaryIO:
    """Open a file for reading only if it is a regular file.

    The file is opened non-blocking and checked with ``fstat`` on the open
    descriptor, so a FIFO, ``/dev/stdin`` or ``/proc/self/fd/0`` is refused at
    once instead of hanging the caller (and a swap after a ``stat`` cannot
    slip one in). Raises :class:`InvalidFileError` naming the path.
    """
    shown = str(path) if len(str(path)) <= 200 else str(path)[:197] + "..."
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise InvalidFileError(f"{shown}: no such file") from None
    except IsADirectoryError:
        raise InvalidFileError(f"{shown} is a folder, not a file") from None
    except (OSError, ValueError) as e:
        why = "the name is too long" if getattr(e, "errno", None) == errno.ENAMETOOLONG else (getattr(e, "strerror", None) or str(e))
        raise InvalidFileError(f"cannot open {shown}: {why}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            what = "a folder" if stat.S_ISDIR(mode) else "not a regular file (a pipe, device or socket)"
            raise InvalidFileError(f"{shown} is {what}; give a file")
        if fcntl is not None and hasattr(os, "O_NONBLOCK"):
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def link_or_copy(src: str | os.PathLike[str], dest: str | os.PathLike[str]) -> str:
    """Make ``dest`` (which must not exist) hold ``src``'s bytes as cheaply as
    the file system allows: a hard link, else a reflink, else a copy. Returns
    which one was made. A failed copy leaves no ``dest`` behind."""
    try:
        os.link(src, dest)
        return "link"
    except OSError:
        pass
    with open(src, "rb") as s, open(dest, "xb") as d:
        try:
            if fcntl is not None:
                with contextlib.suppress(OSError):
                    fcntl.ioctl(d.fileno(), _FICLONE, s.fileno())
                    return "reflink"
            shutil.copyfileobj(s, d, 4 << 20)
            return "copy"
        except BaseException:
            d.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(dest)
            raise
