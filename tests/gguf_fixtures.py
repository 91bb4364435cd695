"""Helpers for the GGUF tests: a tiny real GGUF written with gguf-py (every
value type, several tensor types), llama.cpp's own GGUF parser through
ctypes as an oracle, and the `ember` console script."""

from __future__ import annotations

import ctypes
import subprocess
import sys
from pathlib import Path
from typing import Any

import gguf
import numpy as np

EMBER = Path(sys.executable).parent / "ember"


def write_tiny_gguf(path: Path, *, split_max_tensors: int = 0, small_first_shard: bool = False) -> list[Path]:
    """A small GGUF with keys of every value type and tensors of several types
    (float and quantized, some needing padding). With ``split_max_tensors``
    gguf-py writes llama.cpp-style shards; returns the written paths."""
    w = gguf.GGUFWriter(
        path, "llama", split_max_tensors=split_max_tensors, small_first_shard=small_first_shard
    )
    w.add_name("tiny test model")
    w.add_context_length(128)
    w.add_embedding_length(64)
    w.add_block_count(1)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_uint8("test.u8", 200)
    w.add_int8("test.i8", -5)
    w.add_uint16("test.u16", 60000)
    w.add_int16("test.i16", -30000)
    w.add_uint32("test.u32", 4_000_000_000)
    w.add_int32("test.i32", -2_000_000_000)
    w.add_float32("test.f32", 0.5)
    w.add_uint64("test.u64", 2**63 + 5)
    w.add_int64("test.i64", -(2**62))
    w.add_float64("test.f64", 3.141592653589793)
    w.add_bool("test.bool", True)
    w.add_string("test.string", "héllo wörld")
    w.add_array("test.arr_i32", [1, -2, 3])
    w.add_array("test.arr_f32", [0.25, 0.5])
    w.add_array("test.arr_bool", [True, False, True])
    w.add_array("test.arr_str", ["a", "bc", "déf"])
    w.add_key_value("test.arr_u16", [1, 2, 65535], gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.UINT16)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"tok{i}" for i in range(100)])
    w.add_token_scores([float(-i) for i in range(100)])
    w.add_chat_template("{% for m in messages %}{{ m.content }}{% endfor %}")
    rng = np.random.default_rng(0)
    w.add_tensor("token_embd.weight", rng.standard_normal((8, 64)).astype(np.float32))
    w.add_tensor("blk.0.attn_norm.weight", rng.standard_normal(64).astype(np.float32))
    w.add_tensor("blk.0.attn_q.weight", rng.standard_normal((4, 64)).astype(np.float16))
    w.add_tensor(
        "blk.0.attn_k.weight", rng.integers(0, 255, (2, 68), dtype=np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q8_0
    )
    w.add_tensor(
        "blk.0.ffn_up.weight", rng.integers(0, 255, (1, 144), dtype=np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q4_K
    )
    w.add_tensor("blk.0.ids", np.arange(5, dtype=np.int32))
    w.add_tensor("output_norm.weight", rng.standard_normal(3).astype(np.float32))
    paths = w.format_shard_names(Path(path))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return paths


_GGML: ctypes.CDLL | None = None


class _InitParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]


def _ggml() -> ctypes.CDLL:
    global _GGML
    if _GGML is None:
        import llama_cpp

        lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
        vp, i64 = ctypes.c_void_p, ctypes.c_int64
        sigs = {
            "gguf_init_from_file": (vp, [ctypes.c_char_p, _InitParams]),
            "gguf_free": (None, [vp]),
            "gguf_get_version": (ctypes.c_uint32, [vp]),
            "gguf_get_alignment": (ctypes.c_size_t, [vp]),
            "gguf_get_data_offset": (ctypes.c_size_t, [vp]),
            "gguf_get_n_kv": (i64, [vp]),
            "gguf_get_key": (ctypes.c_char_p, [vp, i64]),
            "gguf_get_kv_type": (ctypes.c_int, [vp, i64]),
            "gguf_get_arr_type": (ctypes.c_int, [vp, i64]),
            "gguf_get_arr_n": (ctypes.c_size_t, [vp, i64]),
            "gguf_get_val_data": (vp, [vp, i64]),
            "gguf_get_val_str": (ctypes.c_char_p, [vp, i64]),
            "gguf_get_n_tensors": (i64, [vp]),
            "gguf_get_tensor_name": (ctypes.c_char_p, [vp, i64]),
            "gguf_get_tensor_type": (ctypes.c_int, [vp, i64]),
            "gguf_get_tensor_offset": (ctypes.c_size_t, [vp, i64]),
            "gguf_get_tensor_size": (ctypes.c_size_t, [vp, i64]),
            "gguf_get_tensor_ne": (ctypes.POINTER(ctypes.c_int64), [vp, i64]),
        }
        for name, (res, args) in sigs.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = res, args
        _GGML = lib
    return _GGML


def llama_cpp_gguf_ok(path: Path) -> bool:
    """Whether llama.cpp's own GGUF parser (ggml's gguf_init_from_file) accepts
    the file's header and tables."""
    lib = _ggml()
    ctx = lib.gguf_init_from_file(str(path).encode(), _InitParams(True, None))
    if not ctx:
        return False
    lib.gguf_free(ctx)
    return True


_CTYPES = {0: ctypes.c_uint8, 1: ctypes.c_int8, 2: ctypes.c_uint16, 3: ctypes.c_int16, 4: ctypes.c_uint32,
           5: ctypes.c_int32, 6: ctypes.c_float, 7: ctypes.c_bool, 10: ctypes.c_uint64, 11: ctypes.c_int64,
           12: ctypes.c_double}


def llama_cpp_gguf_tables(path: Path) -> dict[str, Any]:
    """The header as llama.cpp's parser reads it: keys (name, type, scalar value
    or (element type, length) for arrays) and tensors (name, type, ne, offset, size)."""
    lib = _ggml()
    ctx = lib.gguf_init_from_file(str(path).encode(), _InitParams(True, None))
    assert ctx, f"llama.cpp cannot parse {path}"
    try:
        kv = []
        for i in range(lib.gguf_get_n_kv(ctx)):
            key = lib.gguf_get_key(ctx, i).decode()
            t = lib.gguf_get_kv_type(ctx, i)
            if t == 9:
                value: Any = (lib.gguf_get_arr_type(ctx, i), lib.gguf_get_arr_n(ctx, i))
            elif t == 8:
                value = lib.gguf_get_val_str(ctx, i).decode()
            else:
                value = ctypes.cast(lib.gguf_get_val_data(ctx, i), ctypes.POINTER(_CTYPES[t]))[0]
            kv.append((key, t, value))
        tensors = []
        for i in range(lib.gguf_get_n_tensors(ctx)):
            ne = lib.gguf_get_tensor_ne(ctx, i)
            tensors.append((
                lib.gguf_get_tensor_name(ctx, i).decode(), lib.gguf_get_tensor_type(ctx, i),
                [ne[d] for d in range(4)], lib.gguf_get_tensor_offset(ctx, i), lib.gguf_get_tensor_size(ctx, i),
            ))
        return {
            "version": lib.gguf_get_version(ctx), "alignment": lib.gguf_get_alignment(ctx),
            "data_offset": lib.gguf_get_data_offset(ctx), "kv": kv, "tensors": tensors,
        }
    finally:
        lib.gguf_free(ctx)


def run_ember(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(EMBER), *map(str, args)], capture_output=True, text=True, timeout=timeout, check=False
    )
