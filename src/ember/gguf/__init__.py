"""GGUF file tools: validate, inspect, find shards, split and merge.

Built on gguf-py (llama.cpp's own library) for constants and writing; reading
goes through a strict bounded parser (:mod:`ember.gguf.validate`) because
files handed to llama.cpp are untrusted input.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from ember.errors import InvalidFileError
from ember.gguf.hparams import check_hparams
from ember.gguf.inspect import ModelInfo, QuantStats, TensorEntry, model_info
from ember.gguf.shards import find_shards, parse_shard_name, shard_name
from ember.gguf.split import ShardPlan, merge_model, plan_split, split_model
from ember.gguf.validate import GGUFHeader, check_shards, read_array, read_header

__all__ = [
    "GGUFHeader",
    "ModelInfo",
    "QuantStats",
    "ShardPlan",
    "TensorEntry",
    "find_shards",
    "inspect_model",
    "merge_model",
    "parse_shard_name",
    "plan_split",
    "read_array",
    "read_header",
    "read_model",
    "shard_name",
    "split_model",
    "validate_model",
]

PathArg = str | os.PathLike[str]


def read_model(path_or_paths: PathArg | Sequence[PathArg]) -> list[GGUFHeader]:
    """Validated headers of every shard, first shard first (see validate_model)."""
    if isinstance(path_or_paths, (str, os.PathLike)):
        paths = find_shards(path_or_paths)
    else:
        paths = [Path(p) for p in path_or_paths]
        if not paths:
            raise InvalidFileError("no model files given")
    headers = [read_header(p) for p in paths]
    check_shards(headers)
    check_hparams(headers)
    return headers


def validate_model(path_or_paths: PathArg | Sequence[PathArg]) -> list[Path]:
    """Check a model's structure before llama.cpp opens it; return its shard paths.

    ``path_or_paths`` is one file (any shard of a split model finds the others)
    or an explicit ordered list of shards. Only headers and tables are read
    (cached by size and mtime), so this is cheap enough to run before every
    load. Besides the structure, the hyperparameters are checked against what
    llama.cpp asserts on (:mod:`ember.gguf.hparams`). Raises :class:`InvalidFileError` "FILE: what is wrong (where)".
    """
    return [h.path for h in read_model(path_or_paths)]


def inspect_model(path: PathArg) -> ModelInfo:
    """Summary of the whole model ``path`` belongs to (any shard works)."""
    headers = read_model(path)
    return model_info(headers, path)
