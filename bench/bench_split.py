#!/usr/bin/env python3
"""Split and merge the demo model with `ember` and with llama.cpp's
`llama-gguf-split` in the same run: wall time and peak RSS of each process,
as a table with Ember/llama.cpp ratios.

Usage: .venv/bin/python bench/bench_split.py [--repeat 3] [--max-size 100M] [--model PATH]
Needs bench/build_llama_tools.sh to have been run (it builds llama-gguf-split
from the same llama.cpp that Ember uses).
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GGUF_SPLIT = ROOT / "bench" / ".tools" / "bin" / "llama-gguf-split"
EMBER = Path(sys.executable).parent / "ember"
OUT = ROOT / "bench" / "out" / "split"


def run(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{err}")
    if proc.stderr:
        proc.stderr.close()
    return wall, usage.ru_maxrss * 1024


def fresh(d: Path) -> Path:
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    return d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--max-size", default="100M", help="shard size for both tools (M or G, as llama-gguf-split takes)")
    ap.add_argument("--model", type=Path, default=None)
    args = ap.parse_args()
    if not GGUF_SPLIT.exists():
        raise SystemExit(f"{GGUF_SPLIT} is missing: run bench/build_llama_tools.sh first")
    if args.model is None:
        from ember.demo import demo_model_path

        args.model = demo_model_path()
    model: Path = args.model
    size = model.stat().st_size
    with open(model, "rb") as f:  # warm the page cache so both tools read from memory
        while f.read(16 << 20):
            pass

    results: dict[tuple[str, str], list[tuple[float, int]]] = {}
    for _ in range(args.repeat):
        for tool in ("llama-gguf-split", "ember"):
            d = fresh(OUT / tool.replace("-", "_"))
            if tool == "ember":
                split_cmd = [str(EMBER), "split", str(model), str(d / "m"), "--max-size", args.max_size]
            else:
                split_cmd = [str(GGUF_SPLIT), "--split", "--split-max-size", args.max_size, str(model), str(d / "m")]
            results.setdefault(("split", tool), []).append(run(split_cmd))
            first = sorted(d.glob("m-*.gguf"))[0]
            merged = d / "merged.gguf"
            if tool == "ember":
                merge_cmd = [str(EMBER), "merge", str(first), str(merged)]
            else:
                merge_cmd = [str(GGUF_SPLIT), "--merge", str(first), str(merged)]
            results.setdefault(("merge", tool), []).append(run(merge_cmd))

    # Same shards from both tools; Ember's merge gives back the original file.
    ours, theirs = OUT / "ember", OUT / "llama_gguf_split"
    shards = sorted(p.name for p in ours.glob("m-*.gguf"))
    same = shards == sorted(p.name for p in theirs.glob("m-*.gguf")) and all(
        filecmp.cmp(ours / n, theirs / n, shallow=False) for n in shards
    )
    round_trip = filecmp.cmp(ours / "merged.gguf", model, shallow=False)

    print(f"model: {model.name} ({size / 1e6:.1f} MB), --max-size {args.max_size} -> {len(shards)} shards, "
          f"median of {args.repeat} runs, {os.cpu_count()} CPUs")
    print(f"shards byte-identical to llama-gguf-split's: {same}; ember merge == original: {round_trip}")
    print()
    print("| operation | tool | wall time (s) | peak RSS (MB) |")
    print("|---|---|---:|---:|")
    med: dict[tuple[str, str], tuple[float, float]] = {}
    for (op, tool), runs in results.items():
        wall = statistics.median(r[0] for r in runs)
        rss = statistics.median(r[1] for r in runs) / 1e6
        med[(op, tool)] = (wall, rss)
        print(f"| {op} | {tool} | {wall:.2f} | {rss:.0f} |")
    print()
    print("| operation | time ratio ember / llama-gguf-split | peak RSS ratio ember / llama-gguf-split |")
    print("|---|---:|---:|")
    for op in ("split", "merge"):
        (ew, er), (lw, lr) = med[(op, "ember")], med[(op, "llama-gguf-split")]
        print(f"| {op} | {ew / lw:.2f} | {er / lr:.2f} |")
    shutil.rmtree(OUT, ignore_errors=True)


if __name__ == "__main__":
    main()
