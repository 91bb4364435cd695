#!/usr/bin/env python3
"""Quantization quality table: size, bits per weight, perplexity and KL
divergence per quant type, all through Ember (llama.cpp's quantizer and
logits), plus Ember's perplexity next to llama.cpp's llama-perplexity.

Usage: .venv/bin/python bench/bench_quant_quality.py [--model PATH] [--text FILE]
           [--ctx 512] [--chunks 4] [--types Q8_0,Q4_K_M,...] [--json OUT.json]

Reference model: an F16/F32/BF16 GGUF is used as it is. The default, the demo
model, ships only as Q4_K_M (no hub access here to fetch its F16 weights), so
it is first expanded to F16 with `ember quantize --allow-requantize`: the
table then measures what each type loses *relative to that F16 expansion*;
types at or above Q4_K_M's precision show only the rounding they add.
Types in --imatrix-types are quantized with an importance matrix that
`ember imatrix` computes from the reference on a separate calibration text
(docstrings of other standard-library modules), marked "+im" in the table.

Text: --text FILE, else the docstrings of a fixed list of Python standard
library modules (deterministic for a given Python version).

--json writes {"types": {TYPE: {"kld", "ppl", "ppl_base", "same_top", "size",
"bpw"}}} for `ember quantize --recommend MODEL --memory SIZE --quality OUT.json`.
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / "bench" / ".tools" / "bin"
OUT = ROOT / "bench" / "out" / "quant_quality"
DEFAULT_TYPES = "Q8_0,Q6_K,Q5_K_M,Q4_K_M,Q4_K_S,IQ4_XS,Q4_0,Q3_K_M,IQ3_S,Q2_K"


def default_text() -> str:
    import argparse as m1
    import asyncio as m9
    import collections as m2
    import decimal as m10
    import email as m3
    import functools as m11
    import http.client as m4
    import itertools as m12
    import json as m5
    import logging as m6
    import pathlib as m7
    import unittest as m8

    parts = []
    for mod in (m1, m2, m3, m4, m5, m6, m7, m8, m9, m10, m11, m12):
        parts.append(inspect.getdoc(mod) or "")
        for _name, obj in sorted(vars(mod).items()):
            if (inspect.isclass(obj) or inspect.isfunction(obj)) and getattr(obj, "__module__", "") == mod.__name__:
                doc = inspect.getdoc(obj)
                if doc and len(doc) > 200:
                    parts.append(doc)
    return "\n\n".join(parts)


def calibration_text() -> str:
    import dataclasses as c1
    import os as c2
    import re as c3
    import subprocess as c4
    import threading as c6
    import typing as c5

    parts = []
    for mod in (c1, c2, c3, c4, c5, c6):
        parts.append(inspect.getdoc(mod) or "")
        for _name, obj in sorted(vars(mod).items()):
            if (inspect.isclass(obj) or inspect.isfunction(obj)) and getattr(obj, "__module__", "") == mod.__name__:
                doc = inspect.getdoc(obj)
                if doc and len(doc) > 200:
                    parts.append(doc)
    return "\n\n".join(parts)


def llama_perplexity(model: Path, text: Path, ctx: int, chunks: int, fa: str) -> float | None:
    tool = TOOLS / "llama-perplexity"
    if not tool.exists():
        return None
    p = subprocess.run(
        [str(tool), "-m", str(model), "-f", str(text), "-c", str(ctx), "-b", str(ctx), "--chunks", str(chunks), "-t", "2", "-fa", fa],
        capture_output=True, text=True, timeout=3600,
    )
    m = re.search(r"Final estimate: PPL = ([\d.]+)", p.stdout + p.stderr)
    return float(m.group(1)) if m else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--text", type=Path, default=None)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--types", default=DEFAULT_TYPES)
    ap.add_argument("--imatrix-types", default="IQ4_XS,IQ3_XXS,IQ2_M,IQ2_XXS", help="types quantized with an importance matrix ('' for none)")
    ap.add_argument("--no-compare", action="store_true", help="skip the Ember vs llama-perplexity comparison")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from ember.evaluate import kl_divergence, perplexity
    from ember.quantize import compute_imatrix, parse_quant_type, plan_quantization, quantize_model

    OUT.mkdir(parents=True, exist_ok=True)
    model = args.model
    if model is None:
        from ember.demo import demo_model_path

        model = demo_model_path()
    text = args.text
    if text is None:
        text = OUT / "text.txt"
        text.write_text(default_text(), encoding="utf-8")

    from gguf import GGUFReader

    ftype = int(GGUFReader(model).get_field("general.file_type").contents())
    base = model
    note = f"reference: {model.name} as it is"
    if ftype not in (0, 1, 32):
        base = OUT / (model.stem + "-as-f16.gguf")
        if not base.exists():
            quantize_model(model, base, "F16", allow_requantize=True, nthread=args.threads)
        note = f"reference: {model.name} expanded to F16 (the source is quantized; see the script's docstring)"

    n_params = sum(int(t.n_elements) for t in GGUFReader(base).tensors)
    rows = []
    t_start = time.time()
    ppl_base = perplexity(base, text, n_ctx=args.ctx, max_chunks=args.chunks, threads=args.threads)
    rows.append(("F16" if base != model or ftype == 1 else "source", base.stat().st_size, 8 * base.stat().st_size / n_params, ppl_base.ppl, ppl_base.ppl_stderr, 0.0, 1.0))
    print(f"{note}; F16 PPL {ppl_base.ppl:.4f} ({ppl_base.n_chunks} chunks of {args.ctx})", flush=True)
    results: dict[str, dict[str, float]] = {"F16": {"kld": 0.0, "ppl": ppl_base.ppl, "ppl_base": ppl_base.ppl, "same_top": 1.0, "size": base.stat().st_size}}
    cache: dict = {}  # the reference's log-probabilities, computed once
    jobs = [(parse_quant_type(t), False) for t in args.types.split(",") if t.strip()]
    jobs += [(parse_quant_type(t), True) for t in args.imatrix_types.split(",") if t.strip()]
    imatrix = None
    if any(im for _, im in jobs):
        calib = OUT / "calibration.txt"
        calib.write_text(calibration_text(), encoding="utf-8")
        imatrix = OUT / (base.stem + "-imatrix.gguf")
        ri = compute_imatrix(base, calib, imatrix, n_ctx=args.ctx, max_chunks=16, threads=args.threads)
        print(f"importance matrix: {ri.n_entries} tensors from {ri.n_chunks} chunks of {args.ctx} tokens of {calib.name}", flush=True)
    for name, use_im in jobs:
        label = name + ("+im" if use_im else "")
        dst = OUT / f"{base.stem}-{label}.gguf"
        quantize_model(base, dst, name, imatrix=imatrix if use_im else None, nthread=args.threads)
        plan = plan_quantization(base, name, has_imatrix=use_im)
        r = kl_divergence(base, dst, text, n_ctx=args.ctx, max_chunks=args.chunks, threads=args.threads, base_cache=cache)
        size = dst.stat().st_size
        rows.append((label, size, plan.bits_per_weight, r.ppl_quant, 0.0, r.kld_mean, r.same_top))
        if not use_im or name not in results:
            results[name] = {"kld": r.kld_mean, "kld_stderr": r.kld_stderr, "ppl": r.ppl_quant, "ppl_base": r.ppl_base,
                             "same_top": r.same_top, "size": size, "bpw": plan.bits_per_weight}
        print(f"{label:11} {size / 1e6:8.1f} MB {plan.bits_per_weight:5.2f} bpw  PPL {r.ppl_quant:8.4f}  KLD {r.kld_mean:.5f}  same top {100 * r.same_top:.1f}%", flush=True)
        dst.unlink()

    # Ember vs llama-perplexity on the demo model itself (as shipped).
    cmp_lines = []
    for fa, flag in () if args.no_compare else (("on", True), ("off", False)):
        ours = perplexity(model, text, n_ctx=args.ctx, max_chunks=args.chunks, threads=args.threads, flash_attn=flag)
        theirs = llama_perplexity(model, text, args.ctx, args.chunks, fa)
        if theirs is None:
            cmp_lines.append(f"| {fa} | {ours.ppl:.4f} | (llama-perplexity not built) | |")
        else:
            cmp_lines.append(f"| {fa} | {ours.ppl:.4f} | {theirs:.4f} | {100 * (ours.ppl / theirs - 1):+.3f}% |")

    print()
    print(f"model: {model.name}; {note}; text: {text.name} ({ppl_base.n_tokens} tokens), "
          f"{ppl_base.n_chunks} chunks x {args.ctx} tokens, {ppl_base.n_scored} scored; {time.time() - t_start:.0f} s")
    print()
    print("| type | size (MB) | bits/weight | PPL | PPL vs F16 | mean KLD | same top token |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, size, bpw, ppl, _err, kld, same in rows:
        print(f"| {name} | {size / 1e6:.1f} | {bpw:.2f} | {ppl:.4f} | {100 * (ppl / ppl_base.ppl - 1):+.2f}% | {kld:.5f} | {100 * same:.1f}% |")
    print()
    print(f"Perplexity of {model.name} (as shipped), Ember vs llama-perplexity, same text, -c {args.ctx}, --chunks {args.chunks}:")
    print()
    print("| flash attention | ember eval perplexity | llama-perplexity | difference |")
    print("|---|---:|---:|---:|")
    for line in cmp_lines:
        print(line)
    if args.json:
        args.json.write_text(json.dumps({"model": model.name, "reference": note, "ctx": args.ctx, "chunks": args.chunks, "types": results}, indent=1))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
