"""Model quality: perplexity and KL divergence, computed the way llama.cpp's
``llama-perplexity`` computes them, on logits from llama.cpp through
``ember.engine`` (so the numbers are comparable with published ones).

Perplexity (llama-perplexity's default mode): the text is tokenized once (with
BOS when the model adds one); it is cut into chunks of ``n_ctx`` tokens; each
chunk is evaluated from an empty cache with its first token replaced by BOS
(when the model adds BOS); only the second half of each chunk is scored:
positions ``n_ctx/2 .. n_ctx-2`` predict the next token. PPL = exp(mean NLL),
its uncertainty ``ppl * sqrt(var(NLL)/(count-1))``.

KL divergence (``--kl-divergence``): the same chunks through both models;
per scored position KL(P_base || P_quant) summed over tokens whose base
log-probability is above -16 (llama.cpp's cut-off), and whether both models'
most likely token is the same. llama.cpp stores the base log-probabilities
16-bit quantized in a file between two runs; here both models run side by side
and the base probabilities stay in float, so results agree to that rounding.

Attention: llama-perplexity's default (``-fa auto``) turns flash attention on
for CPUs, and that changes results measurably (gemma-3-270m, 2x128 tokens:
PPL 48.47 with it, 47.68 without). ``flash_attn=True`` (the default here)
matches llama-perplexity's default; ``flash_attn=False`` matches ``-fa off``
and Ember's run-time default. Both agree with the tool to its printed digits.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp as lc
import numpy as np

from ember.engine import load_model
from ember.errors import InvalidFileError, OptionError
from ember.progress import ProgressCallback


@dataclass
class PerplexityResult:
    ppl: float
    ppl_stderr: float
    nll_mean: float
    n_chunks: int
    n_ctx: int
    n_scored: int
    n_tokens: int


@dataclass
class KLDResult:
    kld_mean: float
    kld_stderr: float
    same_top: float
    same_top_stderr: float
    ppl_base: float
    ppl_quant: float
    n_chunks: int
    n_ctx: int
    n_scored: int


def _read_text(path: str | os.PathLike[str]) -> str:
    path = Path(path)
    if not path.is_file():
        raise InvalidFileError(f"{path}: no such text file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InvalidFileError(f"{path}: not UTF-8 text (byte {e.start})") from None


def _load(model: str | os.PathLike[str] | Any, threads: int | None) -> tuple[Any, bool]:
    """(loaded model, whether we own it). Accepts a path or an engine model."""
    if hasattr(model, "tokenize") and hasattr(model, "new_context"):
        return model, False

    return load_model(model, {"num_thread": threads} if threads else None), True


def _chunks(tokens: list[int], n_ctx: int, max_chunks: int | None, path: Any) -> int:
    if n_ctx < 8:
        raise OptionError(f"--ctx {n_ctx}: use at least 8 tokens per chunk")
    if len(tokens) < 2 * n_ctx:
        raise OptionError(
            f"{path}: the text tokenizes to only {len(tokens)} tokens; perplexity with --ctx {n_ctx} "
            f"needs at least {2 * n_ctx} (use a longer text or a smaller --ctx)"
        )
    n = len(tokens) // n_ctx
    if max_chunks is not None and max_chunks > 0:
        n = min(n, max_chunks)
    return n


class _ChunkRunner:
    """Evaluates one chunk in a fresh cache and exposes the logits of the
    scored positions (a view on llama.cpp's output buffer, no copy)."""

    def __init__(self, model: Any, n_ctx: int, threads: int | None, flash_attn: bool) -> None:
        self.model = model
        self.n_ctx = n_ctx
        options: dict[str, Any] = {"flash_attn": flash_attn}
        if threads:
            options["num_thread"] = threads
        self.ctx = model.new_context(n_ctx, n_batch=n_ctx, options=options)
        self.first = n_ctx // 2

    def run(self, chunk: list[int]) -> np.ndarray:
        m = self.model
        toks = list(chunk)
        if m.add_bos:
            toks[0] = m.bos_id
        self.ctx.clear()
        self.ctx.decode([(t, pos, 0, pos >= self.first) for pos, t in enumerate(toks)])
        n_out = self.n_ctx - self.first
        ptr = lc.llama_get_logits(self.ctx.ptr)
        return np.ctypeslib.as_array(ptr, shape=(n_out, m.n_vocab))

    def close(self) -> None:
        self.ctx.close()


_BLOCK = 16  # rows per numpy block (bounded memory for 256k vocabularies)


def _log_softmax(rows: np.ndarray) -> np.ndarray:
    x = rows.astype(np.float64)
    mx = x.max(axis=1, keepdims=True)
    out: np.ndarray = x - mx - np.log(np.exp(x - mx).sum(axis=1, keepdims=True))
    return out


def perplexity(
    model: str | os.PathLike[str] | Any,
    text_file: str | os.PathLike[str],
    *,
    n_ctx: int = 512,
    max_chunks: int | None = None,
    threads: int | None = None,
    flash_attn: bool = True,
    progress: ProgressCallback | None = None,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``text_file`` as llama-perplexity computes it."""
    text = _read_text(text_file)
    m, owned = _load(model, threads)
    try:
        tokens = m.tokenize(text, add_special=True, parse_special=False)
        n_chunks = _chunks(tokens, n_ctx, max_chunks, text_file)
        runner = _ChunkRunner(m, n_ctx, threads, flash_attn)
        first = runner.first
        nll = nll2 = 0.0
        count = 0
        try:
            for i in range(n_chunks):
                chunk = tokens[i * n_ctx : (i + 1) * n_ctx]
                logits = runner.run(chunk)
                targets = np.asarray(chunk[first + 1 :], dtype=np.int64)
                n_score = n_ctx - 1 - first
                for b in range(0, n_score, _BLOCK):
                    lp = _log_softmax(logits[b : min(b + _BLOCK, n_score)])
                    v = -lp[np.arange(lp.shape[0]), targets[b : b + lp.shape[0]]]
                    nll += float(v.sum())
                    nll2 += float((v * v).sum())
                count += n_score
                if progress:
                    progress("perplexity", i + 1, n_chunks)
        finally:
            runner.close()
    finally:
        if owned:
            m.close()
    mean = nll / count
    ppl = math.exp(mean)
    var = nll2 / count - mean * mean
    stderr = ppl * math.sqrt(var / (count - 1)) if var > 0 and count > 1 else 0.0
    return PerplexityResult(ppl, stderr, mean, n_chunks, n_ctx, count, len(tokens))


def kl_divergence(
    base: str | os.PathLike[str] | Any,
    quant: str | os.PathLike[str] | Any,
    text_file: str | os.PathLike[str],
    *,
    n_ctx: int = 512,
    max_chunks: int | None = None,
    threads: int | None = None,
    flash_attn: bool = True,
    progress: ProgressCallback | None = None,
    base_cache: dict[int, np.ndarray] | None = None,
) -> KLDResult:
    """Mean KL(base || quant) over the scored positions, the same-top-token rate,
    and both perplexities (llama-perplexity --kl-divergence).

    ``base_cache``: a dict kept by the caller between calls with the same
    base, text and settings; it holds the base's log-probabilities per chunk
    (float32, n_ctx/2 x n_vocab each) so comparing many quants against one
    base evaluates the base once, as llama-perplexity's base-logits file does."""
    text = _read_text(text_file)
    mb, owned_b = _load(base, threads)
    try:
        mq, owned_q = _load(quant, threads)
    except BaseException:
        if owned_b:
            mb.close()
        raise
    try:
        if mb.n_vocab != mq.n_vocab:
            raise OptionError(f"the two models have different vocabularies ({mb.n_vocab} vs {mq.n_vocab} tokens)")
        tokens = mb.tokenize(text, add_special=True, parse_special=False)
        n_chunks = _chunks(tokens, n_ctx, max_chunks, text_file)
        rb, rq = _ChunkRunner(mb, n_ctx, threads, flash_attn), _ChunkRunner(mq, n_ctx, threads, flash_attn)
        first = rb.first
        s = {"kld": 0.0, "kld2": 0.0, "nll": 0.0, "nll_b": 0.0, "same": 0}
        count = 0
        try:
            for i in range(n_chunks):
                chunk = tokens[i * n_ctx : (i + 1) * n_ctx]
                cached = base_cache.get(i) if base_cache is not None else None
                if cached is None:
                    lb_all = rb.run(chunk)
                    if base_cache is not None:
                        n_rows = n_ctx - 1 - first
                        cached = np.empty((n_rows, mb.n_vocab), dtype=np.float32)
                        for b in range(0, n_rows, _BLOCK):
                            cached[b : b + _BLOCK] = _log_softmax(lb_all[b : min(b + _BLOCK, n_rows)])
                        base_cache[i] = cached
                lq_all = rq.run(chunk)
                targets = np.asarray(chunk[first + 1 :], dtype=np.int64)
                n_score = n_ctx - 1 - first
                for b in range(0, n_score, _BLOCK):
                    e = min(b + _BLOCK, n_score)
                    lpb = cached[b:e].astype(np.float64) if cached is not None else _log_softmax(lb_all[b:e])
                    lpq = _log_softmax(lq_all[b:e])
                    keep = lpb > -16.0
                    kld = np.where(keep, np.exp(lpb) * (lpb - lpq), 0.0).sum(axis=1)
                    s["kld"] += float(kld.sum())
                    s["kld2"] += float((kld * kld).sum())
                    rows = np.arange(e - b)
                    s["nll"] += float(-lpq[rows, targets[b:e]].sum())
                    s["nll_b"] += float(-lpb[rows, targets[b:e]].sum())
                    s["same"] += int((lpb.argmax(axis=1) == lpq.argmax(axis=1)).sum())
                count += n_score
                if progress:
                    progress("kl-divergence", i + 1, n_chunks)
        finally:
            rb.close()
            rq.close()
    finally:
        if owned_q:
            mq.close()
        if owned_b:
            mb.close()
    mean = s["kld"] / count
    var = s["kld2"] / count - mean * mean
    kld_err = math.sqrt(var / (count - 1)) if var > 0 and count > 10 else 0.0
    same = s["same"] / count
    same_err = math.sqrt(same * (1 - same) / (count - 1)) if count > 1 else 0.0
    return KLDResult(
        mean, kld_err, same, same_err, math.exp(s["nll_b"] / count), math.exp(s["nll"] / count), n_chunks, n_ctx, count
    )
