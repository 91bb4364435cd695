"""ggml's tensor types: one table for the engine (KV cache types) and for
quantization (target types, tensor sizes).

Ids, names and block layouts are those of the ggml vendored by the pinned
llama-cpp-python (``enum ggml_type`` in ggml.h, ``type_traits`` in ggml.c).
They are written out here rather than read from gguf-py because the options
table needs them whenever ``ember`` starts (gguf-py pulls in numpy and yaml),
and because gguf-py's PyPI release lags ggml: gguf 0.19.0 lacks Q2_0 and
still gives Q8_1 its old 40-byte block (ggml's is 36). The tests check every
row against the ggml library that is linked and against gguf-py wherever
gguf-py knows the type.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GGMLType:
    name: str  # ggml's own spelling (ggml_type_name): "f16", "q4_K", "iq4_nl"
    id: int  # enum ggml_type
    block_size: int  # elements per block
    type_size: int  # bytes per block
    # Ember lets quantization write it (target of a mix, --tensor-type,
    # --output-tensor-type): not the integer types, F64, the Q8_1/Q8_K
    # dot-product helpers, or NVFP4 (llama-quantize offers no NVFP4 type).
    quantize_target: bool = True
    # llama.cpp accepts it for the KV cache (kv_cache_types in common/arg.cpp).
    kv_cache: bool = False

    @property
    def bits_per_weight(self) -> float:
        return self.type_size * 8 / self.block_size

    def nbytes(self, n_elements: int) -> int:
        """Bytes of a tensor of ``n_elements`` stored in this type."""
        return n_elements // self.block_size * self.type_size


# In id order; removed ids (4, 5, 31-33, 36-38) are absent.
GGML_TYPES: tuple[GGMLType, ...] = (
    GGMLType("f32", 0, 1, 4, kv_cache=True),
    GGMLType("f16", 1, 1, 2, kv_cache=True),
    GGMLType("q4_0", 2, 32, 18, kv_cache=True),
    GGMLType("q4_1", 3, 32, 20, kv_cache=True),
    GGMLType("q5_0", 6, 32, 22, kv_cache=True),
    GGMLType("q5_1", 7, 32, 24, kv_cache=True),
    GGMLType("q8_0", 8, 32, 34, kv_cache=True),
    GGMLType("q8_1", 9, 32, 36, quantize_target=False),
    GGMLType("q2_K", 10, 256, 84),
    GGMLType("q3_K", 11, 256, 110),
    GGMLType("q4_K", 12, 256, 144),
    GGMLType("q5_K", 13, 256, 176),
    GGMLType("q6_K", 14, 256, 210),
    GGMLType("q8_K", 15, 256, 292, quantize_target=False),
    GGMLType("iq2_xxs", 16, 256, 66),
    GGMLType("iq2_xs", 17, 256, 74),
    GGMLType("iq3_xxs", 18, 256, 98),
    GGMLType("iq1_s", 19, 256, 50),
    GGMLType("iq4_nl", 20, 32, 18, kv_cache=True),
    GGMLType("iq3_s", 21, 256, 110),
    GGMLType("iq2_s", 22, 256, 82),
    GGMLType("iq4_xs", 23, 256, 136),
    GGMLType("i8", 24, 1, 1, quantize_target=False),
    GGMLType("i16", 25, 1, 2, quantize_target=False),
    GGMLType("i32", 26, 1, 4, quantize_target=False),
    GGMLType("i64", 27, 1, 8, quantize_target=False),
    GGMLType("f64", 28, 1, 8, quantize_target=False),
    GGMLType("iq1_m", 29, 256, 56),
    GGMLType("bf16", 30, 1, 2, kv_cache=True),
    GGMLType("tq1_0", 34, 256, 54),
    GGMLType("tq2_0", 35, 256, 66),
    GGMLType("mxfp4", 39, 32, 17),
    GGMLType("nvfp4", 40, 64, 36, quantize_target=False),
    GGMLType("q1_0", 41, 128, 18),
    GGMLType("q2_0", 42, 64, 18),
)
GGML_TYPE_COUNT = 43  # GGML_TYPE_COUNT: also the "no type" end marker llama.cpp's override arrays use

_BY_NAME = {t.name.upper(): t for t in GGML_TYPES}

# name -> type for the KV cache, as ``kv_cache_type`` spells them (f16, q8_0, ...).
KV_CACHE_TYPES: dict[str, GGMLType] = {t.name: t for t in GGML_TYPES if t.kv_cache}


def find_ggml_type(name: str) -> GGMLType | None:
    """The type of that name in any case (Q4_K, q4_k, q4_K), or None."""
    return _BY_NAME.get(name.strip().upper())
