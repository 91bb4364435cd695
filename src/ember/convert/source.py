"""A Hugging Face checkpoint folder: its config.json and lazy access to its tensors.

Safetensors headers are parsed here (a JSON header and byte offsets) so each
tensor is read on demand with one ``readinto`` and no framework: numpy has no
bfloat16, so bf16 tensors come back as :data:`BF16` (a 2-byte structured dtype
that reshapes and slices like any array but refuses arithmetic until
:func:`to_float32`). ``pytorch_model*.bin`` files go through
``torch.load(mmap=True, weights_only=True)``, imported only when needed.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ember.errors import ConversionError, InvalidFileError

#: numpy stand-in for bfloat16: raw 16-bit words, converted with :func:`to_float32`.
BF16 = np.dtype([("bf16", "<u2")])

_ST_DTYPES: dict[str, np.dtype[Any]] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": BF16,
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}

_MAX_HEADER = 100 * 1024 * 1024


def load_config(model_dir: Path) -> tuple[dict[str, Any], Path]:
    """A model folder's config.json (and its path), with errors that say what to do."""
    config_file = model_dir / "config.json"
    if not model_dir.is_dir():
        raise ConversionError(f"{model_dir}: not a directory; give the folder of a Hugging Face model (with config.json)")
    if not config_file.is_file():
        raise ConversionError(f"{config_file}: missing; a Hugging Face model folder needs its config.json")
    return read_json_object(config_file, "; download it again"), config_file


