"""Split-model file naming, exactly llama.cpp's: ``PREFIX-00001-of-00003.gguf``
(``llama_split_path``), so llama.cpp finds the other shards from the first."""

from __future__ import annotations

import os
import re
from pathlib import Path

from ember.errors import InvalidFileError
from ember.gguf.validate import KEY_SPLIT_NO, read_header

SHARD_RE = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


def shard_name(prefix: str | os.PathLike[str], index: int, count: int) -> Path:
    """Path of shard ``index`` (0-based) of ``count``, as llama.cpp names it."""
    return Path(f"{os.fspath(prefix)}-{index + 1:05d}-of-{count:05d}.gguf")


def parse_shard_name(path: str | os.PathLike[str]) -> tuple[Path, int, int] | None:
    """(prefix, 0-based index, count) for a llama.cpp shard name, else None."""
    p = Path(path)
    m = SHARD_RE.match(p.name)
    if not m:
        return None
    no, count = int(m["no"]), int(m["count"])
    if count < 1 or not 1 <= no <= count:
        return None
    return p.with_name(m["prefix"]), no - 1, count


def find_shards(path: str | os.PathLike[str]) -> list[Path]:
    """All shard paths of the model ``path`` belongs to, in order.

    Any shard of a split model gives the whole list; a single file gives
    ``[path]``. Missing shards, and a first shard whose metadata says it is
    split but whose name is not llama.cpp's pattern, are errors that name the
    files needed.
    """
    p = Path(path)
    if not p.exists():
        raise InvalidFileError(f"{p}: no such file")
    if p.is_dir():
        raise InvalidFileError(f"{p}: is a directory, not a GGUF file")
    parsed = parse_shard_name(p)
    if parsed is None:
        header = read_header(p)
        count = header.split_count()
        if count > 1:
            no = int(header.get(KEY_SPLIT_NO, 0))
            stem = p.name[:-5] if p.name.endswith(".gguf") else p.name
            needed = ", ".join(shard_name(stem, i, count).name for i in range(count))
            raise InvalidFileError(
                f"{p}: is shard {no + 1} of {count} of a split model, but its name does not follow llama.cpp's "
                f"PREFIX-0000K-of-0000N.gguf pattern; rename the {count} shards in order, e.g. {needed}"
            )
        return [p]
    prefix, _, count = parsed
    shards = [shard_name(prefix, i, count) for i in range(count)]
    for i, s in enumerate(shards):
        if not s.is_file():
            raise InvalidFileError(f"{p}: shard {i + 1} of {count} is missing: expected {s}")
    return shards
