"""Helpers shared by the command modules: consoles and progress bars (sizes:
:mod:`ember.cli.sizes`)."""

from __future__ import annotations

import contextlib
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
