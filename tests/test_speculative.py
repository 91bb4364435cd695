"""Speculative decoding from n-grams (prompt lookup) or a draft model: exact
at temperature 0 with batch_invariant on the demo model, and the target
distribution kept with sampling (chi-square on a tiny random Llama with a
small vocabulary)."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import ollama
import pytest
import torch
import transformers
from engine_fixtures import GREEDY
from server_fixtures import Server, create

import ember
from ember import options as O
from ember.demo import demo_model_path
from ember.engine import load_model
from ember.engine.scheduler import Scheduler
from ember.engine.speculative import Drafter
from ember.errors import OptionError

SOURCE = (
    "The committee met on Tuesday to review the budget for the new library. After a long discussion, "
    "the members agreed to fund the project with two million dollars, to start construction in the spring, "
    "and to name the building after the town's first teacher, Mary Ellis."
)
PROMPTS = [
    "The capital of France is",
    "Once upon a time",
    # Input-grounded: the continuation quotes the prompt, so drafts get accepted.
    f"{SOURCE}\n\nRepeat the text above exactly:\n\n{SOURCE[:40]}",
]


def test_drafter_proposes_what_followed_the_latest_match():
    d = Drafter([1, 2, 3, 4, 5, 9, 2, 3, 7, 8, 6, 2, 3], max_draft=4)
    assert d.propose(4)[:2] == [7, 8]  # the latest "2 3" was followed by 7 8
    d.extend([7])
    assert d.propose(4)[:2] == [8, 6]  # "2 3 7" (longest match first)
    assert d.propose(1) == [8]
    for _ in range(6):
        d.record(3, 0)
    assert d.propose(4) == []  # drafts that never pay stop


def test_row_cost_is_learnt_from_decode_times():
    from ember.engine.speculative import ROW_COST, RowCost

    cost = RowCost()
    for _ in range(20):
        cost.add(1, 0.012)
    assert abs(cost.relative() - ROW_COST) < 1e-9  # one batch size only: nothing learnt
    for i, rows in enumerate((1, 3, 5, 2, 9) * 10):
        # A busy machine: every third step is slowed down a lot.
        cost.add(rows, (0.010 + 0.002 * rows) * (5 if i % 3 == 0 else 1))
    assert abs(cost.relative() / (0.002 / 0.012) - 1) < 0.15  # the outliers barely count
    assert cost.relative(8) > 1.5 * cost.relative()  # in a batch of 8 sequences a draft costs more
    # Where rows are costly, drafts of middling acceptance stop.
    d = Drafter([1, 2, 3, 1, 2], max_draft=8)
    assert d.length(0.05) > d.length(0.3) > 0 and d.length(1.0) == 0


def test_greedy_invariant_output_is_identical_with_speculation():
    m = load_model(demo_model_path(), {"batch_invariant": True})
    sched = Scheduler(m, num_ctx=1024)
    try:
        grounded = None
        for prompt in PROMPTS:
            toks = m.tokenize(prompt, True, True)
            plain = list(sched.generate(toks, O.merged(GREEDY, {"num_predict": 32, "num_draft": 0})))[-1]
            spec = list(sched.generate(toks, O.merged(GREEDY, {"num_predict": 32})))[-1]
            assert plain.draft_count == 0
            assert spec.tokens == plain.tokens, prompt
            assert spec.draft_accepted <= spec.draft_count
            grounded = spec
        assert grounded is not None and grounded.draft_accepted > 0
    finally:
        sched.close()
        m.close()


@pytest.fixture(scope="module")
def demo_q4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo model requantized to Q4_0: a draft model of the same family
    whose numbers differ, so some of its drafts are rejected."""
    path = tmp_path_factory.mktemp("draft") / "demo-q4_0.gguf"
    ember.quantize(demo_model_path(), path, "Q4_0", allow_requantize=True)
    return path


