"""Models split across machines with llama.cpp's RPC backend: real `ember
worker` processes on loopback ports, the demo model, the Python API, `ember
run` and the server with the official client.

Weights in RPC buffers are not repacked for the CPU's fastest kernels, so a
split run is compared with a local run with ``use_repack`` off (the same
kernels), as llama.cpp's own tools compare (``--rpc`` vs ``--no-repack``).
"""

from __future__ import annotations

import importlib.util
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import ollama
import pytest
from cli_fixtures import EMBER, run_ember
from engine_fixtures import GREEDY
from server_fixtures import Server, free_port

import ember
from ember.demo import demo_model_path
from ember.engine import rpc
from ember.errors import ModelfileError, OptionError, WorkerError
from ember.options import parse_tensor_split, parse_workers

PROMPT = "Once upon a time"
N = 32
SAME_KERNELS = {**GREEDY, "use_repack": False}


class Worker:
    """``ember worker`` on a free loopback port, output in a log file."""

    def __init__(self, log_dir: Path, *args: str) -> None:
        self.port = free_port()
        self.endpoint = f"127.0.0.1:{self.port}"
        self.log = log_dir / f"worker-{self.port}.log"
        self.proc = subprocess.Popen(
            [EMBER, "worker", "--host", self.endpoint, "--threads", "1", *args],
            stdout=open(self.log, "wb"), stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while "Ember worker listening" not in self.log.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker did not start: {self.log.read_text(errors='replace')}")
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(120)


@pytest.fixture(scope="module")
def workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Worker]]:
    d = tmp_path_factory.mktemp("workers")
    pair = [Worker(d), Worker(d)]
    yield pair
    for w in pair:
        w.stop()


@pytest.fixture
def spare(tmp_path: Path) -> Iterator[list[Worker]]:
    """Two workers of one test's own (for tests that kill them)."""
    pair = [Worker(tmp_path), Worker(tmp_path)]
    yield pair
    for w in pair:
        w.stop(signal.SIGKILL)


def rpc_list(ws: list[Worker]) -> str:
    return ",".join(w.endpoint for w in ws)


@pytest.fixture(scope="module")
def reference() -> str:
    """The demo model's greedy text on this machine alone, with the kernels workers run."""
    with ember.load("demo", num_ctx=512, **SAME_KERNELS) as m:
        return str(m.generate(PROMPT, raw=True, num_predict=N).text)


def closed_port() -> int:
    return free_port()  # bound and released: nothing listens there


# --- the acceptance: identical greedy text through every entry point ----------------------
def test_python_api_split_across_two_workers_gives_the_local_text(workers, reference):
    with ember.load("demo", rpc=[w.endpoint for w in workers], num_ctx=512, **SAME_KERNELS) as m:
        text = m.generate(PROMPT, raw=True, num_predict=N).text
        devices = m.memory.devices
    assert text == reference and len(text) > 40
    # Layers on this machine and on both workers, each with weights and KV cache there.
    assert set(devices) == {"CPU", *(f"RPC0[{w.endpoint}]" for w in workers)}
    for name, d in devices.items():
        assert d["model"] > 0 and d["kv_cache"] > 0, (name, devices)


def test_tensor_split_puts_every_layer_on_the_workers(workers, reference):
    with ember.load("demo", rpc=rpc_list(workers), tensor_split="0,1,1", num_ctx=512, **SAME_KERNELS) as m:
        text = m.generate(PROMPT, raw=True, num_predict=N).text
        devices = m.memory.devices
    assert text == reference
    assert devices["CPU"]["kv_cache"] == 0  # no layer stayed here (only the input embeddings)
    assert all(devices[f"RPC0[{w.endpoint}]"]["kv_cache"] > 0 for w in workers)
    # The output weight (tied to the 170 MiB embeddings) stayed here too: logits are
    # computed on this machine, not sent over the network.
    assert all(devices[f"RPC0[{w.endpoint}]"]["model"] < 100 * 2**20 for w in workers), devices


def test_tensor_split_with_the_wrong_number_of_devices_names_them(workers):
    with pytest.raises(OptionError, match=r"tensor_split has 2 values but there are 3 devices: CPU \(this machine\), RPC\d+ "):
        ember.load("demo", rpc=rpc_list(workers), tensor_split="1,1", num_ctx=512)


