"""ember merge-lora: the merged GGUF computes what llama.cpp computes with the
adapter applied at run time, for float and quantized bases."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from quantize_fixtures import FF, HIDDEN, VOCAB, tensor_types, write_tiny_llama

from ember.errors import EmberError, InvalidFileError
from ember.lora_merge import merge_lora

RANK = 8
ALPHA = 16.0


def write_adapter(path: Path, targets: dict[str, tuple[int, int]], *, seed: int = 3, arch: str = "llama", embd: bool = True) -> None:
    """A llama.cpp LoRA GGUF: for W of numpy shape (n_out, n_in), lora_a is
    (rank, n_in) and lora_b (n_out, rank); token_embd's halves are flipped."""
    import gguf

    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_type("adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", ALPHA)
    for name, (n_out, n_in) in targets.items():
        w.add_tensor(name + ".lora_a", (0.05 * rng.standard_normal((RANK, n_in))).astype(np.float32))
        w.add_tensor(name + ".lora_b", (0.05 * rng.standard_normal((n_out, RANK))).astype(np.float32))
    if embd:
        w.add_tensor("token_embd.weight.lora_a", (0.05 * rng.standard_normal((VOCAB, RANK))).astype(np.float32))
        w.add_tensor("token_embd.weight.lora_b", (0.05 * rng.standard_normal((HIDDEN, RANK))).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


TARGETS = {
    "blk.0.attn_q.weight": (HIDDEN, HIDDEN),
    "blk.0.attn_v.weight": (HIDDEN // 2, HIDDEN),
    "blk.1.ffn_down.weight": (HIDDEN, FF),
    "blk.1.ffn_up.weight": (FF, HIDDEN),
    "output.weight": (VOCAB, HIDDEN),
}


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("lora")


@pytest.fixture(scope="module")
def base(work: Path) -> Path:
    path = work / "base-f32.gguf"
    write_tiny_llama(path, n_layer=2, dtype="f32", seed=7)
    return path


@pytest.fixture(scope="module")
def adapter(work: Path) -> Path:
    path = work / "adapter.gguf"
    write_adapter(path, TARGETS)
    return path


PROMPT = "hello world the quick brown fox"


def logits(model: Path, lora: list[tuple[Path, float]] | None = None) -> np.ndarray:
    from ember.engine import load_model

    m = load_model(model, {"num_thread": 1}, lora=[(str(p), s) for p, s in (lora or [])])
    try:
        return m.logits(m.tokenize(PROMPT))
    finally:
        m.close()


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_merged_float_model_matches_runtime_adapter(base: Path, adapter: Path, work: Path, scale: float) -> None:
    out = work / f"merged-{scale}.gguf"
    result = merge_lora(base, adapter, out, scale=scale)
    assert result.n_merged == len(TARGETS) + 1
    runtime = logits(base, [(adapter, scale)])
    merged = logits(out)
    plain = logits(base)
    span = float(runtime.max() - runtime.min())
    assert np.abs(merged - runtime).max() < 1e-3 * span
    assert np.abs(plain - runtime).max() > 0.05 * span  # the adapter matters
    assert tensor_types(out) == tensor_types(base)


def test_merge_arithmetic(base: Path, adapter: Path, work: Path) -> None:
    from gguf import GGUFReader

    out = work / "merged-arith.gguf"
    merge_lora(base, adapter, out, scale=2.0)
    b = {t.name: np.asarray(t.data) for t in GGUFReader(base).tensors}
    m = {t.name: np.asarray(t.data) for t in GGUFReader(out).tensors}
    a = {t.name: np.asarray(t.data) for t in GGUFReader(adapter).tensors}
    s = 2.0 * ALPHA / RANK
    name = "blk.1.ffn_down.weight"
    want = b[name] + s * a[name + ".lora_b"] @ a[name + ".lora_a"]
    np.testing.assert_allclose(m[name], want, rtol=1e-5, atol=1e-6)
    e = "token_embd.weight"
    np.testing.assert_allclose(m[e], b[e] + s * a[e + ".lora_a"] @ a[e + ".lora_b"].T, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(m["blk.1.attn_k.weight"], b["blk.1.attn_k.weight"])


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K_M"])
def test_quantized_base_keeps_its_types(base: Path, adapter: Path, work: Path, qtype: str) -> None:
    from ember.quantize import quantize_model

    qbase = work / f"base-{qtype}.gguf"
    quantize_model(base, qbase, qtype, nthread=1)
    out = work / f"merged-{qtype}.gguf"
    result = merge_lora(qbase, adapter, out)
    assert tensor_types(out) == tensor_types(qbase)
    if qtype == "Q4_K_M":
        assert any("re-quantized" in n for n in result.notes)
    runtime = logits(qbase, [(adapter, 1.0)])
    merged = logits(out)
    span = float(runtime.max() - runtime.min())
    # merged weights are re-quantized: a quantization-sized difference, far
    # below what the adapter itself changes
    diff = np.abs(merged - runtime).max()
    effect = np.abs(logits(qbase) - runtime).max()
    assert diff < 0.25 * effect and diff < 0.1 * span
    # untouched tensors are copied bit for bit
    from gguf import GGUFReader

    qb = {t.name: np.asarray(t.data) for t in GGUFReader(qbase).tensors}
    mo = {t.name: np.asarray(t.data) for t in GGUFReader(out).tensors}
    np.testing.assert_array_equal(mo["blk.1.attn_k.weight"], qb["blk.1.attn_k.weight"])


def test_refusals(base: Path, adapter: Path, work: Path) -> None:
    wrong = work / "wrong-arch.gguf"
    write_adapter(wrong, {"blk.0.attn_q.weight": (HIDDEN, HIDDEN)}, arch="qwen2", embd=False)
    with pytest.raises(InvalidFileError, match="architecture"):
        merge_lora(base, wrong, work / "x.gguf")
    bad_shape = work / "bad-shape.gguf"
    write_adapter(bad_shape, {"blk.0.attn_q.weight": (HIDDEN, FF)}, embd=False)
    with pytest.raises(InvalidFileError, match="wrong base model"):
        merge_lora(base, bad_shape, work / "x.gguf")
    no_base = work / "no-base.gguf"
    write_adapter(no_base, {"blk.9.attn_q.weight": (HIDDEN, HIDDEN)}, embd=False)
    with pytest.raises(InvalidFileError, match="no counterpart"):
        merge_lora(base, no_base, work / "x.gguf")
    with pytest.raises(InvalidFileError, match="not 'adapter'"):
        merge_lora(base, base, work / "x.gguf")
    tied = work / "tied.gguf"
    write_tiny_llama(tied, n_layer=2, dtype="f32", tied=True)
    with pytest.raises(EmberError, match="ties its output"):
        merge_lora(tied, adapter, work / "x.gguf")
    assert not (work / "x.gguf").exists()
    assert not [p for p in work.iterdir() if p.name.startswith(".")]


def test_cli_merge_lora(base: Path, adapter: Path, work: Path) -> None:
    out = work / "cli-merged.gguf"
    r = subprocess.run(
        [sys.executable, "-m", "ember.cli.main", "merge-lora", str(base), str(adapter), str(out), "--scale", "0.5"],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert out.exists() and "merged" in r.stdout
    r = subprocess.run(
        [sys.executable, "-m", "ember.cli.main", "merge-lora", str(base), str(base), str(work / "y.gguf")],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 1 and r.stderr.startswith("Error:") and "Traceback" not in r.stderr
