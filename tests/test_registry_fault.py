"""Fault injection: SIGKILL `ember create` at random points (20 runs). No kill may
leave a manifest that points at a missing or partial blob, and a later create
must succeed (and clean up the leftovers)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from registry_fixtures import write_tiny_gguf

from ember.registry import store
from ember.registry.core import resolve
from ember.registry.create import create_model

RUNS = 20


def _check_manifests() -> int:
    """Every manifest parses and every blob it names exists, whole (hash = name)."""
    n = 0
    for p in store.iter_manifests():
        m = store.read_manifest(p)
        for layer in [m.config, *m.layers]:
            path = store.blob_path(layer.digest)
            assert path.is_file(), f"{p} names missing blob {layer.digest}"
            assert path.stat().st_size == layer.size, f"{p}: blob {layer.digest} is partial"
            assert store.verify_blob(layer.digest), f"{p}: blob {layer.digest} does not match its digest"
        n += 1
    return n


def _check_blobs(root: Path, verified: set[str]) -> None:
    """No file under a final blob name is partial: each one hashes to its name
    (checked once per blob)."""
    for b in (root / "blobs").iterdir():
        if b.name.startswith(store.TMP_PREFIX) or b.name in verified:
            continue
        digest = b.name.replace("-", ":", 1)
        assert store.verify_blob(digest), f"{b.name} holds content that does not match its name"
        verified.add(b.name)


def _leftovers(root: Path) -> bool:
    """True when a killed create left a temp file or an unreferenced blob."""
    blobs = root / "blobs"
    if not blobs.is_dir():
        return False
    names = {p.name for p in blobs.iterdir()}
    used = {d.replace(":", "-", 1) for d in store.referenced_digests()}
    return bool(names - used) or any((root / "tmp").glob("*")) or any(root.glob("manifests/*/*/*/.*.tmp"))


def test_sigkill_create_never_breaks_the_registry(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "models"
    monkeypatch.setenv("EMBER_MODELS", str(root))
    env = os.environ.copy()
    # Three sources (two of them split in two), so runs both write new blobs and reuse old ones.
    for i in range(3):
        write_tiny_gguf(tmp_path / f"src{i}.gguf", n_tensors=32, rows=4096, seed=100 + i,
                        split_max_tensors=16 if i < 2 else 0)
        first = f"src{i}-00001-of-00002.gguf" if i < 2 else f"src{i}.gguf"
        (tmp_path / f"Modelfile{i}").write_text(f"FROM {first}\nSYSTEM variant {i}\nPARAMETER num_ctx {1024 * (i + 1)}\n")

    cmd = [sys.executable, "-m", "ember.cli.main", "create"]
    t0 = time.monotonic()
    subprocess.run([*cmd, "warm", "-f", "Modelfile0"], cwd=tmp_path, env=env, check=True, capture_output=True)
    full = time.monotonic() - t0  # how long one whole create takes here
    rng = random.Random(4242)
    killed = hit_mid_write = poll_hits = 0
    verified: set[str] = set()
    blobs = root / "blobs"
    for run in range(RUNS):
        poll = run % 2 == 1
        if poll:
            # a fresh source, so this create must write new blobs; kill it just after a blob write starts
            write_tiny_gguf(tmp_path / f"fresh{run}.gguf", n_tensors=32, rows=4096, seed=1000 + run, split_max_tensors=16)
            (tmp_path / f"Modelfile.fresh{run}").write_text(f"FROM fresh{run}-00002-of-00002.gguf\nSYSTEM fresh {run}\n")
            modelfile = f"Modelfile.fresh{run}"
        else:
            modelfile = f"Modelfile{rng.randrange(3)}"
        name = rng.choice(["m", "m", "other:v1"])
        p = subprocess.Popen([*cmd, name, "-f", modelfile], cwd=tmp_path, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if poll:
            deadline = time.monotonic() + 10 * full
            while p.poll() is None and time.monotonic() < deadline:
                if any(q.name.startswith(store.TMP_PREFIX) for q in blobs.iterdir()):
                    break
                time.sleep(0.002)
            time.sleep(rng.uniform(0, 0.03))
        else:
            time.sleep(rng.uniform(0.3 * full, 1.5 * full))
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            killed += 1
        p.wait(timeout=60)
        if p.returncode == -signal.SIGKILL and _leftovers(root):
            hit_mid_write += 1
            poll_hits += poll
        assert _check_manifests() >= 1, f"run {run}"
        _check_blobs(root, verified)
        # a model that exists resolves completely
        for entry in ("warm", "m", "other:v1"):
            try:
                r = resolve(entry)
            except Exception as e:  # only "not created yet" is acceptable
                assert "not found" in str(e), (run, entry, e)
                continue
            assert all(q.is_file() for q in r.model_paths)
    print(f"fault test: {killed} of {RUNS} creates killed, {hit_mid_write} while writing blobs ({poll_hits} aimed)")
    assert killed >= RUNS // 4, f"only {killed} of {RUNS} runs were killed before finishing"
    assert poll_hits >= RUNS // 4, f"only {poll_hits} aimed kills landed while blobs were being written"

    # a later create succeeds and removes at once the temporary files and work
    # folders of the killed creates (their processes are gone: safe)
    r = create_model("m", (tmp_path / "Modelfile0").read_text().replace("FROM ", f"FROM {tmp_path}/"))
    assert r.system == "variant 0" and len(r.model_paths) == 2
    assert _check_manifests() >= 2
    assert not [q for q in blobs.iterdir() if q.name.startswith(store.TMP_PREFIX)]
    assert not any((root / "tmp").glob("*"))
    # unreferenced whole blobs may be uploads for a create to come: they wait for their hour
    store.prune(min_age=0)
    assert not _leftovers(root)
