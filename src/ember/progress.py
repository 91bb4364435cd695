"""Progress reporting shared by every long step.

Library functions take an optional ``progress`` callback ``(description,
completed, total)``; the CLI turns it into a rich progress bar, notebooks and
GUIs into whatever they like. ``total`` is 0 when unknown.
"""

from __future__ import annotations

from collections.abc import Callable

ProgressCallback = Callable[[str, int, int], None]


class BlobLabel(str):
    """A description that names a blob (``pulling 1a2b3c4d5e6f``) and carries
    its whole digest, which Ollama's progress lines have as ``digest``;
    everywhere else it is the plain text."""

    digest: str

    def __new__(cls, text: str, digest: str) -> BlobLabel:
        label = super().__new__(cls, text)
        label.digest = digest
        return label


def noop(description: str, completed: int, total: int) -> None:
    """The default callback: report nothing."""
