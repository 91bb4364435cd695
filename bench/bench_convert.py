"""Benchmark: `ember convert` beside llama.cpp's convert_hf_to_gguf.py on the
same generated ~1B-parameter bf16 Llama (Llama-3.2-1B shapes, random weights,
SentencePiece tokenizer trained here so llama.cpp's converter needs no hash).

Reports wall time and peak RSS (each converter in a fresh child process,
``os.wait4`` rusage) and checks that both wrote identical tensor data.

    .venv/bin/python bench/bench_convert.py --llama-cpp /tmp/sdist/llama_cpp_python-0.3.36/vendor/llama.cpp

llama.cpp's script comes from the llama-cpp-python sdist
(``pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def make_model(d: Path, layers: int) -> None:
    """Llama-3.2-1B shapes with random bf16 weights (transformers random init)."""
    if (d / "config.json").is_file():
        return
    sys.path.insert(0, str(HERE.parent / "tests"))
    import torch
    import transformers
    from convert_fixtures import make_spm_tokenizer

    make_spm_tokenizer(d, vocab_size=400)
    cfg = transformers.LlamaConfig(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=layers, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192, "rope_theta": 500000.0},
        bos_token_id=1, eos_token_id=2,
    )
    cfg.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(d, max_shard_size="1GB")
    (d / "README.md").write_text("---\nlicense: llama3.2\n---\n# Bench-Llama\n")


def run(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, int, float]:
    """Wall seconds, peak RSS (bytes) and CPU seconds (user + system) of one child process."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    err = p.stderr.read().decode(errors="replace") if p.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{err[-3000:]}")
    return wall, ru.ru_maxrss * 1024, ru.ru_utime + ru.ru_stime


def same_tensors(a: Path, b: Path) -> tuple[bool, int, list[str]]:
    import gguf

    ra = {t.name: t for t in gguf.GGUFReader(a).tensors}
    rb = {t.name: t for t in gguf.GGUFReader(b).tensors}
    diff = sorted(set(ra) ^ set(rb))
    for name in sorted(set(ra) & set(rb)):
        ta, tb = ra[name], rb[name]
        if ta.tensor_type != tb.tensor_type or not np.array_equal(np.asarray(ta.data).view(np.uint8), np.asarray(tb.data).view(np.uint8)):
            diff.append(name)
    return not diff, len(set(ra) & set(rb)), diff


def compare_in_child(py: str, a: Path, b: Path) -> tuple[bool, int, list[str]]:
    """Compare in a child: reading two GGUFs here would raise this process's
    RSS, and children inherit the parent's peak RSS at fork."""
    out = subprocess.run([py, __file__, "--compare", str(a), str(b)], capture_output=True, text=True, check=True).stdout
    same, n, diff = json.loads(out.strip().splitlines()[-1])
    return same, n, diff


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--compare":
        print(json.dumps(same_tensors(Path(sys.argv[2]), Path(sys.argv[3]))))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-cpp", type=Path, required=True, help="llama.cpp source folder with convert_hf_to_gguf.py")
    ap.add_argument("--model-dir", type=Path, default=Path("/tmp/ember-bench/Bench-Llama-1B"))
    ap.add_argument("--out-dir", type=Path, default=Path("/tmp/ember-bench/out"))
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--outtypes", default="bf16,f16")
    ap.add_argument("--repeat", type=int, default=1, help="runs per converter and type (fastest kept)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()

    args.model_dir.mkdir(parents=True, exist_ok=True)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if not (args.model_dir / "config.json").is_file():  # in a child: torch would inflate our RSS
        subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(HERE)!r}); import bench_convert as b; from pathlib import Path; b.make_model(Path({str(args.model_dir)!r}), {args.layers})"], check=True)
    size = sum(f.stat().st_size for f in args.model_dir.glob("*.safetensors"))
    for f in args.model_dir.glob("*.safetensors"):  # same warm page cache for both
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass

    py = sys.executable
    env = {**os.environ, "NO_LOCAL_GGUF": ""}
    env.pop("NO_LOCAL_GGUF")
    results = []
    for ot in args.outtypes.split(","):
        ours = args.out_dir / f"ember-{ot}.gguf"
        theirs = args.out_dir / f"llamacpp-{ot}.gguf"
        e_runs, l_runs = [], []
        for _ in range(args.repeat):  # alternate the two; keep each one's fastest run
            e_runs.append(run([py, "-c", f"from ember.convert import convert_model; convert_model({str(args.model_dir)!r}, {str(ours)!r}, outtype={ot!r})"]))
            l_runs.append(run([py, str(args.llama_cpp / "convert_hf_to_gguf.py"), str(args.model_dir), "--outfile", str(theirs), "--outtype", ot], env=env))
        e_wall, e_rss, e_cpu = min(e_runs)
        l_wall, l_rss, l_cpu = min(l_runs)
        same, n, diff = compare_in_child(py, ours, theirs)
        results.append({
            "outtype": ot, "checkpoint_bytes": size,
            "ember_s": round(e_wall, 2), "llamacpp_s": round(l_wall, 2), "time_ratio": round(e_wall / l_wall, 3),
            "ember_cpu_s": round(e_cpu, 2), "llamacpp_cpu_s": round(l_cpu, 2), "cpu_ratio": round(e_cpu / l_cpu, 3),
            "ember_rss": e_rss, "llamacpp_rss": l_rss, "rss_ratio": round(e_rss / l_rss, 3),
            "identical": same, "tensors_compared": n, "differing": diff[:10],
        })
        print(json.dumps(results[-1]), flush=True)
        ours.unlink()
        theirs.unlink()
    print("\n| outtype | ember s | llama.cpp s | time ratio | CPU s (ember / llama.cpp) | ember peak RSS | llama.cpp peak RSS | RSS ratio | tensor data |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['outtype']} | {r['ember_s']} | {r['llamacpp_s']} | {r['time_ratio']} | {r['ember_cpu_s']} / {r['llamacpp_cpu_s']} | {r['ember_rss'] / 2**20:.0f} MiB | {r['llamacpp_rss'] / 2**20:.0f} MiB | {r['rss_ratio']} | {'identical' if r['identical'] else 'DIFFERENT: ' + ', '.join(r['differing'])} ({r['tensors_compared']} tensors) |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
