"""``quantize --recommend``: the best-quality type whose weights, KV cache and
compute buffers fit in a memory budget."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ember.errors import InvalidFileError, QuantizationError
from ember.ggml_types import KV_CACHE_TYPES
from ember.gguf import GGUFHeader, read_model
from ember.quantize.llamacpp import validate_source
from ember.quantize.plan import plan_quantization
from ember.quantize.quant_types import parse_quant_type, quant_type_for_ftype

# Perplexity increase over F16 that llama.cpp's quantize tool publishes for
# each type (its QUANT_OPTIONS help text: "+0.1754 ppl @ Llama-3-8B"; F16/BF16
# are quoted for Mistral-7B). A typical figure for an 8B model, not a
# measurement of the model at hand: pass measured numbers to do better.
PUBLISHED_PPL_INCREASE: dict[str, float] = {
    "F16": 0.0020, "BF16": -0.0050, "Q8_0": 0.0026, "Q6_K": 0.0217, "Q5_K_M": 0.0569,
    "Q5_K_S": 0.1049, "Q5_1": 0.1062, "Q5_0": 0.1316, "Q4_K_M": 0.1754, "Q4_K_S": 0.2689,
    "Q4_1": 0.4511, "Q4_0": 0.4685, "Q3_K_L": 0.5562, "Q3_K_M": 0.6569, "Q3_K_S": 1.6321,
    "Q2_K_S": 3.1836, "Q2_K": 3.5199,
}
# Highest quality first; imatrix-free types with a published number.
_CANDIDATES = ["F16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q4_K_M", "Q4_K_S", "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K"]


@dataclass
class RecommendRow:
    qtype: str
    weights: int
    kv_cache: int
    compute: int
    fits: bool
    quality: str

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.compute


@dataclass
class Recommendation:
    model: Path
    memory: int
    num_ctx: int
    rows: list[RecommendRow]
    choice: RecommendRow | None
    quality_source: str

    def report_lines(self) -> list[str]:
        def gb(n: int) -> str:
            return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"

        lines = [f"{self.model.name}: memory budget {gb(self.memory)}, context {self.num_ctx} tokens (f16 KV cache)"]
        lines.append(f"{'type':8} {'weights':>10} {'KV cache':>10} {'compute':>10} {'total':>10}  fits  quality")
        for r in self.rows:
            mark = "yes" if r.fits else "no"
            lines.append(f"{r.qtype:8} {gb(r.weights):>10} {gb(r.kv_cache):>10} {gb(r.compute):>10} {gb(r.total):>10}  {mark:4}  {r.quality}")
        if self.choice is None:
            smallest = min(self.rows, key=lambda r: r.total)
            lines.append(
                f"nothing fits: the smallest, {smallest.qtype}, needs {gb(smallest.total)}; "
                "use a smaller --num-ctx, a smaller model, or an imatrix type (IQ2/IQ3) with --imatrix"
            )
        else:
            lines.append(f"recommended: {self.choice.qtype} ({gb(self.choice.total)} of {gb(self.memory)}; quality: {self.choice.quality})")
        lines.append(f"quality numbers: {self.quality_source}")
        lines.append("sizes: weights from llama.cpp's dry run of this model; KV cache and compute buffers are estimates")
        return lines


def kv_and_compute(header: GGUFHeader, num_ctx: int) -> tuple[int, int]:
    """Bytes of an f16 KV cache for ``num_ctx`` tokens (every layer full size,
    as Ember's engine allocates it) and an estimate of llama.cpp's compute
    buffers for a 512-token batch."""

    def val(key: str, default: Any = None) -> Any:
        v = header.get(key)
        if v is None:
            return default
        if isinstance(v, (list, tuple)):
            v = max(v) if v else default
        return v

    arch = val("general.architecture", "llama")
    n_layer = int(val(f"{arch}.block_count", 0))
    n_embd = int(val(f"{arch}.embedding_length", 0))
    n_head = int(val(f"{arch}.attention.head_count", 1) or 1)
    n_head_kv = int(val(f"{arch}.attention.head_count_kv", n_head) or n_head)
    k_len = int(val(f"{arch}.attention.key_length", n_embd // n_head if n_head else 0))
    v_len = int(val(f"{arch}.attention.value_length", k_len))
    n_ff = int(val(f"{arch}.feed_forward_length", 4 * n_embd) or 4 * n_embd)
    tokens = header.kv.get("tokenizer.ggml.tokens")
    n_vocab = tokens.count if tokens is not None else 32000
    kv = KV_CACHE_TYPES["f16"].nbytes(n_layer * num_ctx * n_head_kv * (k_len + v_len))
    ubatch = 512
    # llama.cpp reserves its compute buffer for a full batch of outputs: the
    # logits of 512 tokens dominate for large vocabularies, the feed-forward
    # activations for the rest. Flash attention (on by default on CPUs) never
    # materializes the heads x context attention scores.
    compute = 4 * ubatch * (n_vocab + 3 * n_ff + 4 * n_embd) + 4 * n_vocab
    return kv, compute


def _load_quality(quality_file: str | os.PathLike[str]) -> dict[str, dict[str, float]]:
    path = Path(quality_file)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return {parse_quant_type(k): v for k, v in data.get("types", data).items() if isinstance(v, dict)}
    except (OSError, ValueError, AttributeError) as e:
        raise InvalidFileError(f"{path}: not a quality JSON from bench/bench_quant_quality.py ({e})") from None


def _measured_quality(m: dict[str, float]) -> str:
    parts = []
    if "kld" in m:
        parts.append(f"KLD {m['kld']:.4f}")
    if "ppl" in m:
        parts.append(f"PPL {m['ppl']:.3f}")
    if "ppl_base" in m and "ppl" in m:
        parts.append(f"({100 * (m['ppl'] / m['ppl_base'] - 1):+.1f}% vs F16)")
    return " ".join(parts) or "measured"


def recommend(
    src: str | os.PathLike[str],
    memory: int,
    *,
    num_ctx: int = 4096,
    quality_file: str | os.PathLike[str] | None = None,
) -> Recommendation:
    """The best-quality quant of ``src`` whose weights, KV cache for
    ``num_ctx`` tokens and compute buffers fit in ``memory`` bytes.

    Quality: measured numbers from ``quality_file`` (JSON written by
    bench/bench_quant_quality.py: {type: {"kld": .., "ppl": ..}}) when given,
    else llama.cpp's published perplexity increases for Llama-3-8B."""
    src = Path(src)
    shards = validate_source(src)
    first = shards[0]
    if memory <= 0:
        raise QuantizationError("--memory must be positive, e.g. 8G")
    if num_ctx <= 0:
        raise QuantizationError("--num-ctx must be positive")
    measured = _load_quality(quality_file) if quality_file is not None else {}
    candidates = [c for c in _CANDIDATES if c in measured] if measured else list(_CANDIDATES)
    header = read_model(first)[0]
    kv, compute = kv_and_compute(header, num_ctx)
    file_type = header.get("general.file_type")
    src_ftype = None if file_type is None else int(file_type)
    src_quantized = src_ftype not in (None, 0, 1, 32)
    src_name = quant_type_for_ftype(src_ftype)
    file_bytes = sum(p.stat().st_size for p in shards)
    rows: list[RecommendRow] = []
    for qt in candidates:
        plan = plan_quantization(first, qt)
        weights = plan.output_file_bytes(file_bytes)
        if qt in measured:
            quality = _measured_quality(measured[qt])
        else:
            quality = f"{PUBLISHED_PPL_INCREASE[qt]:+.4f} PPL @Llama-3-8B" if qt in PUBLISHED_PPL_INCREASE else "n/a"
        if src_quantized:
            # Re-quantizing cannot add back what the source lost: offer only
            # smaller types, and the source's own type as it is.
            if qt == src_name:
                quality += " (the file as it is)"
            elif weights >= max(file_bytes, plan.source_bytes):
                continue
            else:
                quality += " + requantization loss (--allow-requantize)"
        total = weights + kv + compute
        rows.append(RecommendRow(qt, weights, kv, compute, total <= memory, quality))
    if not rows:
        raise QuantizationError(f"{src}: no candidate type is smaller than the model as it is")
    choice = next((r for r in rows if r.fits), None)
    source = (
        f"measured on this machine ({quality_file})"
        if measured
        else "llama.cpp's published perplexity increase over F16 for Llama-3-8B (llama-quantize --help)"
    )
    return Recommendation(src, memory, num_ctx, rows, choice, source)
