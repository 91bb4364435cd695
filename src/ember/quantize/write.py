"""Quantize a GGUF to a new file, or to one file per shard: checked input,
atomic output (nothing is left under a final name if llama.cpp fails)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from ember.errors import QuantizationError
from ember.fsutil import atomic_path
from ember.gguf import shard_name
from ember.progress import ProgressCallback
from ember.quantize.imatrix import ImportanceMatrix, load_imatrix
from ember.quantize.llamacpp import QuantizeParams, build_params, run_quantize, validate_source
from ember.quantize.quant_types import parse_quant_type


def quantize_model(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    qtype: str,
    *,
    imatrix: str | os.PathLike[str] | ImportanceMatrix | None = None,
    output_tensor_type: str | None = None,
    token_embedding_type: str | None = None,
    tensor_types: dict[str, str] | None = None,
    pure: bool = False,
    allow_requantize: bool = False,
    keep_split: bool = False,
    leave_output_tensor: bool = False,
    nthread: int = 0,
    progress: ProgressCallback | None = None,
) -> list[Path]:
    """Quantize ``src`` (a GGUF, or any shard of a split one) to ``dst``.

    Returns the written files: ``[dst]``, or with ``keep_split`` and a split
    input one file per shard named like llama.cpp names them
    (``DST-00001-of-0000N.gguf``, where DST is ``dst`` without ``.gguf``).
    Nothing is left under a final name if llama.cpp fails.
    """
    src, dst = Path(src), Path(dst)
    qtype = parse_quant_type(qtype)
    shards = validate_source(src)
    src, n_shards = shards[0], len(shards)
    if dst.exists() and dst.is_dir():
        raise QuantizationError(f"{dst}: is a folder; give the output file name")
    with contextlib.suppress(OSError):
        if dst.exists() and os.path.samefile(src, dst):
            raise QuantizationError(f"{dst}: input and output are the same file")
    im = imatrix if imatrix is None or isinstance(imatrix, ImportanceMatrix) else load_imatrix(imatrix)
    split_output = keep_split and n_shards > 1
    params = build_params(
        qtype,
        imatrix=im,
        output_tensor_type=output_tensor_type,
        token_embedding_type=token_embedding_type,
        tensor_types=tensor_types,
        pure=pure,
        allow_requantize=allow_requantize,
        keep_split=split_output,
        leave_output_tensor=leave_output_tensor,
        nthread=nthread,
        dry_run=False,
    )
    label = f"quantizing to {qtype}"
    try:
        if split_output:
            return _quantize_to_shards(src, dst, params, progress, label, n_shards)
        with atomic_path(dst) as tmp:  # llama.cpp rewrites the file in place: its mode stays
            run_quantize(src, str(tmp), params, progress, label)
        return [dst]
    except OSError as e:
        raise QuantizationError(f"{dst}: cannot write the output ({e.strerror or e})") from None


def _quantize_to_shards(
    src: Path, dst: Path, params: QuantizeParams, progress: ProgressCallback | None, label: str, n_shards: int
) -> list[Path]:
    """llama.cpp names the shards itself from a prefix: give it a temporary
    one in the destination folder, then rename every shard once all exist."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    final_prefix = str(dst)[: -len(".gguf")] if dst.name.endswith(".gguf") else str(dst)
    tmp_prefix = tempfile.mktemp(prefix=f".{Path(final_prefix).name}.", suffix=".tmp", dir=dst.parent)
    tmp_files = [shard_name(tmp_prefix, i, n_shards) for i in range(n_shards)]
    finals = [shard_name(final_prefix, i, n_shards) for i in range(n_shards)]
    try:
        run_quantize(src, tmp_prefix, params, progress, label)
        for tmp in tmp_files:
            if not tmp.exists():
                raise QuantizationError(f"{src}: llama.cpp wrote no {tmp.name}")
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        for tmp, final in zip(tmp_files, finals, strict=True):
            os.replace(tmp, final)
    finally:
        for tmp in tmp_files:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
    return finals


def default_mode(path: Path) -> None:
    """Temporary files are created 0600; give outputs the usual umask mode.
    (For lora_merge's own temporary files; atomic_path already does this.)"""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
