"""ember.ggml_types: every row checked against the ggml library llama-cpp-python
links and against gguf-py; the KV cache types against what llama.cpp allocates
and what the options accept."""

from __future__ import annotations

import ctypes

import gguf
import llama_cpp as lc
import pytest
from llama_cpp import _ggml

from ember import options
from ember.engine import load_model
from ember.errors import OptionError
from ember.ggml_types import GGML_TYPE_COUNT, GGML_TYPES, KV_CACHE_TYPES, find_ggml_type


def _libggml() -> ctypes.CDLL:
    lib = _ggml.libggml
    lib.ggml_type_name.restype = ctypes.c_char_p
    lib.ggml_type_name.argtypes = [ctypes.c_int]
    lib.ggml_blck_size.restype = ctypes.c_int64
    lib.ggml_blck_size.argtypes = [ctypes.c_int]
    lib.ggml_type_size.restype = ctypes.c_size_t
    lib.ggml_type_size.argtypes = [ctypes.c_int]
    return lib  # type: ignore[no-any-return]


def test_every_ggml_type_matches_the_linked_ggml() -> None:
    lib = _libggml()
    assert GGML_TYPE_COUNT == lc.GGML_TYPE_COUNT
    by_id = {t.id: t for t in GGML_TYPES}
    assert len(by_id) == len(GGML_TYPES)
    for i in range(GGML_TYPE_COUNT):
        size = lib.ggml_type_size(i)
        if size == 0:  # a removed type ("DEPRECATED", "... REMOVED, use ...")
            assert i not in by_id
            continue
        t = by_id[i]  # every live ggml type is in the table
        assert (t.name, t.block_size, t.type_size) == (lib.ggml_type_name(i).decode(), lib.ggml_blck_size(i), size)


def test_ggml_types_agree_with_gguf_py_where_it_knows_them() -> None:
    # gguf 0.19.0 on PyPI still gives Q8_1 its old layout (two f32 scales, 40 bytes);
    # ggml's block_q8_1 has two f16 scales (36 bytes). Q8_1 never appears in model files.
    stale = {("Q8_1", (32, 40))}
    compared = 0
    for t in GGML_TYPES:
        q = gguf.GGMLQuantizationType.__members__.get(t.name.upper())
        if q is None:
            continue  # newer than this gguf-py (Q2_0 in 0.19.0)
        assert q.value == t.id, t.name
        sizes = gguf.GGML_QUANT_SIZES[q]
        if (t.name.upper(), sizes) not in stale:
            assert sizes == (t.block_size, t.type_size), t.name
            compared += 1
    assert compared >= 30


def test_lookup_is_case_insensitive() -> None:
    q4k = find_ggml_type("q4_K")
    assert q4k is not None and q4k is find_ggml_type("Q4_K") is find_ggml_type(" q4_k ")
    assert q4k.bits_per_weight == 4.5 and q4k.nbytes(512) == 288
    assert find_ggml_type("q4_z") is None


def test_kv_cache_types_are_the_options_and_allocate_what_the_engine_expects() -> None:
    from ember.demo import demo_model_path

    assert options.KV_CACHE_TYPES == tuple(KV_CACHE_TYPES)
    assert set(KV_CACHE_TYPES) == {"f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1"}  # common/arg.cpp
    help_text = options.SPECS["kv_cache_type"].help
    assert all(name in help_text for name in KV_CACHE_TYPES)
    assert options.coerce("kv_cache_type", "iq4_nl") == "iq4_nl"
    with pytest.raises(OptionError, match="q5_1"):
        options.coerce("kv_cache_type", "q4_K")
    n_ctx = 256
    for name in KV_CACHE_TYPES:
        m = load_model(demo_model_path(), {"num_thread": 1, "kv_cache_type": name, "num_ctx": n_ctx})
        try:
            ctx = m.new_context(n_ctx)
            got = ctx.buffers["CPU KV"]  # llama.cpp's own figure (logged in MiB with two decimals)
            ctx.close()
            want = m.kv_bytes_per_token(name) * n_ctx
            assert abs(got - want) <= 0.005 * want, (name, got, want)
        finally:
            m.close()
