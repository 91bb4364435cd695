"""Merge a GGUF LoRA adapter into a GGUF model: W' = W + s * B @ A.

The scale is llama.cpp's: ``s = scale * alpha / rank`` (``scale`` when the
adapter has no alpha), so the merged model computes what llama.cpp computes
with the adapter applied at run time (``ember run --lora FILE:SCALE``). For the
token embeddings llama.cpp stores A and B flipped (A is [vocab, rank] and is
row-gathered), so there ``E' = E + s * A @ B^T``.

Tensors are read and written one at a time (gguf-py's reader maps the files;
the writer gets every tensor's header first, then the data in order), so
memory stays at about one tensor. Merged tensors keep their type where
gguf-py can write it (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, TQ1_0,
TQ2_0); others (K-quants, i-quants) are written as F16 and then handed to
llama.cpp's quantizer with one override per tensor restoring its original
type (untouched tensors are copied as they are). The output is atomic.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUFReader, GGUFValueType, GGUFWriter, quants
from gguf import GGMLQuantizationType as T

from ember.errors import ConversionError, InvalidFileError, QuantizationError
from ember.fsutil import atomic_path
from ember.gguf import validate_model
from ember.progress import ProgressCallback
from ember.quantize import QUANT_TYPES, default_mode, quantize_model

_WRITABLE = {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "TQ1_0", "TQ2_0"}
_OUTTYPES = {"auto", "f32", "f16", "bf16", "q8_0"}


@dataclass
class MergeResult:
    output: Path
    n_merged: int
    notes: list[str] = field(default_factory=list)


@dataclass
class _Pair:
    a: Any  # ReaderTensor
    b: Any


def _reader(path: Path, what: str) -> Any:
    if not path.is_file():
        raise InvalidFileError(f"{path}: no such {what} file")
    try:
        return GGUFReader(path)
    except Exception as e:  # noqa: BLE001 - gguf-py raises many kinds
        raise InvalidFileError(f"{path}: not a readable GGUF {what} ({e})") from None


def _field(reader: Any, key: str) -> Any:
    f = reader.get_field(key)
    return None if f is None else f.contents()


def _as_float(t: Any) -> np.ndarray:
    """A reader tensor as float32 in numpy order (rows = ne[1])."""
    if t.tensor_type == T.F32:
        arr = np.asarray(t.data, dtype=np.float32)
    elif t.tensor_type == T.F16:
        arr = np.asarray(t.data).astype(np.float32)
    else:
        arr = quants.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32)
    shape = tuple(int(x) for x in reversed(t.shape))  # numpy order
    return arr.reshape(shape)


def _adapter_pairs(adapter: Path, reader: Any, base_arch: str) -> tuple[dict[str, _Pair], float]:
    gtype = _field(reader, "general.type")
    if gtype != "adapter":
        raise InvalidFileError(f"{adapter}: general.type is {gtype!r}, not 'adapter' (is this a LoRA GGUF? ember convert-lora makes them)")
    atype = _field(reader, "adapter.type")
    if atype != "lora":
        raise InvalidFileError(f"{adapter}: adapter.type is {atype!r}; only 'lora' adapters can be merged")
    arch = _field(reader, "general.architecture")
    if arch != base_arch:
        raise InvalidFileError(f"{adapter}: adapter is for architecture {arch!r} but the base model is {base_arch!r}")
    if _field(reader, "adapter.alora.invocation_tokens") is not None:
        raise ConversionError(f"{adapter}: an activated LoRA (aLoRA) only applies after its invocation tokens and cannot be merged")
    alpha = float(_field(reader, "adapter.lora.alpha") or 0.0)
    halves: dict[str, dict[str, Any]] = {}
    for t in reader.tensors:
        for suffix in (".lora_a", ".lora_b"):
            if t.name.endswith(suffix):
                halves.setdefault(t.name[: -len(suffix)], {})[suffix[-1]] = t
                break
        else:
            raise InvalidFileError(f"{adapter}: tensor {t.name} is neither .lora_a nor .lora_b")
    pairs: dict[str, _Pair] = {}
    for name, h in halves.items():
        if "a" not in h or "b" not in h:
            raise InvalidFileError(f"{adapter}: {name} has lora_{'a' if 'a' not in h else 'b'} missing")
        pairs[name] = _Pair(h["a"], h["b"])
    if not pairs:
        raise InvalidFileError(f"{adapter}: the adapter has no LoRA tensors")
    return pairs, alpha


def _delta(name: str, pair: _Pair, base_shape: tuple[int, ...], alpha: float, scale: float, adapter: Path) -> np.ndarray:
    """s * B @ A in numpy order, with llama.cpp's shape checks."""
    a, b = _as_float(pair.a), _as_float(pair.b)
    if a.ndim != 2 or b.ndim != 2 or len(base_shape) != 2:
        raise ConversionError(f"{adapter}: {name}: only 2-D LoRA tensors can be merged")
    n_out, n_in = base_shape
    if name.endswith("token_embd.weight"):
        # llama.cpp: A is [vocab, rank] (numpy), B is [n_embd, rank]; delta = A @ B^T.
        if a.shape[0] != n_out or b.shape[0] != n_in or a.shape[1] != b.shape[1]:
            raise InvalidFileError(f"{adapter}: {name} has shape A{a.shape} B{b.shape}, not matching base {base_shape} (wrong base model?)")
        rank = b.shape[1]
        d = a @ b.T
    else:
        if a.shape[1] != n_in or b.shape[0] != n_out:
            raise InvalidFileError(f"{adapter}: {name} has shape A{a.shape} B{b.shape}, not matching base {base_shape} (wrong base model?)")
        if a.shape[0] != b.shape[1]:
            raise InvalidFileError(f"{adapter}: {name}: lora_a is not transposed (ranks {a.shape[0]} and {b.shape[1]} differ)")
        rank = a.shape[0]
        d = b @ a
    s = scale * alpha / rank if alpha else scale
    out: np.ndarray = (s * d).astype(np.float32)
    return out