def test_greedy_invariant_output_is_identical_with_a_draft_model(demo_q4):
    m = load_model(demo_model_path(), {"batch_invariant": True})
    draft = load_model(demo_q4)
    plain = Scheduler(m, num_ctx=1024)
    spec = Scheduler(m, num_ctx=1024, draft_model=draft, draft_cost=0.0)  # drafts at any cost
    try:
        drafted = accepted = 0
        for prompt in PROMPTS:
            toks = m.tokenize(prompt, True, True)
            a = list(plain.generate(toks, O.merged(GREEDY, {"num_predict": 32, "num_draft": 0})))[-1]
            b = list(spec.generate(toks, O.merged(GREEDY, {"num_predict": 32})))[-1]
            assert b.tokens == a.tokens, prompt
            drafted, accepted = drafted + b.draft_count, accepted + b.draft_accepted
        assert 0 < accepted < drafted  # drafts were verified, and some were rejected
        mem, alone = spec.memory_report(), plain.memory_report()  # the draft model's memory counts too
        assert mem.model_bytes == m.size_bytes + draft.size_bytes and mem.kv_cache_bytes > alone.kv_cache_bytes
    finally:
        spec.close()
        plain.close()
        draft.close()
        m.close()


def test_draft_model_must_share_the_vocabulary(tiny):
    m = load_model(demo_model_path())
    other = load_model(tiny)
    try:
        with pytest.raises(OptionError, match="cannot draft for .*vocabularies have"):
            Scheduler(m, num_ctx=256, draft_model=other)
    finally:
        other.close()
        m.close()
    with pytest.raises(OptionError, match="^draft: model .* not found"):
        ember.load("demo", num_ctx=256, draft="no-such-model")


def test_python_result_reports_drafts():
    from ember.api import Model

    with Model("demo", num_ctx=1024) as m:
        r = m.generate(PROMPTS[-1], raw=True, temperature=0, repeat_penalty=1.0, num_predict=24)
        assert 0 < r.draft_accepted <= r.draft_count
        off = m.generate(PROMPTS[-1], raw=True, temperature=0, repeat_penalty=1.0, num_predict=24, num_draft=0)
        assert off.draft_count == 0


def test_batched_sequences_share_verification():
    """Several sequences with drafts in one decode: every sequence completes and
    its output is a greedy path of its own prompt (near-ties allowed, as batched
    kernels round differently)."""
    import threading

    m = load_model(demo_model_path())
    sched = Scheduler(m, num_ctx=512, num_parallel=3)
    try:
        prompts = [m.tokenize(p, True, True) for p in PROMPTS[1:]]
        results: list = [None] * len(prompts)

        def worker(i: int) -> None:
            results[i] = list(sched.generate(prompts[i], O.merged(GREEDY, {"num_predict": 24})))[-1]

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results[-1].draft_accepted > 0
        for prompt, r in zip(prompts, results):
            assert len(r.tokens) == 24
            logits = m.logits(prompt + r.tokens)
            for j, tok in enumerate(r.tokens):
                row = logits[len(prompt) - 1 + j]
                assert row.max() - row[tok] < 1.5
    finally:
        sched.close()
        m.close()


# --- the target distribution with sampling ---------------------------------

TOP_K = 6


def _chi2_p(observed: Counter, expected: dict, n: int) -> float:
    """P-value of Pearson's chi-square (cells with expected < 5 pooled), by
    the Wilson-Hilferty approximation."""
    cells = sorted(expected, key=lambda c: expected[c])
    stat, dof, pool_e, pool_o = 0.0, -1, 0.0, 0
    for c in cells:
        e, o = expected[c] * n, observed.get(c, 0)
        if e < 5:
            pool_e, pool_o = pool_e + e, pool_o + o
            continue
        stat += (o - e) ** 2 / e
        dof += 1
    if pool_e > 0:
        stat += (pool_o - pool_e) ** 2 / max(pool_e, 1e-9)
        dof += 1
    assert sum(observed.values()) == n and not set(observed) - set(expected), "outcomes outside the target's support"
    z = ((stat / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2))


def _softmax_top_k(row: np.ndarray, k: int) -> dict[int, float]:
    idx = np.argsort(-row)[:k]
    p = np.exp(row[idx].astype(np.float64) - row[idx].max())
    return dict(zip(map(int, idx), p / p.sum()))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from convert_fixtures import LLAMA3_RE, SPECIALS_LLAMA3, make_bpe_tokenizer, pad_vocab, torch_threads

    from ember.convert import convert_model

    torch_threads()
    d = tmp_path_factory.mktemp("tiny-llama")
    tok = make_bpe_tokenizer(d, LLAMA3_RE, SPECIALS_LLAMA3, bos="<|begin_of_text|>", eos="<|eot_id|>")
    cfg = transformers.LlamaConfig(
        vocab_size=pad_vocab(len(tok)), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, initializer_range=0.1,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).eval().save_pretrained(d)
    return convert_model(d, d / "tiny.gguf", outtype="f32")


