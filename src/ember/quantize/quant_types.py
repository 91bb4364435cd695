"""llama.cpp's quantization types (file types, ``llama_ftype``): names,
aliases, numbers, and which need an importance matrix."""

from __future__ import annotations

from typing import NamedTuple

from ember.errors import QuantizationError
from ember.ggml_types import GGML_TYPES, find_ggml_type


class QuantType(NamedTuple):
    """One row of llama-quantize's QUANT_OPTIONS. (A tuple so code that reads
    ``row[0]`` as the ftype keeps working.)"""

    ftype: int  # llama_ftype
    description: str
    tensor_type: str  # the ggml type most tensors of the mix get ("" for COPY)
    # llama.cpp refuses the type without an importance matrix
    # (tensor_requires_imatrix in llama-quant.cpp: IQ1/IQ2/IQ3_XXS tensors, and
    # Q2_K tensors inside a Q2_K_S file; IQ3_XS uses IQ3_XXS for attn_q/k and
    # most ffn_up/gate tensors).
    needs_imatrix: bool = False
    mix_bpw: float | None = None  # i-quant mixes: llama.cpp's quoted bits per weight

    @property
    def bits_per_weight(self) -> float:
        """Of the mix's main tensor type (``quantize --list MODEL`` gives the
        exact figure for a model, the whole mix included); 0 for COPY."""
        if self.mix_bpw is not None:
            return self.mix_bpw
        main = find_ggml_type(self.tensor_type)
        return main.bits_per_weight if main else 0.0


# Order and ftype ids follow llama.cpp's QUANT_OPTIONS (tools/quantize).
QUANT_TYPES: dict[str, QuantType] = {
    "Q1_0": QuantType(40, "1-bit, group 128", "Q1_0"),
    "Q2_0": QuantType(41, "2-bit, group 64", "Q2_0"),
    "Q4_0": QuantType(2, "4-bit legacy, one scale per 32", "Q4_0"),
    "Q4_1": QuantType(3, "4-bit legacy, scale and min per 32", "Q4_1"),
    "MXFP4_MOE": QuantType(38, "MXFP4 expert tensors, Q8_0 elsewhere", "MXFP4"),
    "Q5_0": QuantType(8, "5-bit legacy, one scale per 32", "Q5_0"),
    "Q5_1": QuantType(9, "5-bit legacy, scale and min per 32", "Q5_1"),
    "IQ2_XXS": QuantType(19, "2.06 bpw i-quant", "IQ2_XXS", True),
    "IQ2_XS": QuantType(20, "2.31 bpw i-quant", "IQ2_XS", True),
    "IQ2_S": QuantType(28, "2.5 bpw i-quant mix", "IQ2_XS", True, 2.5),
    "IQ2_M": QuantType(29, "2.7 bpw i-quant mix", "IQ2_S", True, 2.7),
    "IQ1_S": QuantType(24, "1.56 bpw i-quant", "IQ1_S", True),
    "IQ1_M": QuantType(31, "1.75 bpw i-quant", "IQ1_M", True),
    "TQ1_0": QuantType(36, "1.69 bpw ternary", "TQ1_0"),
    "TQ2_0": QuantType(37, "2.06 bpw ternary", "TQ2_0"),
    "Q2_K": QuantType(10, "2-bit K-quant mix", "Q2_K"),
    "Q2_K_S": QuantType(21, "2-bit K-quant, smaller mix", "Q2_K", True),
    "IQ3_XXS": QuantType(23, "3.06 bpw i-quant", "IQ3_XXS", True),
    "IQ3_S": QuantType(26, "3.44 bpw i-quant", "IQ3_S"),
    "IQ3_M": QuantType(27, "3.66 bpw i-quant mix", "IQ3_S", False, 3.66),
    "IQ3_XS": QuantType(22, "3.3 bpw i-quant mix", "IQ3_S", True, 3.3),
    "Q3_K_S": QuantType(11, "3-bit K-quant, small mix", "Q3_K"),
    "Q3_K_M": QuantType(12, "3-bit K-quant, medium mix", "Q3_K"),
    "Q3_K_L": QuantType(13, "3-bit K-quant, large mix", "Q3_K"),
    "IQ4_NL": QuantType(25, "4.5 bpw non-linear", "IQ4_NL"),
    "IQ4_XS": QuantType(30, "4.25 bpw non-linear", "IQ4_XS"),
    "Q4_K_S": QuantType(14, "4-bit K-quant, small mix", "Q4_K"),
    "Q4_K_M": QuantType(15, "4-bit K-quant, medium mix (a good default)", "Q4_K"),
    "Q5_K_S": QuantType(16, "5-bit K-quant, small mix", "Q5_K"),
    "Q5_K_M": QuantType(17, "5-bit K-quant, medium mix", "Q5_K"),
    "Q6_K": QuantType(18, "6-bit K-quant", "Q6_K"),
    "Q8_0": QuantType(7, "8-bit, nearly lossless", "Q8_0"),
    "F16": QuantType(1, "16-bit float", "F16"),
    "BF16": QuantType(32, "16-bit bfloat", "BF16"),
    "F32": QuantType(0, "32-bit float", "F32"),
    "COPY": QuantType(0, "copy tensors unchanged (re-writes metadata, joins or keeps splits)", ""),
}

_ALIASES = {
    "Q3_K": "Q3_K_M",  # llama.cpp's own aliases
    "Q4_K": "Q4_K_M",
    "Q5_K": "Q5_K_M",
    "FP16": "F16",
    "FLOAT16": "F16",
    "HALF": "F16",
    "FP32": "F32",
    "FLOAT32": "F32",
    "FLOAT": "F32",
    "BFLOAT16": "BF16",
    "MXFP4": "MXFP4_MOE",
}


def quant_type_for_ftype(ftype: int | None) -> str | None:
    """The type name of a ``general.file_type`` (15 -> Q4_K_M), or None."""
    return next((name for name, t in QUANT_TYPES.items() if t.ftype == ftype and name != "COPY"), None)


def parse_quant_type(name: str) -> str:
    """Canonical quant type name: case-insensitive, ``-`` or ``_``, llama.cpp's
    aliases (Q4_K -> Q4_K_M) and its numeric ftype ids ("15" -> Q4_K_M)."""
    key = str(name).strip().upper().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key in QUANT_TYPES:
        return key
    by_number = quant_type_for_ftype(int(key)) if key.isdigit() else None
    if by_number is not None:
        return by_number
    raise QuantizationError(
        f"unknown quantization type {name!r}; valid types: {', '.join(QUANT_TYPES)} "
        "(aliases: Q3_K, Q4_K, Q5_K, FP16, FP32)"
    )


def parse_ggml_type(name: str, what: str = "tensor type") -> int:
    """ggml tensor type name (q8_0, Q6_K, f16...) -> ggml_type id, for the
    types quantization may write."""
    key = str(name).strip().upper().replace("-", "_")
    found = find_ggml_type("F16" if key == "FP16" else key)
    if found is None or not found.quantize_target:
        valid = ", ".join(t.name.lower() for t in GGML_TYPES if t.quantize_target)
        raise QuantizationError(f"unknown {what} {name!r}; valid: {valid}")
    return found.id


def needs_imatrix(qtype: str) -> bool:
    return QUANT_TYPES[parse_quant_type(qtype)].needs_imatrix
