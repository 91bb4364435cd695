"""Helpers shared by the command modules: consoles, progress bars, size parsing."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from ember.errors import OptionError
from ember.progress import ProgressCallback

console = Console()
err_console = Console(stderr=True)


@contextlib.contextmanager
def progress_bar(byte_units: bool = True) -> Iterator[ProgressCallback]:
    """A rich progress bar on stderr as a :data:`ProgressCallback`.

    Each distinct description gets its own bar, so a command that hashes, then
    copies, then quantizes shows each step.
    """
    columns = [TextColumn("{task.description}"), BarColumn()]
    if byte_units:
        columns += [DownloadColumn(), TransferSpeedColumn()]
    else:
        columns += [TextColumn("{task.completed}/{task.total}")]
    columns.append(TimeRemainingColumn())
    tasks: dict[str, TaskID] = {}
    with Progress(*columns, console=err_console, transient=False) as bar:

        def callback(description: str, completed: int, total: int) -> None:
            task = tasks.get(description)
            if task is None:
                task = tasks[description] = bar.add_task(description, total=total or None)
            bar.update(task, completed=completed, total=total or None)

        yield callback


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B?)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'2G', '500M', '1.5GiB', '1024' -> bytes (powers of 1000 like llama.cpp's
    gguf-split for K/M/G without 'i', powers of 1024 with 'i')."""
    m = _SIZE.match(text)
    if not m:
        raise OptionError(f"invalid size {text!r}: use a number with K, M, G or T (e.g. 2G)")
    number, unit, suffix = float(m.group(1)), m.group(2).upper(), (m.group(3) or "").lower()
    base = 1024 if suffix.startswith("i") else 1000
    power = " KMGT".index(unit) if unit else 0
    return int(number * base**power)


def format_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