def test_use_repack_switches_llama_cpp_s_repacked_weights_off():
    with ember.load("demo", num_ctx=256) as m:
        repacked = any(k.startswith("CPU_REPACK") for k in m.engine.buffers)
    if not repacked:
        pytest.skip("this CPU has no repacked kernels for the demo model's types")
    with ember.load("demo", num_ctx=256, use_repack=False) as m:
        assert not any(k.startswith("CPU_REPACK") for k in m.engine.buffers)


def test_ember_run_with_rpc_gives_the_local_text_and_reports_devices(workers, reference):
    params = [f"--param={k}={v}" for k, v in {**SAME_KERNELS, "num_predict": N, "num_ctx": 512}.items()]
    r = run_ember("run", "demo", PROMPT, "--raw", "--rpc", rpc_list(workers), "--verbose", *params)
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip("\n") == reference.rstrip("\n")
    for w in workers:
        assert f"RPC0[{w.endpoint}]" in r.stderr  # the --verbose memory report says what went where


def test_server_with_workers_gives_the_local_text_and_ps_shows_devices(tmp_path, spare, reference):
    srv = Server(tmp_path, EMBER_RPC=rpc_list(spare))
    try:
        oc = srv.ollama_client()
        r = oc.generate(model="demo", prompt=PROMPT, raw=True, options={**SAME_KERNELS, "num_predict": N, "num_ctx": 512})
        assert r.response == reference
        devices = srv.ps()[0]["devices"]
        assert set(devices) == {"CPU", *(f"RPC0[{w.endpoint}]" for w in spare)}
        assert all(d["model"] > 0 for d in devices.values())
        # A request cannot point the server at addresses of its choosing.
        with pytest.raises(ollama.ResponseError) as e:
            oc.generate(model="demo", prompt=PROMPT, options={"rpc": f"127.0.0.1:{closed_port()}"})
        assert e.value.status_code == 400 and "rpc" in str(e.value)
    finally:
        srv.stop()


def test_modelfile_names_workers(workers, reference, tmp_path, monkeypatch):
    monkeypatch.setenv("EMBER_MODELS", str(tmp_path))
    ember.create("split", modelfile=f"FROM {demo_model_path()}\nPARAMETER rpc {rpc_list(workers)}\nPARAMETER use_repack false\n")
    with ember.load("split", num_ctx=512, **GREEDY) as m:
        assert m.engine.placement is not None and m.engine.placement.endpoints == [w.endpoint for w in workers]
        assert m.generate(PROMPT, raw=True, num_predict=N).text == reference


# --- faults at load: one line naming the worker --------------------------------------------
def test_unreachable_worker_is_named():
    port = closed_port()
    with pytest.raises(WorkerError, match=rf"^RPC worker 127\.0\.0\.1:{port} is unreachable \(Connection refused\); start it"):
        ember.load("demo", rpc=f"127.0.0.1:{port}")


def test_unreachable_worker_is_one_line_in_ember_run():
    port = closed_port()
    r = run_ember("run", "demo", "hi", "--rpc", f"localhost:{port}")
    assert r.returncode == 1
    assert r.stderr.startswith(f"Error: RPC worker 127.0.0.1:{port} is unreachable")
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


@pytest.mark.parametrize(
    "value, needle",
    [
        ("10.0.0.1", "is not HOST:PORT"),
        ("[::1]:50052", "is not HOST:PORT"),
        ("10.0.0.1:0", "no valid port"),
        ("10.0.0.1:http", "no valid port"),
        ("10.0.0.1:50052,10.0.0.1:50052", "listed twice"),
        (",".join(f"10.0.0.1:{p}" for p in range(1, 18)), "at most 16"),
    ],
)
def test_malformed_worker_lists_are_refused_before_anything_connects(value, needle):
    with pytest.raises(OptionError, match=needle):
        parse_workers(value)
    r = run_ember("run", "demo", "hi", "--rpc", value)
    assert r.returncode == 1 and needle in r.stderr and r.stderr.count("\n") == 1


def test_tensor_split_values_are_checked():
    assert parse_tensor_split("3,1/1") == [3.0, 1.0, 1.0]
    for bad in ("1,x", "0,0", "1,-1", "nan"):
        with pytest.raises(OptionError, match="tensor_split"):
            parse_tensor_split(bad)


