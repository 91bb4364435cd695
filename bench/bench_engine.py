"""Engine speed and memory beside llama.cpp's llama-bench, same machine, same run.

    .venv/bin/python bench/bench_engine.py [--threads 2] [--repeat 3]

Prompt processing (pp512) and generation (tg128: greedy, Ollama's default
sampling, and the defaults with speculative decoding) rates of
`ember run --verbose` on the demo model against `llama-bench -p 512 -n 128` built from the pinned
llama-cpp-python sdist (bench/build_llama_tools.sh), with the same threads; and
RSS after load against file size + KV cache + compute buffers.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / "bench" / ".tools" / "bin"
EMBER = str(Path(sys.executable).with_name("ember"))


def llama_bench(model: Path, threads: int) -> tuple[float, float]:
    out = subprocess.run(
        [str(TOOLS / "llama-bench"), "-m", str(model), "-p", "512", "-n", "128", "-t", str(threads), "-r", "3", "-o", "json"],
        capture_output=True, text=True, check=True,
    ).stdout
    rows = json.loads(out)
    pp = next(r["avg_ts"] for r in rows if r["n_prompt"] == 512 and r["n_gen"] == 0)
    tg = next(r["avg_ts"] for r in rows if r["n_gen"] == 128 and r["n_prompt"] == 0)
    return pp, tg


def ember_run(model: Path, threads: int, prompt: str, sampling: list[str]) -> dict[str, float]:
    r = subprocess.run(
        [EMBER, "run", str(model), "--raw", "--verbose", f"--param=num_thread={threads}", "--param=num_predict=128",
         "--param=num_ctx=1024", *sampling],
        input=prompt, capture_output=True, text=True, check=True,
    )
    err = r.stderr

    def grab(label: str) -> float:
        m = re.search(r"^" + label + r":\s+([\d.]+)", err, re.M)
        if not m:
            raise RuntimeError(f"no {label!r} in ember's output:\n{err}")
        return float(m.group(1))

    return {"pp_count": grab("prompt eval count"), "pp": grab("prompt eval rate"), "tg_count": grab("eval count"), "tg": grab("eval rate")}


def memory_check(model: Path, threads: int) -> dict[str, int]:
    code = (
        "import json, ember\n"
        f"m = ember.load({str(model)!r}, num_ctx=4096, num_thread={threads})\n"
        "r = m.memory\n"
        "print(json.dumps(r.to_dict()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    if not (TOOLS / "llama-bench").exists():
        sys.exit("llama-bench is missing: run bench/build_llama_tools.sh first")
    from ember.demo import demo_model_path
    from ember.engine import load_model

    model = demo_model_path()
    engine = load_model(model)
    words = ("The history of the city begins with a small settlement on the river. " * 80).split(" ")
    prompt = " ".join(words)
    while len(engine.tokenize(prompt, True, False)) > 512:
        words = words[:-1]
        prompt = " ".join(words)
    engine.close()

    ref_pp, ref_tg, greedy_pp, greedy_tg, default_tg, spec_tg = [], [], [], [], [], []
    greedy = ["--param=temperature=0", "--param=repeat_penalty=1", "--param=num_draft=0"]
    for _ in range(args.repeat):  # interleaved so drift hits both tools alike
        pp, tg = llama_bench(model, args.threads)
        ref_pp.append(pp)
        ref_tg.append(tg)
        # pp512: a 512-token prompt. tg128: like llama-bench, from a (nearly)
        # empty context, so attention covers the same number of tokens.
        # The sampler's cost: Ollama's default sampling without speculative
        # decoding against llama-bench (which samples nothing); then as shipped.
        greedy_pp.append(ember_run(model, args.threads, prompt, greedy)["pp"])
        greedy_tg.append(ember_run(model, args.threads, "Once", greedy)["tg"])
        default_tg.append(ember_run(model, args.threads, "Once", ["--param=num_draft=0"])["tg"])
        spec_tg.append(ember_run(model, args.threads, "Once", [])["tg"])
    med = statistics.median
    mem = memory_check(model, args.threads)
    file_size = model.stat().st_size
    budget = 1.15 * file_size + mem["kv_cache_bytes"] + mem["compute_bytes"] + mem["output_bytes"]

    print(f"demo model {model.name}, {args.threads} threads, median of {args.repeat}")
    print(f"{'measure':<42}{'ember':>10}{'llama.cpp':>12}{'ratio':>8}")
    rows = [
        ("prompt eval t/s (pp512, greedy)", med(greedy_pp), med(ref_pp)),
        ("eval t/s (tg128, greedy)", med(greedy_tg), med(ref_tg)),
        ("eval t/s (tg128, Ollama sampling)", med(default_tg), med(ref_tg)),
        ("eval t/s (tg128, defaults + n-gram spec)", med(spec_tg), med(ref_tg)),
    ]
    for name, ours, ref in rows:
        print(f"{name:<42}{ours:>10.1f}{ref:>12.1f}{ours / ref:>8.2f}")
    print(f"{'RSS after load (MB) vs budget':<42}{mem['rss_bytes'] / 1e6:>10.1f}{budget / 1e6:>12.1f}{mem['rss_bytes'] / budget:>8.2f}")
    print("budget = 1.15 x file size + KV cache + compute + output buffers (num_ctx 4096)")


if __name__ == "__main__":
    main()
