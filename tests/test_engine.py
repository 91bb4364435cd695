"""The engine on the real demo model: llama.cpp parity, splits, sampling,
stop strings, UTF-8 streaming, batching and prefix reuse."""

from __future__ import annotations

import threading

import pytest
from engine_fixtures import GREEDY, reference_greedy

from ember import options as O
from ember.api import Model
from ember.demo import demo_model_path
from ember.engine import load_model
from ember.engine.scheduler import INVARIANT_CHUNK, Scheduler
from ember.errors import ContextOverflowError, InvalidFileError, OptionError, QueueFullError

PROMPTS = ["The capital of France is", "def fibonacci(n):", "中国的首都是"]


@pytest.fixture(scope="module")
def engine():
    m = load_model(demo_model_path())
    yield m
    m.close()


def _greedy_ids(sched: Scheduler, tokens: list[int], n: int, **extra: object) -> tuple[list[int], str]:
    chunks = list(sched.generate(tokens, O.merged(GREEDY, {"num_predict": n}, extra)))
    return chunks[-1].tokens, "".join(c.text for c in chunks)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_matches_llama_cpp_reference(engine, prompt):
    sched = Scheduler(engine, num_ctx=512)
    try:
        ids, text = _greedy_ids(sched, engine.tokenize(prompt, True, True), 32)
    finally:
        sched.close()
    assert ids == reference_greedy(prompt, 32)
    assert text == engine.detokenize(ids)


def test_split_model_loads_from_any_shard_and_custom_names(tmp_path, engine):
    from ember.gguf import split_model

    shards = split_model(demo_model_path(), tmp_path / "demo", max_size=100_000_000)
    assert len(shards) >= 3
    expected = reference_greedy(PROMPTS[0], 16)
    for path in (shards[1], [*map(str, shards)]):
        m = load_model(path)
        try:
            assert len(m.paths) == len(shards)
            s = Scheduler(m, num_ctx=256)
            assert _greedy_ids(s, m.tokenize(PROMPTS[0], True, True), 16)[0] == expected
            s.close()
        finally:
            m.close()
    # Names that are not llama.cpp's pattern load when listed explicitly.
    renamed = []
    for i, s in enumerate(shards):
        renamed.append(s.rename(tmp_path / f"part-{chr(97 + i)}.bin.gguf"))
    m = load_model(renamed)
    try:
        s = Scheduler(m, num_ctx=256)
        assert _greedy_ids(s, m.tokenize(PROMPTS[0], True, True), 16)[0] == expected
        s.close()
    finally:
        m.close()


def test_missing_shard_is_a_clear_error(tmp_path):
    from ember.gguf import split_model

    shards = split_model(demo_model_path(), tmp_path / "demo", max_size=100_000_000)
    shards[-1].unlink()
    with pytest.raises(InvalidFileError) as e:
        load_model(shards[0])
    assert shards[-1].name in str(e.value)


def test_sampling_seed_stop_and_length(engine):
    sched = Scheduler(engine, num_ctx=512)
    try:
        toks = engine.tokenize("Once upon a time", True, True)
        sampled = O.merged({"temperature": 0.9, "num_predict": 24})

        def text(**o: object) -> str:
            return "".join(c.text for c in sched.generate(toks, {**sampled, **o}))

        assert text(seed=7) == text(seed=7)
        assert len({text(seed=s) for s in (1, 2, 3)}) > 1
        # num_predict: exactly that many tokens, done_reason length.
        last = list(sched.generate(toks, O.merged(GREEDY, {"num_predict": 5})))[-1]
        assert (last.eval_count, last.done_reason) == (5, "length")
        # A stop string that spans two tokens of the greedy continuation.
        ids, full = _greedy_ids(sched, toks, 24)
        pieces = [engine.detokenize([t]) for t in ids]
        k = next(i for i in range(3, len(pieces) - 1) if pieces[i].strip() and pieces[i + 1].strip())
        stop = pieces[k][-2:] + pieces[k + 1][:2]
        chunks = list(sched.generate(toks, O.merged(GREEDY, {"num_predict": 24, "stop": [stop]})))
        out = "".join(c.text for c in chunks)
        assert chunks[-1].done_reason == "stop"
        assert out == full[: full.index(stop)]
        assert stop not in out
    finally:
        sched.close()