def test_modelfile_with_a_bad_worker_names_the_line(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBER_MODELS", str(tmp_path))
    with pytest.raises(ModelfileError, match=r"line 2.*rpc"):
        ember.create("bad", modelfile=f"FROM {demo_model_path()}\nPARAMETER rpc 10.0.0.1\n")


def test_something_that_is_not_a_worker_is_named():
    """A port where something else listens (here: accepts and hangs up)."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        for _ in range(1):
            conn, _ = listener.accept()
            conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        with pytest.raises(WorkerError, match=rf"RPC worker 127\.0\.0\.1:{port} failed the handshake \("):
            ember.load("demo", rpc=f"127.0.0.1:{port}")
    finally:
        listener.close()


def test_worker_busy_with_another_client_is_named(workers):
    """A worker serves one client at a time; llama.cpp would wait for ever."""
    w = workers[0]
    with socket.create_connection(("127.0.0.1", w.port)):  # another client holds it
        with pytest.raises(WorkerError, match=rf"RPC worker {w.endpoint} accepted the connection but did not answer .* one client at a time"):
            ember.load("demo", rpc=w.endpoint)
    with ember.load("demo", rpc=w.endpoint, num_ctx=256) as m:  # free again once that client left
        assert m.engine.placement is not None


def test_ember_rpc_pool_skips_an_unreachable_worker_when_the_model_fits(workers, reference, monkeypatch):
    dead = f"127.0.0.1:{closed_port()}"
    monkeypatch.setenv("EMBER_RPC", f"{dead},{workers[0].endpoint}")
    with ember.load("demo", num_ctx=512, **SAME_KERNELS) as m:
        assert m.engine.placement is not None
        assert m.engine.placement.skipped == [dead] and m.engine.placement.endpoints == [workers[0].endpoint]
        assert m.generate(PROMPT, raw=True, num_predict=N).text == reference
    # rpc "none" loads on this machine alone whatever EMBER_RPC says.
    with ember.load("demo", rpc="none", num_ctx=256) as m:
        assert m.engine.placement is None


def test_ember_rpc_pool_without_room_is_a_clear_error():
    dead = f"127.0.0.1:{closed_port()}"
    with pytest.raises(WorkerError, match=rf"RPC worker {dead} is unreachable .*; the model \(\d+.\d GiB\) does not fit the memory left"):
        rpc.place([dead], required=False, num_gpu=-1, shares=[], n_layer=18, model_bytes=1 << 50)


def test_malformed_ember_rpc_is_named(monkeypatch):
    monkeypatch.setenv("EMBER_RPC", "nonsense")
    with pytest.raises(OptionError, match="^EMBER_RPC: rpc: 'nonsense' is not HOST:PORT"):
        ember.load("demo")


# --- a worker lost during generation -------------------------------------------------------
def _start_streaming(cmd: list[str]) -> subprocess.Popen[bytes]:
    """Start a long greedy generation and return once its first text is out."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    first = proc.stdout.read(8)  # blocks until the model streams
    assert first, proc.stderr.read().decode() if proc.stderr else ""
    return proc


def _assert_one_line_loss(proc: subprocess.Popen[bytes], lost: Worker) -> None:
    _, err = proc.communicate(timeout=60)
    text = err.decode(errors="replace").strip()
    assert proc.returncode == 1, text
    assert text.splitlines()[-1].startswith(f"Error: lost the connection to RPC worker {lost.endpoint} ("), text
    assert "Traceback" not in text and "gdb" not in text and "ggml-rpc.cpp" not in text, text


def test_killing_a_worker_mid_stream_ends_ember_run_with_one_line(spare):
    proc = _start_streaming([EMBER, "run", "demo", PROMPT, "--raw", "--rpc", rpc_list(spare),
                             "--param=temperature=0", "--param=num_predict=100000", "--param=num_ctx=8192"])
    spare[1].stop(signal.SIGKILL)
    _assert_one_line_loss(proc, spare[1])


def test_killing_a_worker_mid_stream_ends_a_python_program_with_one_line(spare):
    script = (
        "import sys, ember\n"
        "m = ember.load('demo', rpc=sys.argv[1], num_ctx=8192)\n"
        "for c in m.generate('Once upon a time', raw=True, stream=True, temperature=0, num_predict=100000):\n"
        "    print(c.text, end='', flush=True)\n"
    )
    proc = _start_streaming([sys.executable, "-c", script, rpc_list(spare)])
    spare[0].stop(signal.SIGTERM)  # a worker stopped by its owner is the same loss
    _assert_one_line_loss(proc, spare[0])


RUNNERS = importlib.util.find_spec("ember.server.runner") is not None


@pytest.mark.skipif(not RUNNERS, reason="needs runner processes (each loaded model in its own process; the 'core' helper "
                    "builds them): until they land, llama.cpp's RPC client aborts the whole server when a worker dies")
def test_killing_a_worker_mid_stream_fails_that_request_and_the_server_reloads(tmp_path, spare, reference):
    srv = Server(tmp_path, EMBER_RPC=rpc_list(spare))
    try:
        body = {"model": "demo", "prompt": PROMPT, "raw": True,
                "options": {**SAME_KERNELS, "num_predict": 100000, "num_ctx": 8192}}
        lines = []
        with httpx.stream("POST", srv.url + "/api/generate", json=body, timeout=120) as r:
            for line in r.iter_lines():
                lines.append(line)
                if len(lines) == 2:
                    spare[1].stop(signal.SIGKILL)
        assert "error" in lines[-1] and spare[1].endpoint in lines[-1], lines[-3:]
        assert httpx.get(srv.url + "/api/version", timeout=10).status_code == 200
        # The next request loads the model again, on the worker that is left (it fits).
        oc = srv.ollama_client()
        again = oc.generate(model="demo", prompt=PROMPT, raw=True, options={**SAME_KERNELS, "num_predict": N, "num_ctx": 512})
        assert again.response == reference
        assert set(srv.ps()[0]["devices"]) == {"CPU", f"RPC0[{spare[0].endpoint}]"}
    finally:
        srv.stop()


# --- ember worker itself ---------------------------------------------------------------------
def test_worker_stops_cleanly_on_ctrl_c_and_sigterm(tmp_path):
    for sig in (signal.SIGINT, signal.SIGTERM):
        w = Worker(tmp_path)
        assert w.stop(sig) == 0
        assert "Worker stopped." in w.log.read_text()


def test_worker_cache_keeps_large_weights(tmp_path):
    """Tensors over 10 MiB are sent once and kept by their hash: a tiny Llama
    with wide (12 MiB, f32) feed-forward weights, every layer on the worker."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from convert_fixtures import LLAMA3_RE, SPECIALS_LLAMA3, make_bpe_tokenizer, pad_vocab

    src = tmp_path / "wide"
    tok = make_bpe_tokenizer(src, LLAMA3_RE, SPECIALS_LLAMA3, bos="<|begin_of_text|>", eos="<|eot_id|>")
    cfg = transformers.LlamaConfig(vocab_size=pad_vocab(len(tok)), hidden_size=1024, intermediate_size=3072,
                                   num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=8,
                                   bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(src)
    model = ember.convert(src, tmp_path / "wide.gguf", outtype="f32")
    cache = tmp_path / "cache"
    w = Worker(tmp_path, "--cache", str(cache))
    try:
        with ember.load(model, rpc=w.endpoint, tensor_split="0,1", num_ctx=64, **SAME_KERNELS) as m:
            assert m.memory.devices[f"RPC0[{w.endpoint}]"]["model"] > 36 * 2**20
            m.generate("hello", raw=True, num_predict=2)
        assert len(list(cache.rglob("*"))) >= 3  # the three feed-forward weights, stored by hash
    finally:
        w.stop()


def test_worker_on_a_non_loopback_address_warns(tmp_path):
    port = free_port()
    proc = subprocess.Popen([EMBER, "worker", "--host", f"0.0.0.0:{port}", "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        warning = proc.stderr.readline()
        assert warning.startswith("Warning: the RPC protocol has no authentication or encryption.")
        assert "SSH tunnel" in warning
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--host", "::1"], "IPv4"),
        (["--host", "example.org:50052"], "IPv4"),
        (["--host", "127.0.0.1:99999"], "1 to 65535"),
        (["--device", "NoSuchGPU"], "no such device; this machine has"),
        (["--threads", "-1"], "--threads"),
    ],
)
def test_worker_bad_input_is_one_line(args, needle):
    r = run_ember("worker", *args)
    assert r.returncode == 1 and needle in r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_worker_on_a_port_in_use_is_one_line():
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        r = run_ember("worker", "--host", f"127.0.0.1:{port}")
    assert r.returncode == 1 and r.stderr.startswith(f"Error: cannot listen on 127.0.0.1:{port}: Address already in use")
    assert r.stderr.count("\n") == 1