def _encode(values: np.ndarray, tname: str) -> tuple[np.ndarray, Any]:
    qt = T[tname]
    if qt == T.F32:
        return np.ascontiguousarray(values, dtype=np.float32), qt
    if qt == T.F16:
        return values.astype(np.float16), qt
    return quants.quantize(values, qt), qt


def _encoded_info(shape: tuple[int, ...], tname: str) -> tuple[tuple[int, ...], Any, int]:
    """(shape to declare, dtype, nbytes) of a tensor encoded as ``tname``."""
    qt = T[tname]
    n = int(np.prod(shape))
    if qt == T.F32:
        return shape, np.float32, n * 4
    if qt == T.F16:
        return shape, np.float16, n * 2
    block, size = GGML_QUANT_SIZES[qt]
    if shape[-1] % block:
        raise QuantizationError(f"row length {shape[-1]} is not a multiple of {tname}'s block of {block}")
    row = shape[-1] // block * size
    return (*shape[:-1], row), np.uint8, n // block * size


def _copy_kv(reader: Any, writer: Any, skip: set[str]) -> None:
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key in skip:
            continue
        vtype = GGUFValueType(f.types[0])
        sub = GGUFValueType(f.types[-1]) if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(key, f.contents(), vtype, sub)


def merge_lora(
    base: str | os.PathLike[str],
    adapter: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    scale: float = 1.0,
    outtype: str = "auto",
    progress: ProgressCallback | None = None,
) -> MergeResult:
    """Write ``output``: ``base`` with the LoRA ``adapter`` merged in at ``scale``."""
    base, adapter, output = Path(base), Path(adapter), Path(output)
    outtype = outtype.lower()
    if outtype not in _OUTTYPES:
        raise QuantizationError(f"--outtype {outtype!r}: use one of {', '.join(sorted(_OUTTYPES))}")

    shards = validate_model(base)
    if len(shards) > 1:
        raise InvalidFileError(f"{base}: the base model is split into {len(shards)} shards; join them first with `ember merge`")
    validate_model(adapter)
    if output.exists() and any(output.samefile(p) for p in (base, adapter) if p.exists()):
        raise QuantizationError(f"{output}: the output would overwrite an input")
    br = _reader(base, "model")
    arch = _field(br, "general.architecture")
    if not arch:
        raise InvalidFileError(f"{base}: no general.architecture")
    if _field(br, "general.type") == "adapter":
        raise InvalidFileError(f"{base}: this is an adapter, not a model; give the base model first")
    ar = _reader(adapter, "adapter")
    pairs, alpha = _adapter_pairs(adapter, ar, arch)
    base_tensors = {t.name: t for t in br.tensors}
    if "token_embd.weight" in pairs and "output.weight" not in base_tensors:
        raise ConversionError(
            f"{adapter}: the adapter changes token_embd.weight but {base.name} ties its output to the embeddings; "
            "merging would also change the output layer, which llama.cpp's run-time adapter does not: apply it with --lora instead"
        )

    missing = [n for n in pairs if n not in base_tensors]
    if missing:
        raise InvalidFileError(f"{adapter}: adapter tensor {missing[0]} has no counterpart in {base.name} (wrong base model?)")
    notes: list[str] = []
    plan: dict[str, str] = {}  # merged tensor -> type written here
    restore: dict[str, str] = {}  # merged tensor -> original type to restore with llama.cpp
    for name in pairs:
        orig = base_tensors[name].tensor_type.name
        if outtype == "auto":
            if orig in _WRITABLE:
                plan[name] = orig
            else:
                plan[name] = "F16"
                restore[name] = orig
        else:
            plan[name] = outtype.upper()
    if outtype != "auto":
        notes.append(f"merged tensors written as {outtype.upper()}; other tensors keep their types")

    try:
        _write_merged(br, arch, pairs, alpha, scale, plan, restore, adapter, output, notes, progress)
    except OSError as e:
        raise QuantizationError(f"{output}: cannot write the output ({e.strerror or e})") from None
    return MergeResult(output, len(pairs), notes)