def _llama_cpp_chain(engine, tokens: list[int], n: int, o: dict) -> list[int]:
    """Tokens from llama.cpp's own sampler chain over the whole vocabulary
    (penalties, top-k, top-p, min-p, temperature, seeded draw), decoding alone."""
    import llama_cpp as lc

    ctx = engine.new_context(512)
    chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
    for smpl in (
        lc.llama_sampler_init_penalties(engine.n_vocab, o["repeat_last_n"], o["repeat_penalty"], o["frequency_penalty"], o["presence_penalty"]),
        lc.llama_sampler_init_top_k(o["top_k"]),
        lc.llama_sampler_init_top_p(o["top_p"], 1),
        lc.llama_sampler_init_min_p(o["min_p"], 1),
        lc.llama_sampler_init_temp(o["temperature"]),
        lc.llama_sampler_init_dist(o["seed"]),
    ):
        lc.llama_sampler_chain_add(chain, smpl)
    try:
        for t in tokens:
            lc.llama_sampler_accept(lc.llama_sampler_chain_get(chain, 0), t)
        ctx.decode([(t, i, 0, i == len(tokens) - 1) for i, t in enumerate(tokens)])
        out, row = [], len(tokens) - 1
        for _ in range(n):
            tok = lc.llama_sampler_sample(chain, ctx.ptr, row)
            if engine.is_eog(tok):
                break
            out.append(tok)
            ctx.decode([(tok, len(tokens) + len(out) - 1, 0, True)])
            row = 0
        return out
    finally:
        lc.llama_sampler_free(chain)
        ctx.close()


@pytest.mark.parametrize("extra", [{}, {"frequency_penalty": 0.5, "presence_penalty": 0.3, "min_p": 0.05, "top_k": 100}])
def test_default_sampler_gives_llama_cpp_chain_tokens(engine, extra):
    """The fast sampler (penalties on the window's tokens, top-k in numpy, then
    llama.cpp's samplers over the candidates) draws the very tokens of llama.cpp's
    whole chain for the same seed: the same computation in the same order."""
    sched = Scheduler(engine, num_ctx=512)
    try:
        toks = engine.tokenize("Once upon a time, in a village by the sea,", True, True)
        for seed in (1, 2):
            o = O.merged({"seed": seed, "num_predict": 40, "num_draft": 0}, extra)
            ours = list(sched.generate(toks, o))[-1].tokens
            assert ours == _llama_cpp_chain(engine, toks, 40, o)
            assert len(ours) > 10
    finally:
        sched.close()


def test_top_k_selection_matches_a_full_sort():
    import numpy as np

    from ember.engine.sampling import top_k_indices

    rng = np.random.default_rng(0)
    rows = [
        rng.standard_normal(262144).astype(np.float32) * 4,
        np.zeros(262144, dtype=np.float32),  # all tied
        np.repeat(rng.standard_normal(64).astype(np.float32), 4096),  # big tied groups
        np.sort(rng.standard_normal(50000).astype(np.float32)),  # ascending: the top is at the end
        rng.standard_normal(30).astype(np.float32),  # fewer than k
        rng.standard_normal(262144 + 37).astype(np.float32),  # a tail outside the groups
    ]
    for row in rows:
        for k in (1, 40, 1000):
            idx = top_k_indices(row, k)
            assert len(idx) == min(k, len(row)) and len(set(idx.tolist())) == len(idx)
            assert np.array_equal(row[idx], np.sort(row)[::-1][: len(idx)])


def test_utf8_streaming_of_chinese(engine):
    sched = Scheduler(engine, num_ctx=512)
    try:
        # Rare characters are byte-fallback tokens: one character spans several tokens.
        prompt = "龘䶵𪚥 龘䶵𪚥 龘䶵𪚥 龘䶵𪚥 北京 龘䶵𪚥"
        chunks = list(sched.generate(engine.tokenize(prompt, True, True), O.merged(GREEDY, {"num_predict": 40})))
    finally:
        sched.close()
    ids = chunks[-1].tokens
    # Some token must be an incomplete UTF-8 sequence on its own, or the test proves nothing.
    assert any(engine.token_bytes(t).decode("utf-8", "replace") != engine.token_bytes(t).decode("utf-8", "ignore") for t in ids)
    text = "".join(c.text for c in chunks)
    assert "\ufffd" not in text
    assert text == b"".join(engine.token_bytes(t) for t in ids).decode("utf-8")
    assert any("\u4e00" <= ch <= "\u9fff" for ch in text)


