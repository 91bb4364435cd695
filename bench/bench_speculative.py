"""Speculative decoding: Ember's n-gram drafts beside llama-server's, same machine, same run.

    bench/build_llama_tools.sh          # llama-server from the same llama.cpp
    .venv/bin/python bench/bench_speculative.py --threads 2

Input-grounded tasks on a ~1,000-token text (bench/data/spec_article.txt) and
a code file (bench/data/spec_code.py): summarize, rewrite, extract JSON, edit
code; and a free-form story. For each, the single-stream generation rate
(tokens/s of the decode phase, as each server reports it) of Ember with and
without speculation (num_draft 0), llama-server without speculation, and
llama-server with each of its n-gram ``--spec-type``s (the best is kept), all
on the demo model (a base model: raw completion prompts), with the same
sampling on every side: temperature 0, top_k 40, top_p 1, min_p 0, repeat
penalty 1. Then the aggregate rate of 8 clients running the tasks at once,
Ember with and without speculation. Every measure is the best of --repeat.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_server import LLAMA_SERVER, Proc, free_port  # noqa: E402

DATA = Path(__file__).resolve().parent / "data"
NGRAM_TYPES = ["ngram-simple", "ngram-map-k", "ngram-map-k4v", "ngram-mod", "ngram-cache"]
SAMPLING = {"temperature": 0, "top_k": 40, "top_p": 1.0, "min_p": 0.0, "repeat_penalty": 1.0, "seed": 0}


def tasks() -> dict[str, str]:
    article = (DATA / "spec_article.txt").read_text()
    code = (DATA / "spec_code.py").read_text()
    return {
        "summarize": f"{article}\nA summary of the article above, in its own words where possible:\n\n",
        "rewrite": f"{article}\nThe same article, copy-edited (nothing left out):\n\nHarbour Town Approves New Library",
        "extract JSON": f"{article}\nThe facts of the article as JSON (people with their roles, amounts, dates):\n\n{{\n  \"people\": [",
        "edit code": f"# orders.py\n{code}\n# orders.py, with parse_line renamed to parse_order everywhere:\n\n\"\"\"Read a CSV",
        "story (free-form)": "A short story.\n\nThe Dragon Who Learned to Cook\n\nOnce upon a time, in a valley far away,",
    }


def start_ember(args: argparse.Namespace, work: Path) -> tuple[Proc, str]:
    model = str(args.model)
    (work / "models").mkdir(exist_ok=True)
    mf = work / "Modelfile"
    mf.write_text(f"FROM {model}\nPARAMETER num_ctx {args.ctx}\nPARAMETER num_thread {args.threads}\n")
    env = dict(os.environ, EMBER_MODELS=str(work / "models"))
    subprocess.run([sys.executable, "-m", "ember.cli.main", "create", "spec-bench", "-f", str(mf)], env=env, check=True,
                   capture_output=True)
    port = free_port()
    env.update(EMBER_HOST=f"127.0.0.1:{port}", EMBER_NUM_PARALLEL=str(args.clients), EMBER_KEEP_ALIVE="-1")
    return Proc([sys.executable, "-m", "ember.cli.main", "serve"], env, port, "ember", work / "ember.log"), "spec-bench"


def start_llama(args: argparse.Namespace, work: Path, spec: str | None) -> Proc:
    port = free_port()
    cmd = [str(LLAMA_SERVER), "-m", str(args.model), "--host", "127.0.0.1", "--port", str(port), "-t", str(args.threads),
           "-np", "1", "-c", str(args.ctx), "-ngl", "0", "--no-webui"]
    if spec:
        cmd += ["--spec-type", spec]
    name = f"llama-server-{spec or 'plain'}"
    return Proc(cmd, dict(os.environ), port, name, work / f"{name}.log")


async def ember_one(client: httpx.AsyncClient, url: str, model: str, prompt: str, n: int, spec: bool) -> dict[str, Any]:
    options = dict(SAMPLING, num_predict=n, **({} if spec else {"num_draft": 0}))
    r = await client.post(url + "/api/generate", json={"model": model, "prompt": prompt, "raw": True, "stream": False,
                                                        "options": options})
    r.raise_for_status()
    d = r.json()
    return {"tokens": d["eval_count"], "rate": d["eval_count"] / (d["eval_duration"] / 1e9),
            "drafted": d.get("draft_count", 0), "accepted": d.get("draft_accepted", 0)}


async def llama_one(client: httpx.AsyncClient, url: str, prompt: str, n: int) -> dict[str, Any]:
    body = dict(SAMPLING, prompt=prompt, n_predict=n, cache_prompt=True)
    r = await client.post(url + "/completion", json=body)
    r.raise_for_status()
    t = r.json()["timings"]
    return {"tokens": t["predicted_n"], "rate": t["predicted_per_second"],
            "drafted": t.get("draft_n", 0), "accepted": t.get("draft_n_accepted", 0)}


def best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return max(runs, key=lambda r: r["rate"])


def measure(fn: Any, repeat: int) -> dict[str, Any]:
    async def go() -> dict[str, Any]:
        async with httpx.AsyncClient(timeout=900) as client:
            return best([await fn(client) for _ in range(repeat)])
    return asyncio.run(go())


async def aggregate(url: str, model: str, prompts: list[str], n: int, spec: bool) -> float:
    async with httpx.AsyncClient(timeout=900) as client:
        t0 = asyncio.get_running_loop().time()
        res = await asyncio.gather(*(ember_one(client, url, model, p, n, spec) for p in prompts))
        return sum(r["tokens"] for r in res) / (asyncio.get_running_loop().time() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--n-predict", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--clients", type=int, default=8, help="clients of the aggregate measure (0: skip it)")
    ap.add_argument("--tasks", default="", help="comma-separated task names (default: all)")
    ap.add_argument("--spec-types", default=",".join(NGRAM_TYPES), help="llama-server n-gram --spec-type values to try")
    ap.add_argument("--no-llama-server", action="store_true", help="Ember only (no llama-server built)")
    args = ap.parse_args()
    from ember.demo import demo_model_path

    args.model = demo_model_path()
    todo = tasks()
    if args.tasks:
        todo = {k: v for k, v in todo.items() if any(k.startswith(t) for t in args.tasks.split(","))}
    use_llama = not args.no_llama_server
    if use_llama and not LLAMA_SERVER.is_file():
        sys.exit(f"{LLAMA_SERVER} is missing: run bench/build_llama_tools.sh (or pass --no-llama-server)")
    n = args.n_predict
    rows: dict[str, dict[str, dict[str, Any]]] = {t: {} for t in todo}
    work = Path(tempfile.mkdtemp(prefix="bench-spec-"))
    try:
        args.clients = max(args.clients, 1)
        ember, name = start_ember(args, work)
        try:
            for task, prompt in todo.items():
                for label, spec in (("ember", True), ("ember no-spec", False)):
                    rows[task][label] = measure(lambda c, p=prompt, s=spec: ember_one(c, ember.url, name, p, n, s), args.repeat)
                print(task, {k: round(v["rate"], 1) for k, v in rows[task].items()}, flush=True)
            agg = {}
            if args.clients > 1:
                prompts = [list(todo.values())[i % len(todo)] for i in range(args.clients)]
                for label, spec in (("spec", True), ("no spec", False)):
                    agg[label] = max(asyncio.run(aggregate(ember.url, name, prompts, n, spec)) for _ in range(args.repeat))
        finally:
            ember.stop()
        if use_llama:
            for spec in [None, *[s for s in args.spec_types.split(",") if s]]:
                proc = start_llama(args, work, spec)
                try:
                    for task, prompt in todo.items():
                        r = measure(lambda c, p=prompt, u=proc.url: llama_one(c, u, p, n), args.repeat)
                        key = "llama-server" if spec is None else "llama-server spec"
                        if spec is None or r["rate"] > rows[task].get(key, {"rate": 0})["rate"]:
                            rows[task][key] = dict(r, type=spec)
                        print(task, proc.name, round(r["rate"], 1), flush=True)
                finally:
                    proc.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def acc(r: dict[str, Any]) -> str:
        return f"{r['accepted']}/{r['drafted']} ({100 * r['accepted'] / r['drafted']:.0f}%)" if r.get("drafted") else "-"

    print()
    print(f"demo model {args.model.name}, {args.threads} threads, up to {n} tokens, temperature 0, best of {args.repeat}")
    print()
    head = "| task | ember t/s | ember no-spec t/s | ember / no-spec | ember accepted"
    if use_llama:
        head += " | llama-server t/s | llama-server spec t/s (type) | spec accepted | ember / llama-server | ember / llama-server spec"
    print(head + " |")
    print("|---" * head.count("|") + "|")
    for task, r in rows.items():
        e, e0 = r["ember"], r["ember no-spec"]
        line = f"| {task} | {e['rate']:.1f} | {e0['rate']:.1f} | {e['rate'] / e0['rate']:.2f} | {acc(e)}"
        if use_llama:
            ls, lsp = r["llama-server"], r["llama-server spec"]
            line += (f" | {ls['rate']:.1f} | {lsp['rate']:.1f} ({lsp['type']}) | {acc(lsp)} | {e['rate'] / ls['rate']:.2f}"
                     f" | {e['rate'] / lsp['rate']:.2f}")
        print(line + " |")
    if agg:
        print()
        print(f"aggregate, {args.clients} clients (tasks in turn): ember {agg['spec']:.1f} t/s with speculation, "
              f"{agg['no spec']:.1f} t/s without ({agg['spec'] / agg['no spec']:.2f}x)")


if __name__ == "__main__":
    main()
