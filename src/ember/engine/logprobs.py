"""Log probabilities of generated tokens, as Ollama and OpenAI report them:
the log-softmax of the logits row a token was chosen from, before penalties,
truncation and temperature (the model's own distribution at that position).

Only requests that ask pay for it: a copy of the row llama.cpp already
returned, taken before the sampler penalizes it in place; no extra decode.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ember.engine.model import LoadedModel
from ember.engine.sampling import top_k_indices


def _log_normalizer(row: np.ndarray) -> float:
    """log(sum(exp(row))), without overflow, summed in double precision."""
    m = float(row.max())
    return m + float(np.log(np.exp(row - m).sum(dtype=np.float64)))


def _token(model: LoadedModel, token: int, logprob: float) -> dict[str, Any]:
    raw = model.token_bytes(token)
    # A piece of a multi-byte character keeps its raw bytes; its text is replaced, as llama.cpp and OpenAI do.
    return {"token": raw.decode("utf-8", "replace"), "logprob": logprob, "bytes": list(raw)}


def token_logprob(model: LoadedModel, row: np.ndarray, token: int, top: int) -> dict[str, Any]:
    """The entry of ``token`` chosen from ``row`` (raw logits): its text, log
    probability and bytes, and the ``top`` most likely tokens there (Ollama's
    and OpenAI's shape; ``top_logprobs`` only when ``top`` > 0)."""
    norm = _log_normalizer(row)
    out = _token(model, token, float(row[token]) - norm)
    if top > 0:
        out["top_logprobs"] = [_token(model, int(t), float(row[t]) - norm) for t in top_k_indices(row, top)]
    return out
