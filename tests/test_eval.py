"""ember eval: perplexity and KL divergence as llama-perplexity computes them,
checked against a direct llama-cpp-python computation and, when built,
llama.cpp's own llama-perplexity."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from quantize_fixtures import write_tiny_llama

from ember.errors import EmberError, InvalidFileError, OptionError
from ember.evaluate import kl_divergence, perplexity

TOOLS = Path(__file__).resolve().parent.parent / "bench" / ".tools" / "bin"

TEXT = """\
The lighthouse keeper climbed the spiral stairs every evening at dusk, counting the steps as his
father had done before him. There were one hundred and twelve of them, worn smooth in the middle
by a century of boots. At the top he trimmed the wick, polished the great lens with a soft cloth,
and wrote the weather in a ledger whose first pages had turned the colour of weak tea.

Ships no longer needed him. Satellites told them where they were to within a few metres, and the
harbour office sent warnings by radio long before any storm could be seen from the gallery. Still,
the council paid his small salary, perhaps out of habit, perhaps because nobody wanted to be the
person who switched off the light. On clear nights he could see the glow of the city forty miles
to the south, and on foggy ones he could see nothing at all except the beam turning slowly through
the grey, touching nothing, returning.

In the spring a girl from the university arrived with a notebook and a recorder. She wanted to
know what the sea sounded like in February, how the gulls behaved before a gale, whether the old
stories about the drowned bell were true. He answered what he could. The sea in February sounded
like a train that never arrived. The gulls went quiet and sat on the rocks facing the wind. As for
the bell, he had heard it twice, both times on the night before somebody he loved had died, and he
did not want to talk about it any further. She wrote that down too, and thanked him, and went back
to the mainland on the afternoon boat, and he climbed the stairs again at dusk, counting.
"""

N_CTX = 128
N_CHUNKS = 2


@pytest.fixture(scope="module")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("eval") / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def demo() -> Path:
    from ember.demo import demo_model_path

    return demo_model_path()


def reference_nlls(model: Path, text: str, n_ctx: int, n_chunks: int) -> np.ndarray:
    """llama-perplexity's procedure written out with llama-cpp-python's
    high-level API (a separate loading and decoding path)."""
    import llama_cpp

    llm = llama_cpp.Llama(str(model), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, verbose=False, n_threads=2)
    try:
        tokens = llm.tokenize(text.encode(), add_bos=True, special=False)
        first = n_ctx // 2
        out = []
        for c in range(n_chunks):
            chunk = list(tokens[c * n_ctx : (c + 1) * n_ctx])
            if llm._model.add_bos_token():
                chunk[0] = llm.token_bos()
            llm.reset()
            llm.eval(chunk)
            scores = np.asarray(llm.scores[:n_ctx], dtype=np.float64)
            for i in range(first, n_ctx - 1):
                row = scores[i]
                mx = row.max()
                out.append(mx + np.log(np.exp(row - mx).sum()) - row[chunk[i + 1]])
        return np.asarray(out)
    finally:
        llm.close()


def test_demo_perplexity_matches_direct_llama_cpp(demo: Path, text_file: Path) -> None:
    # llama-cpp-python's Llama runs without flash attention
    r = perplexity(demo, text_file, n_ctx=N_CTX, max_chunks=N_CHUNKS, threads=2, flash_attn=False)
    nll = reference_nlls(demo, TEXT, N_CTX, N_CHUNKS)
    ref = float(np.exp(nll.mean()))
    assert r.n_chunks == N_CHUNKS and r.n_scored == len(nll) == N_CHUNKS * (N_CTX - 1 - N_CTX // 2)
    assert abs(r.ppl - ref) / ref < 0.005, (r.ppl, ref)
    assert 1.5 < r.ppl < 200  # a real model on real English
    sd = ref * np.sqrt(nll.var() / (len(nll) - 1))
    assert abs(r.ppl_stderr - sd) / sd < 0.02


@pytest.mark.skipif(not (TOOLS / "llama-perplexity").exists(), reason="bench/.tools/bin/llama-perplexity not built")
def test_demo_perplexity_matches_llama_perplexity(demo: Path, text_file: Path) -> None:
    # defaults on both sides: flash attention on (llama-perplexity's "auto" on a CPU)
    r = perplexity(demo, text_file, n_ctx=N_CTX, max_chunks=N_CHUNKS, threads=2)
    p = subprocess.run(
        [str(TOOLS / "llama-perplexity"), "-m", str(demo), "-f", str(text_file), "-c", str(N_CTX),
         "-b", str(N_CTX), "--chunks", str(N_CHUNKS), "-t", "2"],
        capture_output=True, text=True, timeout=300,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    m = re.search(r"Final estimate: PPL = ([\d.]+)", p.stdout + p.stderr)
    assert m, (p.stdout + p.stderr)[-2000:]
    theirs = float(m.group(1))
    assert abs(r.ppl - theirs) / theirs < 0.005, (r.ppl, theirs)


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    from ember.quantize import quantize_model

    d = tmp_path_factory.mktemp("kld")
    f16 = d / "tiny-f16.gguf"
    write_tiny_llama(f16, n_layer=2, std=0.08, seed=11)
    q8, q2 = d / "tiny-q8.gguf", d / "tiny-q2k.gguf"
    quantize_model(f16, q8, "Q8_0", nthread=1)
    quantize_model(f16, q2, "Q2_K", nthread=1)
    return f16, q8, q2


def reference_kld(base: Path, quant: Path, text: str, n_ctx: int, n_chunks: int) -> tuple[float, float]:
    import llama_cpp

    def all_logits(path: Path) -> tuple[list[int], list[np.ndarray]]:
        llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, verbose=False, n_threads=1)
        toks = llm.tokenize(text.encode(), add_bos=True, special=False)
        rows = []
        for c in range(n_chunks):
            chunk = list(toks[c * n_ctx : (c + 1) * n_ctx])
            chunk[0] = llm.token_bos()
            llm.reset()
            llm.eval(chunk)
            rows.append(np.asarray(llm.scores[n_ctx // 2 : n_ctx - 1], dtype=np.float64))
        llm.close()
        return toks, rows

    _, rb = all_logits(base)
    _, rq = all_logits(quant)
    klds, same = [], []
    for b, q in zip(rb, rq):
        lb = b - b.max(1, keepdims=True)
        lb -= np.log(np.exp(lb).sum(1, keepdims=True))
        lq = q - q.max(1, keepdims=True)
        lq -= np.log(np.exp(lq).sum(1, keepdims=True))
        klds += list((np.exp(lb) * (lb - lq)).sum(1))
        same += list(b.argmax(1) == q.argmax(1))
    return float(np.mean(klds)), float(np.mean(same))


def test_kld_against_direct_computation(tiny_pair: tuple[Path, Path, Path], text_file: Path) -> None:
    f16, q8, q2 = tiny_pair
    self_r = kl_divergence(f16, f16, text_file, n_ctx=N_CTX, max_chunks=2, threads=1)
    assert self_r.kld_mean < 1e-6 and self_r.same_top == 1.0
    r8 = kl_divergence(f16, q8, text_file, n_ctx=N_CTX, max_chunks=2, threads=1, flash_attn=False)
    r2 = kl_divergence(f16, q2, text_file, n_ctx=N_CTX, max_chunks=2, threads=1, flash_attn=False)
    ref_kld, ref_same = reference_kld(f16, q2, TEXT, N_CTX, 2)
    assert abs(r2.kld_mean - ref_kld) <= 0.01 * ref_kld + 1e-7
    assert abs(r2.same_top - ref_same) < 1e-9
    assert 0 < r8.kld_mean < r2.kld_mean  # more bits, less divergence
    assert r8.same_top >= r2.same_top
    assert r2.n_scored == 2 * (N_CTX - 1 - N_CTX // 2)
    # a base cache (the base evaluated once for many quants) gives the same numbers
    cache: dict = {}
    c8 = kl_divergence(f16, q8, text_file, n_ctx=N_CTX, max_chunks=2, threads=1, flash_attn=False, base_cache=cache)
    c2 = kl_divergence(f16, q2, text_file, n_ctx=N_CTX, max_chunks=2, threads=1, flash_attn=False, base_cache=cache)
    assert len(cache) == 2
    for a, b in ((c8, r8), (c2, r2)):
        assert abs(a.kld_mean - b.kld_mean) <= 1e-4 * b.kld_mean + 1e-9
        assert a.same_top == b.same_top and abs(a.ppl_base - b.ppl_base) < 1e-4 * b.ppl_base


def test_errors(tiny_pair: tuple[Path, Path, Path], tmp_path: Path) -> None:
    f16 = tiny_pair[0]
    short = tmp_path / "short.txt"
    short.write_text("too short", encoding="utf-8")
    with pytest.raises(OptionError, match="needs at least"):
        perplexity(f16, short, n_ctx=N_CTX)
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(InvalidFileError, match="UTF-8"):
        perplexity(f16, binary)
    with pytest.raises(InvalidFileError):
        perplexity(f16, tmp_path / "missing.txt")
    with pytest.raises(EmberError):
        perplexity(tmp_path / "missing.gguf", short)


def test_cli_eval(tiny_pair: tuple[Path, Path, Path], text_file: Path) -> None:
    f16, q8, _ = tiny_pair
    r = subprocess.run(
        [sys.executable, "-m", "ember.cli.main", "eval", "perplexity", str(f16), "--file", str(text_file), "--ctx", "128", "--chunks", "2", "-t", "1"],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert re.search(r"perplexity: [\d.]+ \+/- [\d.]+ \(2 chunks of 128 tokens", r.stdout)
    r = subprocess.run(
        [sys.executable, "-m", "ember.cli.main", "eval", "kld", str(f16), str(q8), "--file", str(text_file), "--ctx", "128", "-t", "1"],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "mean KLD" in r.stdout and "same top token" in r.stdout
