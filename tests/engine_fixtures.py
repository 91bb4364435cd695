"""Shared helpers for the engine, API and `ember run` tests: the demo model and
llama.cpp's own reference path (llama-cpp-python's high-level Llama class)."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path

from ember.demo import demo_model_path

EMBER = str(Path(sys.executable).with_name("ember"))
GREEDY = {"temperature": 0, "repeat_penalty": 1.0}


@functools.lru_cache(maxsize=None)
def reference_greedy(prompt: str, n: int) -> list[int]:
    """Greedy token ids from llama-cpp-python's reference path (not our engine)."""
    import llama_cpp

    # flash_attn as llama.cpp's AUTO gives on a CPU (Ember's default, like llama.cpp's tools).
    llm = llama_cpp.Llama(model_path=str(demo_model_path()), n_ctx=512, verbose=False, seed=0, flash_attn=True)
    ids = llm.tokenize(prompt.encode(), add_bos=True, special=True)
    out = []
    for tok in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
        if llm.token_eos() == tok or tok in (1, 106):  # gemma3: <eos>, <end_of_turn>
            break
        out.append(tok)
        if len(out) >= n:
            break
    return out


def run_ember(*args: str, input: str | None = None, env: dict[str, str] | None = None, timeout: int = 180) -> subprocess.CompletedProcess[str]:
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run(
        [EMBER, *args], input=input if input is not None else "", capture_output=True, text=True, timeout=timeout, env=e
    )


def copy_demo(dest: Path) -> Path:
    shutil.copyfile(demo_model_path(), dest)
    return dest