def read_json_object(path: Path, fix: str = "") -> dict[str, Any]:
    """A JSON file that must hold an object; InvalidFileError naming the file otherwise."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidFileError(f"{path}: not valid JSON ({e}){fix}") from None
    if not isinstance(data, dict):
        raise InvalidFileError(f"{path}: not a JSON object{fix}")
    return data


def is_bf16(a: np.ndarray[Any, Any]) -> bool:
    return bool(a.dtype == BF16)


def to_float32(a: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """Any float array (bf16 included) as float32; a no-op for float32."""
    if a.dtype == BF16:
        widened: np.ndarray[Any, Any] = np.left_shift(a.view(np.uint16), 16, dtype=np.uint32)
        return widened.view(np.float32)
    if a.dtype == np.float32:
        return a
    return a.astype(np.float32)


@dataclass
class TensorRef:
    """One tensor in a checkpoint: shape and dtype known, data read on demand."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    file: Path
    load: Callable[[], np.ndarray[Any, Any]]
    # (offset, nbytes) of the raw data inside ``file`` for safetensors; None for .bin
    span: tuple[int, int] | None = None

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def read_safetensors_header(path: Path) -> dict[str, TensorRef]:
    """Parse a safetensors header and check every tensor lies inside the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise InvalidFileError(f"{path}: not a safetensors file (shorter than 8 bytes); download it again")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            raise InvalidFileError(f"{path}: safetensors header length {n} exceeds the file size {size}; the file is truncated or not safetensors, download it again")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InvalidFileError(f"{path}: safetensors header is not valid JSON ({e}); download the file again") from None
    if not isinstance(header, dict):
        raise InvalidFileError(f"{path}: safetensors header is not a JSON object; download the file again")
    base = 8 + n
    refs: dict[str, TensorRef] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _ST_DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            start, end = (int(x) for x in info["data_offsets"])
        except KeyError as e:
            if isinstance(info, dict) and "dtype" in info and info["dtype"] not in _ST_DTYPES:
                raise ConversionError(f"{path}: tensor {name!r} has dtype {info['dtype']}, which is not supported (use an F32/F16/BF16 checkpoint)") from None
            raise InvalidFileError(f"{path}: tensor {name!r} has a malformed header entry (missing {e}); download the file again") from None
        except (TypeError, ValueError):
            raise InvalidFileError(f"{path}: tensor {name!r} has a malformed header entry; download the file again") from None
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if end - start != nbytes or start < 0:
            raise InvalidFileError(f"{path}: tensor {name!r} spans {end - start} bytes but its shape {list(shape)} needs {nbytes}; the file is corrupt, download it again")
        if base + end > size:
            raise InvalidFileError(f"{path}: truncated: tensor {name!r} ends at byte {base + end} but the file has {size} bytes; download it again")
        refs[name] = TensorRef(name, shape, dtype, path, _reader(path, base + start, nbytes, dtype, shape), (base + start, nbytes))
    return refs


def _reader(path: Path, offset: int, nbytes: int, dtype: np.dtype[Any], shape: tuple[int, ...]) -> Callable[[], np.ndarray[Any, Any]]:
    """A loader mapping the tensor's bytes read-only: no copy, pages come from
    the page cache as the converter touches them and leave with the array."""

    def load() -> np.ndarray[Any, Any]:
        if nbytes == 0:
            return np.empty(shape, dtype=dtype)
        try:
            m = np.memmap(path, dtype=np.uint8, mode="r", offset=offset, shape=(nbytes,))
        except (ValueError, OSError) as e:
            raise InvalidFileError(f"{path}: cannot read tensor data ({e}); the file is truncated or unreadable, download it again") from None
        mm = getattr(m, "_mmap", None)
        if mm is not None and hasattr(mmap, "MADV_WILLNEED"):
            with contextlib.suppress(OSError, ValueError):
                mm.madvise(mmap.MADV_WILLNEED)  # start reading ahead now
        return m.view(np.ndarray).view(dtype).reshape(shape)

    return load


def read_torch_checkpoint(path: Path) -> dict[str, TensorRef]:
    try:
        import torch  # optional: the ember[torch] extra, only for .bin checkpoints
    except ImportError:
        raise ConversionError(f"{path}: reading pytorch_model .bin checkpoints needs torch: pip install 'ember[torch]' (or convert the model to safetensors)") from None
    try:
        state = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # torch raises many types for bad pickles / zip files
        raise InvalidFileError(f"{path}: cannot be read as a PyTorch checkpoint ({type(e).__name__}: {e}); download it again") from None
    refs: dict[str, TensorRef] = {}
    for name, t in state.items():
        if not isinstance(t, torch.Tensor):
            continue
        shape = tuple(t.shape)
        if t.dtype == torch.bfloat16:
            dtype = BF16
        else:
            try:
                dtype = np.dtype(str(t.dtype).removeprefix("torch."))
            except TypeError:
                raise ConversionError(f"{path}: tensor {name!r} has dtype {t.dtype}, which is not supported") from None

        def load(t: Any = t, dtype: np.dtype[Any] = dtype) -> np.ndarray[Any, Any]:
            arr: np.ndarray[Any, Any] = t.contiguous().view(torch.int16).numpy().view(BF16) if dtype == BF16 else t.contiguous().numpy()
            return arr.copy()

        refs[name] = TensorRef(name, shape, dtype, path, load)
    return refs


def _index_parts(model_dir: Path, index_name: str) -> list[str] | None:
    index = model_dir / index_name
    if not index.is_file():
        return None
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
        weight_map = data["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        raise InvalidFileError(f"{index}: no valid 'weight_map' object; download the index file again") from None
    parts = sorted(set(weight_map.values()))
    for p in parts:
        if not (model_dir / p).is_file():
            raise InvalidFileError(f"{model_dir / p}: missing, but {index_name} lists it; download every shard of the model")
    return parts


class Checkpoint:
    """All tensors of a model directory, in file order, read one at a time."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir
        parts = _index_parts(model_dir, "model.safetensors.index.json")
        if parts is None:
            parts = sorted(p.name for p in model_dir.glob("*.safetensors") if p.name.startswith("model"))
        self.format = "safetensors"
        if not parts:
            parts = _index_parts(model_dir, "pytorch_model.bin.index.json") or sorted(
                p.name for p in model_dir.glob("pytorch_model*.bin")
            )
            self.format = "pytorch"
        if not parts:
            raise ConversionError(
                f"{model_dir}: no model weights found (model*.safetensors or pytorch_model*.bin); download the full model, not only its config"
            )
        self.tensors: dict[str, TensorRef] = {}
        for part in parts:
            path = model_dir / part
            refs = read_safetensors_header(path) if self.format == "safetensors" else read_torch_checkpoint(path)
            for name, ref in refs.items():
                if name in self.tensors:
                    raise InvalidFileError(f"{path}: tensor {name!r} also appears in {self.tensors[name].file.name}; remove the duplicate shard")
                self.tensors[name] = ref

    def __iter__(self) -> Iterator[TensorRef]:
        return iter(self.tensors.values())

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __getitem__(self, name: str) -> TensorRef:
        return self.tensors[name]