@pytest.mark.parametrize("invariant", [True, False])
def test_concurrent_sequences(invariant):
    """Batch-invariant mode: identical tokens to running alone. Batched mode:
    every sequence completes and its first token (from its own prompt) matches."""
    m = load_model(demo_model_path(), {"batch_invariant": invariant})
    sched = Scheduler(m, num_ctx=256, num_parallel=4)
    try:
        prompts = [m.tokenize(p, True, True) for p in PROMPTS + ["Once upon a time", "Water boils at"]]
        alone = [_greedy_ids(sched, p, 24)[0] for p in prompts]
        sched.close()
        sched = Scheduler(m, num_ctx=256, num_parallel=4)
        results: list[list[int] | None] = [None] * len(prompts)

        def worker(i: int) -> None:
            results[i] = _greedy_ids(sched, prompts[i], 24)[0]

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if invariant:
            assert results == alone
        else:
            # Batched kernels round differently (llama.cpp itself gives different
            # logits for different batch shapes), so greedy paths may part; but
            # every token must be a top choice of a cold evaluation of its own
            # sequence, which a sequence mixed with another's cache would not be.
            for prompt, out in zip(prompts, results):
                assert out is not None and len(out) == 24
                logits = m.logits(prompt + out)
                for j, tok in enumerate(out):
                    row = logits[len(prompt) - 1 + j]
                    assert row.max() - row[tok] < 1.5  # a near-tie at worst
    finally:
        sched.close()
        m.close()


@pytest.fixture(scope="module")
def invariant_engine():
    m = load_model(demo_model_path(), {"batch_invariant": True})
    yield m
    m.close()


def _replay(engine, first: list[int], n_keep: int, follow: list[int], n: int) -> list[int]:
    """What reusing ``n_keep`` cached tokens of ``first`` must give: the same
    llama.cpp calls, by hand (llama.cpp's numbers depend on how a prompt is
    chunked, so a cold run of ``follow`` in one piece is no reference)."""
    import numpy as np

    ctx = engine.new_context(1024)
    try:
        ctx.decode([(t, i, 0, False) for i, t in enumerate(first)])
        ctx.seq_rm(0, n_keep, -1)
        rest = follow[n_keep:]
        ctx.decode([(t, n_keep + i, 0, i == len(rest) - 1) for i, t in enumerate(rest)])
        row, pos, out = len(rest) - 1, len(follow), []
        for _ in range(n):
            tok = int(np.argmax(ctx.logits_row(row)))
            out.append(tok)
            ctx.decode([(tok, pos, 0, True)])
            row, pos = 0, pos + 1
        return out
    finally:
        ctx.close()


def test_prefix_reuse_evaluates_only_the_rest(invariant_engine):
    engine = invariant_engine
    sched = Scheduler(engine, num_ctx=1024, num_parallel=2)
    try:
        base = engine.tokenize("A long shared introduction. " * 30, True, True)
        first_prompt = base + engine.tokenize(" Question one?", False, True)
        first = list(sched.generate(first_prompt, O.merged(GREEDY, {"num_predict": 4})))[-1]
        assert first.prompt_eval_count == first.prompt_tokens
        follow = base + engine.tokenize(" Question two?", False, True)
        second = list(sched.generate(follow, O.merged(GREEDY, {"num_predict": 6})))[-1]
        n_keep = second.prompt_tokens - second.prompt_eval_count
        # batch_invariant reuses whole chunks of the prompt's evaluation only
        assert n_keep == len(base) - len(base) % INVARIANT_CHUNK > 0
        assert second.tokens == _replay(engine, first_prompt, n_keep, follow, 6)
    finally:
        sched.close()


def test_prefix_copied_from_a_busy_sequence(invariant_engine):
    engine = invariant_engine
    sched = Scheduler(engine, num_ctx=1024, num_parallel=2)
    try:
        base = engine.tokenize("Shared context about the history of Rome. " * 20, True, True)
        it = iter(sched.submit(base, O.merged(GREEDY, {"num_predict": 60})))
        next(it)  # the first sequence is generating now
        follow = base + engine.tokenize(" In short,", False, True)
        second = list(sched.generate(follow, O.merged(GREEDY, {"num_predict": 6})))[-1]
        n_keep = second.prompt_tokens - second.prompt_eval_count
        assert n_keep == len(base) - len(base) % INVARIANT_CHUNK > 0
        assert second.prompt_eval_count < INVARIANT_CHUNK + 10
        for _ in it:
            pass
    finally:
        sched.close()
    assert second.tokens == _replay(engine, base, n_keep, follow, 6)


