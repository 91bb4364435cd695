"""A child process for tests that hand llama.cpp files it might abort on.

Reads one GGUF path per line on stdin; for each it loads the model with
llama.cpp's own C API (through llama-cpp-python's ctypes bindings, nothing of
Ember's engine), creates a small context, decodes a short prompt and greedily
generates a few tokens, then prints one line: ``OK <n tokens>`` or
``ERR <what failed>``. A GGML_ASSERT or a segfault kills the process: the
parent sees the pipe close before the answer and knows which file did it.
"""

from __future__ import annotations

import ctypes
import sys

import llama_cpp as lc
import numpy as np

PROMPT = b"The capital of France is"
N_GEN = 3


def _quiet(level: int, text: bytes | None, user_data: ctypes.c_void_p) -> None:
    pass


_LOG = lc.llama_log_callback(_quiet)


def generate(path: str) -> str:
    mparams = lc.llama_model_default_params()
    mparams.n_gpu_layers = 0
    mparams.use_extra_bufts = False  # no repacking of weights: halves the load time, same graph
    model = lc.llama_model_load_from_file(path.encode(), mparams)
    if not model:
        return "ERR load"
    try:
        cparams = lc.llama_context_default_params()
        cparams.n_ctx = 256
        cparams.n_batch = 64
        cparams.n_ubatch = 64
        cparams.n_threads = cparams.n_threads_batch = 1
        ctx = lc.llama_init_from_model(model, cparams)
        if not ctx:
            return "ERR context"
        try:
            vocab = lc.llama_model_get_vocab(model)
            n_vocab = lc.llama_vocab_n_tokens(vocab)
            ids = (lc.llama_token * 64)()
            n = lc.llama_tokenize(vocab, PROMPT, len(PROMPT), ids, 64, True, False)
            if n <= 0:
                return f"ERR tokenize {n}"
            batch = lc.llama_batch_get_one(ids, n)
            for step in range(N_GEN):
                if lc.llama_decode(ctx, batch) != 0:
                    return f"ERR decode {step}"
                logits = lc.llama_get_logits_ith(ctx, -1)
                best = int(np.ctypeslib.as_array(logits, shape=(n_vocab,)).argmax())
                ids[0] = best
                batch = lc.llama_batch_get_one(ids, 1)
            return f"OK {N_GEN}"
        finally:
            lc.llama_free(ctx)
    finally:
        lc.llama_model_free(model)


def main() -> None:
    lc.llama_log_set(_LOG, ctypes.c_void_p(0))
    lc.llama_backend_init()
    print("READY", flush=True)
    for line in sys.stdin:
        path = line.rstrip("\n")
        if not path:
            continue
        print(generate(path), flush=True)


if __name__ == "__main__":
    main()