@pytest.mark.parametrize("source", ["ngrams", "draft model"])
def test_speculative_sampling_keeps_the_target_distribution(tiny, source):
    m = load_model(tiny)
    # The model drafts for itself: its greedy token, accepted with the target's probability of it.
    draft = load_model(tiny) if source == "draft model" else None
    try:
        # A prompt that holds "L x y_x" for every token x after its last token L:
        # whatever is sampled first, the n-gram "L x" drafts y_x for the second
        # token. y_x is the second most likely token there, so drafts are
        # accepted only sometimes and rejected drafts' residual draws matter.
        bos, last = m.bos_id, 300
        vocab = [t for t in range(m.n_vocab) if not m.is_eog(t) and t != bos]
        body = [bos]
        for x in vocab:
            body += [last, x, 0]
        prompt = body + [last]
        for x in _softmax_top_k(m.logits(prompt)[-1], TOP_K):
            if x in vocab:
                follow = _softmax_top_k(m.logits(prompt + [x])[-1], TOP_K)
                body[3 + 3 * vocab.index(x)] = sorted(follow, key=follow.__getitem__)[-2]
        prompt = body + [last]
        # The exact target over (first, second) token; an end token ends early.
        expected: dict = {}
        for x, px in _softmax_top_k(m.logits(prompt)[-1], TOP_K).items():
            if m.is_eog(x):
                expected[("eog",)] = expected.get(("eog",), 0) + px
                continue
            for y, py in _softmax_top_k(m.logits(prompt + [x])[-1], TOP_K).items():
                key = (x, -1 if m.is_eog(y) else y)
                expected[key] = expected.get(key, 0) + px * py

        # Drafts at any cost: this model is so small that extra rows do not pay,
        # and every second token is to be a verified draft.
        sched = Scheduler(m, num_ctx=len(prompt) + 16, draft_cost=0.0, draft_model=draft)
        try:
            n = 3000
            observed: Counter = Counter()
            drafted = accepted = 0
            for seed in range(n):
                o = O.merged({"temperature": 1.0, "top_k": TOP_K, "top_p": 1.0, "repeat_penalty": 1.0, "seed": seed, "num_predict": 3})
                last_chunk = list(sched.generate(prompt, o))[-1]
                t = last_chunk.tokens
                key = (t[0], t[1]) if len(t) >= 2 else ((t[0], -1) if t else ("eog",))
                observed[key] += 1
                drafted += last_chunk.draft_count
                accepted += last_chunk.draft_accepted
        finally:
            sched.close()
        assert drafted >= n * 0.9  # nearly every second token was a verified draft
        assert 0.05 * drafted < accepted < 0.95 * drafted
        assert _chi2_p(observed, expected, n) > 1e-3
    finally:
        if draft is not None:
            draft.close()
        m.close()


def test_server_drafts_with_a_registry_model_only(tmp_path, demo_q4):
    srv = Server(tmp_path)
    try:
        create(srv.url, "demo-q4", f"FROM {demo_q4}")
        create(srv.url, "drafty", f"FROM {demo_model_path()}\nPARAMETER draft demo-q4\nPARAMETER num_ctx 512")
        oc = srv.ollama_client()
        # A draft model as large as the target does not pay: after 64 steps
        # without drafts, one token is drafted anyway, to measure again.
        r = httpx.post(srv.url + "/api/generate", json={"model": "drafty", "prompt": "Once upon a time", "stream": False,
                                                         "options": {**GREEDY, "num_predict": 80}}, timeout=120).json()
        assert r["eval_count"] == 80 and 1 <= r["draft_count"] and r["draft_accepted"] <= r["draft_count"], r
        # Over HTTP a draft is a registry model, never a file of the server's.
        for bad, why in ((str(demo_q4), "invalid model name"), ("no-such-model", "not found")):
            with pytest.raises(ollama.ResponseError, match=f"^draft: .*{why}") as e:
                oc.generate(model="demo", prompt="Hi", options={"num_predict": 1, "draft": bad})
            assert e.value.status_code == 400
        create(srv.url, "pathy", f"FROM {demo_model_path()}\nPARAMETER draft {demo_q4}")
        with pytest.raises(ollama.ResponseError, match="^draft: invalid model name"):
            oc.generate(model="pathy", prompt="Hi", options={"num_predict": 1})
    finally:
        srv.stop()