def _write_merged(
    br: Any,
    arch: str,
    pairs: dict[str, _Pair],
    alpha: float,
    scale: float,
    plan: dict[str, str],
    restore: dict[str, str],
    adapter: Path,
    output: Path,
    notes: list[str],
    progress: ProgressCallback | None,
) -> None:
    """Stream the merged model to ``output`` (atomically)."""
    alignment = _field(br, "general.alignment")
    output.parent.mkdir(parents=True, exist_ok=True)

    with atomic_path(output) as final_tmp:
        stage = final_tmp
        stage_dir = None
        if restore:
            stage_dir = tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".merge", dir=output.parent)
            stage = Path(stage_dir) / "merged-f16.gguf"
        try:
            writer = GGUFWriter(str(stage), arch)
            if alignment:
                writer.data_alignment = int(alignment)
            _copy_kv(br, writer, {"general.architecture"})
            for t in br.tensors:
                if t.name in pairs:
                    shape = tuple(int(x) for x in reversed(t.shape))
                    decl, dtype, nbytes = _encoded_info(shape, plan[t.name])

                    writer.add_tensor_info(t.name, decl, np.dtype(dtype), nbytes, raw_dtype=T[plan[t.name]])
                else:
                    data = t.data
                    writer.add_tensor_info(t.name, data.shape, data.dtype, int(data.nbytes), raw_dtype=t.tensor_type)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            total = len(br.tensors)
            for i, t in enumerate(br.tensors):
                if t.name in pairs:
                    w = _as_float(t)
                    w = w + _delta(t.name, pairs[t.name], w.shape, alpha, scale, adapter)
                    arr, _qt = _encode(w, plan[t.name])
                    writer.write_tensor_data(arr)
                else:
                    writer.write_tensor_data(np.asarray(t.data))
                if progress:
                    progress("merging", i + 1, total)
            writer.close()
            if restore:
                ftype = int(_field(br, "general.file_type") or 1)
                qname = next((k for k, v in QUANT_TYPES.items() if v[0] == ftype and k != "COPY"), "F16")
                # One override per tensor: merged ones get their original type
                # back, the others keep theirs (same type: llama.cpp copies them).
                keep = {t.name: t.tensor_type.name for t in br.tensors if len(t.shape) >= 2}
                keep.update(restore)
                overrides = {"^" + re.escape(n) + "$": tt for n, tt in keep.items()}
                try:
                    quantize_model(stage, final_tmp, qname, tensor_types=overrides, allow_requantize=True, progress=progress)
                except QuantizationError as e:
                    os.replace(stage, final_tmp)
                    notes.append(f"could not restore the original types of merged tensors ({e}); they are F16")
                else:
                    kinds = sorted(set(restore.values()))
                    notes.append(f"{len(restore)} merged tensors re-quantized by llama.cpp to their original types ({', '.join(kinds)})")

            default_mode(final_tmp)
        finally:
            if stage_dir:
                with contextlib.suppress(FileNotFoundError):
                    for p in Path(stage_dir).iterdir():
                        p.unlink()
                with contextlib.suppress(OSError):
                    os.rmdir(stage_dir)
