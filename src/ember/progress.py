"""Progress reporting shared by every long step.

Library functions take an optional ``progress`` callback ``(description,
completed, total)``; the CLI turns it into a rich progress bar, notebooks and
GUIs into whatever they like. ``total`` is 0 when unknown.
"""

from __future__ import annotations

from collections.abc import Callable

ProgressCallback = Callable[[str, int, int], None]


def noop(description: str, completed: int, total: int) -> None:
    """The default callback: report nothing."""
