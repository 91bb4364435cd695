"""A model split across RPC workers: Ember beside llama.cpp's own RPC tools.

    bench/build_llama_tools.sh          # llama-server and ggml-rpc-server, -DGGML_RPC=ON
    .venv/bin/python bench/bench_rpc.py [--threads 2] [--worker-threads 1] [--repeat 3]

1. Generation rate (greedy, 128 tokens, the demo model) on this machine alone,
   and split across two loopback workers: Ember (``ember worker`` x2, ``rpc=``)
   beside ``ggml-rpc-server`` x2 + ``llama-server --rpc``, on the same split.
   Weights in RPC buffers are never repacked, so every run uses the plain CPU
   kernels (Ember ``use_repack=false``, llama.cpp ``--no-repack``) and greedy
   text must match. Ember's speculative decoding is off (``num_draft=0``):
   llama-server runs without it here. Ember keeps the output layer's weight on this machine's
   CPU when it has no GPU (only the hidden state crosses the network, not
   n_vocab logits); llama.cpp's tools do that with ``-ot``, shown both ways.
2. What the network costs: a forwarding proxy between Ember and each worker
   counts the bytes and the round trips (client -> worker -> client turns) per
   generated token; from them, the rate over typical links is computed, and
   one added delay is measured through the proxy to check the computation.
   (``tc netem`` in a network namespace would measure real links; the
   development machines' kernels lack netem, so a user-space delay is used.)

Timing on a busy machine is distorted; ratios from the same run hold best.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / "bench" / ".tools" / "bin"
EMBER = str(Path(sys.executable).with_name("ember"))
PROMPT = "Once upon a time"
OUTPUT_HERE = r"^(output|token_embd)\.weight$=CPU"  # llama.cpp's -ot for Ember's placement


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc:
    """A background process with its output in a log; ``ready()`` polls until it serves."""

    def __init__(self, cmd: list[str], log: Path, ready: Any) -> None:
        self.log = log
        self.proc = subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT, stdin=subprocess.PIPE)
        deadline = time.monotonic() + 180
        while not ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{cmd[0]} did not start:\n{log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def worker(kind: str, threads: int, work: Path) -> tuple[Proc, str]:
    from ember.engine import rpc
    from ember.errors import WorkerError

    port = free_port()
    endpoint = f"127.0.0.1:{port}"
    if kind == "ember":
        cmd = [EMBER, "worker", "--host", endpoint, "--threads", str(threads)]
    else:
        cmd = [str(TOOLS / "ggml-rpc-server"), "-H", "127.0.0.1", "-p", str(port), "-t", str(threads)]

    def ready() -> bool:
        try:
            rpc.probe(endpoint, timeout=1.0)
            return True
        except WorkerError:
            return False

    return Proc(cmd, work / f"{kind}-worker-{port}.log", ready), endpoint


def llama_server(model: str, threads: int, extra: list[str], work: Path) -> tuple[Proc, str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [str(TOOLS / "llama-server"), "-m", model, "--host", "127.0.0.1", "--port", str(port), "-t", str(threads),
           "-c", "1024", "-np", "1", "--no-webui", "--no-repack", *extra]

    def ready() -> bool:
        try:
            return httpx.get(url + "/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    return Proc(cmd, work / f"llama-server-{port}.log", ready), url


def llama_server_rate(url: str, n: int) -> tuple[float, str]:
    body = {"prompt": PROMPT, "n_predict": n, "temperature": 0, "repeat_penalty": 1.0, "cache_prompt": False}
    d = httpx.post(url + "/completion", json=body, timeout=600).json()
    return float(d["timings"]["predicted_per_second"]), str(d["content"])


def ember_rate(threads: int, n: int, **load: Any) -> tuple[float, str]:
    import ember

    # num_draft=0: no speculative decoding, as llama-server runs here (like with like)
    with ember.load("demo", num_ctx=1024, num_thread=threads, use_repack=False, num_draft=0, **load) as m:
        m.generate(PROMPT, raw=True, num_predict=4, temperature=0)  # first graph, buffers touched
        r = m.generate(PROMPT, raw=True, num_predict=n, temperature=0, repeat_penalty=1.0)
    return r.eval_count / (r.eval_duration / 1e9), r.text


# --- the proxy: counts bytes and turns, optionally delays --------------------------------------
def proxy_main(listen_port: int, target: str, delay_ms: float) -> None:
    """Forward one port to ``target``; on each stdin line print and reset the counters
    {"up": bytes to the worker, "down": bytes back, "turns": down-after-up switches}."""
    host, _, port = target.rpartition(":")
    server = socket.create_server(("127.0.0.1", listen_port))
    stats = {"up": 0, "down": 0, "turns": 0}
    lock = threading.Lock()
    last = ["down"]

    def pump(src: socket.socket, dst: socket.socket, direction: str) -> None:
        while True:
            try:
                data = src.recv(1 << 20)
            except OSError:
                data = b""
            if not data:
                for s in (src, dst):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                return
            if delay_ms:
                time.sleep(delay_ms / 2000)  # one way: half the round trip
            with lock:
                stats[direction] += len(data)
                if direction == "down" and last[0] == "up":
                    stats["turns"] += 1
                last[0] = direction
            dst.sendall(data)

    def accept() -> None:
        while True:
            client, _ = server.accept()
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            upstream = socket.create_connection((host, int(port)))
            upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=pump, args=(client, upstream, "up"), daemon=True).start()
            threading.Thread(target=pump, args=(upstream, client, "down"), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    print("ready", flush=True)
    for _ in sys.stdin:
        with lock:
            print(json.dumps(stats), flush=True)
            stats.update(up=0, down=0, turns=0)


class Proxy:
    def __init__(self, target: str, delay_ms: float) -> None:
        self.port = free_port()
        self.endpoint = f"127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--proxy", str(self.port), target, str(delay_ms)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "ready"

    def counters(self) -> dict[str, int]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        return dict(json.loads(self.proc.stdout.readline()))

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def network(endpoints: list[str], threads: int, n: int, delay_ms: float) -> dict[str, float]:
    """Ember's rate through proxies (each delaying ``delay_ms`` per round trip),
    with bytes and turns per generated token."""
    import ember

    proxies = [Proxy(ep, delay_ms) for ep in endpoints]
    try:
        with ember.load("demo", rpc=[p.endpoint for p in proxies], num_ctx=1024, num_thread=threads,
                        use_repack=False, tensor_split="0,1,1", num_draft=0) as m:
            m.generate(PROMPT, raw=True, num_predict=4, temperature=0)
            for p in proxies:
                p.counters()  # reset: the load's weight transfer is not per token
            r = m.generate(PROMPT, raw=True, num_predict=n, temperature=0, repeat_penalty=1.0)
            totals = [p.counters() for p in proxies]
    finally:
        for p in proxies:
            p.stop()
    tokens = r.eval_count + r.prompt_eval_count
    return {
        "rate": r.eval_count / (r.eval_duration / 1e9),
        "bytes": sum(t["up"] + t["down"] for t in totals) / tokens,
        "turns": sum(t["turns"] for t in totals) / tokens,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="threads of the client (Ember, llama-server)")
    ap.add_argument("--worker-threads", type=int, default=1, help="threads of each worker")
    ap.add_argument("--n-predict", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3, help="interleaved rounds; medians are reported")
    ap.add_argument("--delay-ms", type=float, default=2.0, help="round-trip delay measured through the proxy")
    ap.add_argument("--proxy", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.proxy:
        proxy_main(int(args.proxy[0]), args.proxy[1], float(args.proxy[2]))
        return
    for tool in ("llama-server", "ggml-rpc-server"):
        if not (TOOLS / tool).exists():
            sys.exit(f"{tool} is missing: run bench/build_llama_tools.sh first")
    from ember.demo import demo_model_path

    model = str(demo_model_path())
    n, t, wt = args.n_predict, args.threads, args.worker_threads
    work = Path(tempfile.mkdtemp(prefix="ember-bench-rpc-"))
    procs: list[Proc] = []
    try:
        ours = [worker("ember", wt, work) for _ in range(2)]
        theirs = [worker("llama.cpp", wt, work) for _ in range(2)]
        procs += [p for p, _ in ours + theirs]
        ember_eps = [ep for _, ep in ours]
        their_eps = ",".join(ep for _, ep in theirs)
        rows: dict[str, list[float]] = {}
        texts: dict[str, str] = {}

        def record(name: str, rate: float, text: str) -> None:
            rows.setdefault(name, []).append(rate)
            texts[name] = text

        for _ in range(args.repeat):
            record("ember, this machine", *ember_rate(t, n, rpc="none"))
            srv, url = llama_server(model, t, [], work)
            record("llama-server, this machine", *llama_server_rate(url, n))
            srv.stop()
            record("ember, 2 workers, all layers there", *ember_rate(t, n, rpc=ember_eps, tensor_split="0,1,1"))
            srv, url = llama_server(model, t, ["--rpc", their_eps, "-ot", OUTPUT_HERE], work)
            record("llama-server -ot, 2 workers, all layers there", *llama_server_rate(url, n))
            srv.stop()
            srv, url = llama_server(model, t, ["--rpc", their_eps], work)
            record("llama-server, 2 workers, all layers there", *llama_server_rate(url, n))
            srv.stop()
            record("ember, 2 workers, default split", *ember_rate(t, n, rpc=ember_eps))

        med = {k: statistics.median(v) for k, v in rows.items()}
        print(f"demo model, greedy, {n} tokens, client {t} threads, workers {wt} thread(s) each, "
              f"loopback, median of {args.repeat}; plain CPU kernels everywhere (no repacking)")
        print(f"{'run':<48}{'tokens/s':>10}   same text as llama-server alone")
        base = texts["llama-server, this machine"]
        for k, v in med.items():
            print(f"{k:<48}{v:>10.1f}   {texts[k] == base}")
        print(f"ratio ember / llama-server, this machine:             {med['ember, this machine'] / med['llama-server, this machine']:.2f}")
        print(f"ratio ember / llama-server -ot, same split:           "
              f"{med['ember, 2 workers, all layers there'] / med['llama-server -ot, 2 workers, all layers there']:.2f}")
        print(f"ratio ember / llama-server (its default placement):   "
              f"{med['ember, 2 workers, all layers there'] / med['llama-server, 2 workers, all layers there']:.2f}")

        print("\nnetwork cost (Ember, 2 workers, all layers there, through counting proxies):")
        direct = network(ember_eps, t, n, 0.0)
        delayed = network(ember_eps, t, n, args.delay_ms)
        per_token = 1 / direct["rate"]
        print(f"per token: {direct['bytes'] / 1024:.1f} KiB over the network, {direct['turns']:.1f} round trips; "
              f"{direct['rate']:.1f} tokens/s through the proxies")
        predicted = 1 / (per_token + direct["turns"] * args.delay_ms / 1000)
        print(f"measured with {args.delay_ms:g} ms added per round trip: {delayed['rate']:.1f} tokens/s "
              f"(computed: {predicted:.1f})")
        print(f"{'link (round trip, bandwidth)':<40}{'tokens/s computed':>18}")
        for name, rtt_ms, mbit in [("same switch, 10 GbE (0.05 ms)", 0.05, 10000), ("LAN, 1 GbE (0.2 ms)", 0.2, 1000),
                                   ("Wi-Fi (3 ms, 300 Mbit/s)", 3.0, 300), ("another site (20 ms, 100 Mbit/s)", 20.0, 100)]:
            cost = direct["turns"] * rtt_ms / 1000 + direct["bytes"] * 8 / (mbit * 1e6)
            print(f"{name:<40}{1 / (per_token + cost):>18.1f}")
    finally:
        for p in procs:
            p.stop()


if __name__ == "__main__":
    main()
