"""What the registry needs from a GGUF file: architecture, file type, split
position, parameter count and the metadata shown by ``ember show -v``.

Built on :mod:`ember.gguf` (strict header parser, shard naming and checks).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ember.errors import InvalidFileError
from ember.fsutil import open_regular
from ember.gguf import GGUFHeader, parse_shard_name, read_header, validate_model
from ember.gguf import find_shards as _find_shards
from ember.gguf.inspect import file_type_name, summarize_value

GGUF_MAGIC = b"GGUF"


@dataclass
class GGUFInfo:
    path: Path
    architecture: str | None
    general_type: str | None  # "model", "adapter", "mmproj" ...
    file_type: str | None  # "Q4_K_M", "F16" ...
    split_no: int  # 0-based
    split_count: int
    n_params: int  # elements in this file's tensors
    n_tensors: int
    metadata: dict[str, Any] = field(default_factory=dict)
    header: GGUFHeader | None = field(default=None, repr=False)

    @property
    def is_projector(self) -> bool:
        return self.architecture == "clip" or self.general_type in ("mmproj", "clip")

    @property
    def is_adapter(self) -> bool:
        return self.general_type == "adapter"


def is_gguf(path: Path) -> bool:
    """True for a regular file that starts with GGUF's magic (a FIFO or device
    is never opened for reading)."""
    try:
        with open_regular(path) as f:
            return f.read(4) == GGUF_MAGIC
    except (OSError, InvalidFileError):
        return False


def read_info(path: Path) -> GGUFInfo:
    """Read and check one GGUF file with :func:`ember.gguf.read_header` (a strict,
    bounded parser: files given to llama.cpp are untrusted)."""
    path = Path(path)
    if not is_gguf(path):
        raise InvalidFileError(f"{path} is not a GGUF file (no GGUF magic); give a .gguf file, a model folder or a model name")
    h = read_header(path)
    ft = h.get("general.file_type")
    return GGUFInfo(
        path=path,
        architecture=h.get("general.architecture"),
        general_type=h.get("general.type"),
        file_type=file_type_name(int(ft)) if isinstance(ft, int) else None,
        split_no=int(h.get("split.no", 0) or 0),
        split_count=max(1, h.split_count()),
        n_params=sum(t.n_elements for t in h.tensors),
        n_tensors=len(h.tensors),
        metadata={k: summarize_value(kv) for k, kv in h.kv.items()},
        header=h,
    )


def check_model(paths: list[Path]) -> None:
    """Cross-shard checks of an ordered shard list (:func:`ember.gguf.validate_model`)."""
    validate_model([Path(p) for p in paths])


def find_shards(path: Path) -> list[Path]:
    """All shards of the split model ``path`` belongs to, in order, when the file
    has llama.cpp's shard name; otherwise just ``[path]`` (a blob or a renamed
    shard: its split metadata is checked against the other FROM files)."""
    if parse_shard_name(path) is None:
        return [Path(path)]
    return [Path(p) for p in _find_shards(path)]
