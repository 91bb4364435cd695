"""Shared helpers for the engine, API and `ember run` tests: the demo model and
llama.cpp's own reference path (llama-cpp-python's high-level Llama class)."""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

from ember.demo import demo_model_path

GREEDY = {"temperature": 0, "repeat_penalty": 1.0}


@functools.cache
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


def copy_demo(dest: Path) -> Path:
    shutil.copyfile(demo_model_path(), dest)
    return dest
