"""Helpers for the registry tests: tiny real GGUF files written with gguf-py,
split the way llama.cpp names and tags shards, and registry snapshots."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
from gguf import GGUFWriter, LlamaFileType

from ember.registry import store


def write_tiny_gguf(path: Path, *, n_tensors: int = 4, seed: int = 0, split_max_tensors: int = 0,
                    arch: str = "llama", general_type: str | None = None, rows: int = 8) -> list[Path]:
    """A small GGUF (F32 tensors, llama metadata); with ``split_max_tensors`` the
    shards ``<stem>-0000N-of-0000M.gguf`` are written instead. Returns the files."""
    rng = np.random.default_rng(seed)
    w = GGUFWriter(path, arch, split_max_tensors=split_max_tensors)
    w.add_name(f"tiny-{seed}")
    if general_type:
        w.add_type(general_type)
    w.add_file_type(LlamaFileType.ALL_F32)
    w.add_context_length(128)
    w.add_block_count(1)
    w.add_embedding_length(rows)
    for i in range(n_tensors):
        w.add_tensor(f"blk.0.t{i}.weight", rng.standard_normal((rows, 16)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if split_max_tensors:
        n = -(-n_tensors // split_max_tensors)
        stem = str(path)[: -len(".gguf")]
        return [Path(f"{stem}-{i:05d}-of-{n:05d}.gguf") for i in range(1, n + 1)]
    return [path]


def snapshot(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under ``root`` (the lock file aside)."""
    out = {}
    if not root.exists():
        return out
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if rel == ".lock":
                continue
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def without_demo(root: Path) -> Path:
    """Make ``root`` a registry whose listings leave the demo model out (as
    after 'ember rm demo'), for tests that list exactly what they create."""
    root.mkdir(parents=True, exist_ok=True)
    (root / store.OFFERED_MARKER).touch()
    return root


def qwen_modelfile() -> str:
    """The Modelfile from the user's Qwen2.5 document (seed 003), verbatim."""
    return (Path(__file__).parent / "data" / "modelfiles" / "qwen2.5.Modelfile").read_text(encoding="utf-8")