def test_queue_limit_counts_only_waiting_requests(engine):
    """EMBER_MAX_QUEUE=4 with 4 free slots refused 3 of 8 concurrent requests:
    they counted until the scheduler admitted them. Only requests that wait
    count. (The test holds the scheduler's lock, so nothing is admitted while
    it submits: the outcome does not depend on timing.)"""
    sched = Scheduler(engine, num_ctx=256, num_parallel=2, max_queue=2)
    prompt = engine.tokenize("1, 2, 3, 4, 5,", True, True)
    handles = []
    try:
        with sched._cond:
            for _ in range(4):  # two for the free slots, two that wait
                handles.append(sched.submit(prompt, O.merged(GREEDY, {"num_predict": 200})))
            with pytest.raises(QueueFullError):
                sched.submit(prompt, O.merged(GREEDY, {"num_predict": 1}))  # a third that would wait
    finally:
        for h in handles:
            h.cancel()
        sched.close()


def test_context_limits_and_memory_refusal(engine):
    sched = Scheduler(engine, num_ctx=64)
    try:
        with pytest.raises(ContextOverflowError):
            sched.submit(engine.tokenize("word " * 100, True, True), O.merged())
        last = list(sched.generate(engine.tokenize("Count: 1 2 3", True, True), O.merged(GREEDY, {"num_predict": 500})))[-1]
        assert last.done_reason == "length"
        assert last.prompt_tokens + last.eval_count <= 64
    finally:
        sched.close()
    with pytest.raises(OptionError, match="KV cache"):
        engine.new_context(50_000_000)


def test_model_api_chat_fallback_embeddings_and_memory():
    with Model("demo", num_ctx=512) as m:
        assert m.template is None  # the demo is a base model
        prompt = m.render_chat([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}])
        assert prompt == "S\n\nU"
        r = m.chat([{"role": "user", "content": "The sky is"}], num_predict=4, temperature=0)
        assert r.message == {"role": "assistant", "content": r.text} and r.eval_count == 4
        a, b = m.embed(["hello world", "hello world"])
        assert a == b and abs(sum(x * x for x in a) - 1) < 1e-3
        mem = m.memory
        assert mem.model_bytes > 200e6 and mem.kv_cache_bytes > 0 and mem.compute_bytes > 0 and mem.rss_bytes > 0
        info = m.info
        assert (info.architecture, info.quantization, info.num_ctx) == ("gemma3", "Q4_K_M", 512)
        with pytest.raises(OptionError):
            m.generate("x", temprature=1)
        with pytest.raises(OptionError):
            m.generate("x", format="yaml")


def test_json_format_output_parses():
    import json

    with Model("demo", num_ctx=512) as m:
        r = m.generate("A person as JSON:", format="json", num_predict=80, temperature=0)
        if r.done_reason == "stop":
            json.loads(r.text)
        schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}, "required": ["name", "age"]}
        r = m.generate("A person as JSON:", format=schema, num_predict=120, temperature=0)
        assert r.done_reason == "stop"
        data = json.loads(r.text)
        assert isinstance(data["name"], str) and isinstance(data["age"], int)


def test_chat_template_from_gguf_is_rendered(tmp_path):
    """A GGUF with a Jinja chat template: the template is rendered as itself."""
    import gguf

    src = gguf.GGUFReader(demo_model_path())
    out = tmp_path / "with-template.gguf"
    w = gguf.GGUFWriter(out, arch="gemma3")
    template = (
        "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
        "{{ m['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
    )
    for field in src.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        _copy_field(w, field)
    w.add_chat_template(template)
    for t in src.tensors:
        w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with Model(str(out), num_ctx=512) as m:
        assert m.template is not None and m.template.kind == "jinja"
        text = m.render_chat([{"role": "user", "content": "Hi"}])
        assert text == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
        # BOS comes from the template: the prompt starts with exactly one BOS token.
        toks = m.tokenize(text, add_special=False)
        assert toks[0] == m.engine.bos_id and toks[1] != m.engine.bos_id
        r = m.chat([{"role": "user", "content": "Hi"}], num_predict=8, temperature=0)
        assert r.eval_count >= 1


def _copy_field(w, field) -> None:
    import gguf

    t = field.types[0]
    if t == gguf.GGUFValueType.ARRAY:
        w.add_array(field.name, field.contents())
    else:
        w.add_key_value(field.name, field.contents(), t)
