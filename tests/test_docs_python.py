"""Runs every Python example in docs/python.md, in order, in one fresh folder."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "python.md"


def test_every_example_in_docs_python_runs(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    assert len(blocks) >= 7
    script = tmp_path / "examples.py"
    script.write_text("\n\n".join(blocks), encoding="utf-8")
    env = {**os.environ, "EMBER_MODELS": str(tmp_path / "models")}
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert "0 bytes on the GPU" in out  # CPU-only build: num_gpu accepted and reported
    assert "demo-split-00003-of-00003.gguf" in out
    assert "gemma3" in out and "my-demo" in out
    assert "error: model 'no-such-model' not found" in out
    assert "error: unknown parameter 'temprature'" in out
    assert "'The capital of France is' ->" in out
