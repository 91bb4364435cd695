"""``ember imatrix``: an importance matrix from sample text, as llama-imatrix
makes it, collected through llama.cpp's eval callback."""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp as lc
import numpy as np
from llama_cpp import _ggml

from ember.engine import load_model
from ember.errors import InvalidFileError, QuantizationError
from ember.progress import ProgressCallback
from ember.quantize.imatrix import write_imatrix


class _GGMLTensor(ctypes.Structure):
    """``struct ggml_tensor`` of the vendored ggml (ggml.h); the layout is
    checked against ggml's own accessors before any field is trusted."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * 4),
        ("nb", ctypes.c_size_t * 4),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * 16),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * 10),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * 64),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


def _ggml_lib() -> Any:
    lib = _ggml.libggml
    lib.ggml_op_name.restype = ctypes.c_char_p
    lib.ggml_op_name.argtypes = [ctypes.c_int]
    lib.ggml_get_name.restype = ctypes.c_char_p
    lib.ggml_get_name.argtypes = [ctypes.c_void_p]
    lib.ggml_nelements.restype = ctypes.c_int64
    lib.ggml_nelements.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_tensor_get.restype = None
    lib.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    return lib


@dataclass
class ImatrixResult:
    path: Path
    n_entries: int
    n_chunks: int
    n_tokens: int


def compute_imatrix(
    model: str | os.PathLike[str],
    text_file: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    n_ctx: int = 512,
    max_chunks: int | None = None,
    threads: int | None = None,
    progress: ProgressCallback | None = None,
) -> ImatrixResult:
    """Write an importance matrix (llama-imatrix's GGUF format) for ``model``
    from sample text: for every matrix multiplication with a ``blk.*`` weight,
    the sum of squared input activations per input column and the number of
    tokens, collected through llama.cpp's eval callback on chunks of
    ``n_ctx`` tokens (BOS first, as llama-imatrix). Dense weights only
    (mixture-of-experts tensors are refused)."""
    text_path = Path(text_file)
    if not text_path.is_file():
        raise InvalidFileError(f"{text_path}: no such text file")
    try:
        text = text_path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InvalidFileError(f"{text_path}: not UTF-8 text (byte {e.start})") from None
    lib = _ggml_lib()
    op_mul_mat = next(i for i in range(200) if (lib.ggml_op_name(i) or b"") == b"MUL_MAT")
    op_mul_mat_id = next(i for i in range(200) if (lib.ggml_op_name(i) or b"") == b"MUL_MAT_ID")
    sums: dict[str, Any] = {}
    counts: dict[str, int] = {}
    errors: list[str] = []
    checked = [False]

    def weight_name(ptr: int) -> str:
        name = (lib.ggml_get_name(ptr) or b"").decode("utf-8", "replace")
        if "#" in name:  # backend copies: "CUDA0#blk.0.attn_q.weight#0"
            parts = name.split("#")
            name = parts[1] if len(parts) > 1 else name
        return name

    def on_eval(t_ptr: int, ask: bool, _ud: Any) -> bool:
        try:
            t = _GGMLTensor.from_address(t_ptr)
            if not checked[0]:
                if (lib.ggml_get_name(t_ptr) or b"") != t.name.split(b"\0")[0] or lib.ggml_nelements(t_ptr) != (
                    t.ne[0] * t.ne[1] * t.ne[2] * t.ne[3]
                ):
                    errors.append("ggml_tensor layout does not match this llama.cpp build")
                    return False
                checked[0] = True
            if t.op not in (op_mul_mat, op_mul_mat_id) or not t.src[0] or not t.src[1]:
                return False if ask else True
            wname = weight_name(t.src[0])
            if not wname.startswith("blk."):
                return False if ask else True
            if t.op == op_mul_mat_id:
                errors.append(f"{wname}: mixture-of-experts weights are not supported here; use llama-imatrix")
                return False
            s1 = _GGMLTensor.from_address(t.src[1])
            if ask:
                return bool(s1.ne[1] >= 16 and s1.type == lc.GGML_TYPE_F32)
            w = _GGMLTensor.from_address(t.src[0])
            n_mat = int(w.ne[2] * w.ne[3])
            if n_mat != 1 or s1.ne[2] * s1.ne[3] != 1 or s1.nb[0] != 4:
                errors.append(f"{wname}: batched matrix multiplication is not supported here")
                return False
            ne0, ntok = int(s1.ne[0]), int(s1.ne[1])
            nbytes = int(s1.nb[1]) * (ntok - 1) + 4 * ne0
            buf = np.empty(nbytes // 4 + 1, dtype=np.float32)
            lib.ggml_backend_tensor_get(t.src[1], buf.ctypes.data, 0, nbytes)
            x = np.lib.stride_tricks.as_strided(buf, shape=(ntok, ne0), strides=(int(s1.nb[1]), 4))
            acc = sums.get(wname)
            if acc is None:
                acc = sums[wname] = np.zeros(ne0, dtype=np.float64)
            elif acc.size != ne0:
                errors.append(f"{wname}: inconsistent input size ({acc.size} vs {ne0})")
                return False
            acc += (x.astype(np.float64) ** 2).sum(axis=0)
            counts[wname] = counts.get(wname, 0) + ntok
            return True
        except Exception as e:  # noqa: BLE001 - never let an exception cross into C
            errors.append(f"{type(e).__name__}: {e}")
            return False

    callback = lc.ggml_backend_sched_eval_callback(on_eval)
    m = load_model(model, {"num_thread": threads} if threads else None)
    try:
        tokens = m.tokenize(text, add_special=True, parse_special=False)
        if len(tokens) < n_ctx:
            raise QuantizationError(
                f"{text_path}: the text tokenizes to only {len(tokens)} tokens; an importance matrix with --ctx {n_ctx} needs at least {n_ctx}"
            )
        n_chunks = len(tokens) // n_ctx
        if max_chunks:
            n_chunks = min(n_chunks, max_chunks)
        params = lc.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_ctx
        params.n_ubatch = min(n_ctx, 512)
        params.n_seq_max = 1
        if threads:
            params.n_threads = params.n_threads_batch = threads
        params.cb_eval = callback
        params.cb_eval_user_data = None
        ctx = lc.llama_init_from_model(m.ptr, params)
        if not ctx:
            raise QuantizationError(f"llama.cpp could not create a context of {n_ctx} tokens")
        batch = lc.llama_batch_init(n_ctx, 0, 1)
        try:
            for c in range(n_chunks):
                chunk = list(tokens[c * n_ctx : (c + 1) * n_ctx])
                if m.add_bos:
                    chunk[0] = m.bos_id
                lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
                for i, tok in enumerate(chunk):
                    batch.token[i] = tok
                    batch.pos[i] = i
                    batch.n_seq_id[i] = 1
                    batch.seq_id[i][0] = 0
                    batch.logits[i] = True  # as llama-imatrix: the last layer then sees every token
                batch.n_tokens = n_ctx
                rc = lc.llama_decode(ctx, batch)
                if errors:
                    raise QuantizationError(f"importance matrix: {errors[0]}")
                if rc != 0:
                    raise QuantizationError(f"llama_decode failed ({rc}) while computing the importance matrix")
                if progress:
                    progress("importance matrix", c + 1, n_chunks)
        finally:
            lc.llama_batch_free(batch)
            lc.llama_free(ctx)
    finally:
        m.close()
    if not sums:
        raise QuantizationError("importance matrix: no blk.* matrix multiplication was seen")
    write_imatrix(Path(output), sums, counts, text_path.name, n_chunks, n_ctx)
    return ImatrixResult(Path(output), len(sums), n_chunks, n_chunks * n_ctx)
