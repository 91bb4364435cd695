"""Hyperparameters llama.cpp asserts on (issue 13, item 1).

A GGUF can pass every structural check and still abort llama.cpp (and the
server holding it) with a GGML_ASSERT: ``block_count = 0`` while loading, a NaN
epsilon in the first decode. Here each attack is first shown to abort
llama.cpp itself (in a child process, tests/llama_worker.py), then shown to be
refused by ``validate_model`` / ``ember validate`` / ``ember run`` with one line
naming the key and its value. The fuzz test mutates every numeric key of the
demo model: whatever validation accepts must load and generate in llama.cpp.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cli_fixtures import run_ember
from gguf import GGUFValueType as T
from gguf_fixtures import LlamaWorker, MetadataPatcher, kv_record, rewrite_gguf

from ember.demo import demo_model_path
from ember.errors import InvalidFileError
from ember.gguf import read_array, read_header, validate_model

Mutation = tuple[str, dict[str, bytes]]  # (description, key -> new record)


@pytest.fixture(scope="module")
def demo_copies(tmp_path_factory: pytest.TempPathFactory) -> list[MetadataPatcher]:
    """Two patchable copies of the demo model (one per fuzz lane)."""
    d = tmp_path_factory.mktemp("hparams")
    return [MetadataPatcher(demo_model_path(), d / f"demo{i}.gguf") for i in range(2)]


@pytest.fixture(scope="module")
def worker() -> Iterator[LlamaWorker]:
    w = LlamaWorker()
    yield w
    w.close()


def _one(key: str, vtype: T, value: object, sub: T | None = None) -> dict[str, bytes]:
    return {key: kv_record(key, vtype, value, sub)}


def _duplicate_token() -> dict[str, bytes]:
    tokens = read_array(read_header(demo_model_path()), "tokenizer.ggml.tokens")
    tokens[300] = tokens[301]
    return _one("tokenizer.ggml.tokens", T.ARRAY, tokens, T.STRING)


# (attack, records to write, the assert llama.cpp dies on, what our error names)
ATTACKS: list[tuple[str, object, str, str]] = [
    ("block_count 0", lambda: _one("gemma3.block_count", T.UINT32, 0), "n_layer_all > 0", "gemma3.block_count = 0"),
    ("block_count 600", lambda: _one("gemma3.block_count", T.UINT32, 600), "n_layer_all > 0", "gemma3.block_count = 600"),
    ("block_count 2^31-1", lambda: _one("gemma3.block_count", T.UINT32, 2**31 - 1), "n_layer_all > 0", "gemma3.block_count = 2147483647"),
    ("rms epsilon NaN", lambda: _one("gemma3.attention.layer_norm_rms_epsilon", T.FLOAT32, math.nan), "eps >= 0",
     "gemma3.attention.layer_norm_rms_epsilon = nan"),
    ("rms epsilon -1", lambda: _one("gemma3.attention.layer_norm_rms_epsilon", T.FLOAT32, -1.0), "eps >= 0",
     "gemma3.attention.layer_norm_rms_epsilon = -1.0"),
    ("unknown rope scaling type", lambda: _one("gemma3.rope.scaling.type", T.STRING, "bogus"), "rope_scaling_type_train",
     "gemma3.rope.scaling.type = 'bogus'"),
    ("odd rope dimension", lambda: _one("gemma3.rope.dimension_count", T.UINT32, 255), "n_dims % 2 == 0",
     "gemma3.rope.dimension_count = 255"),
    ("rope dimension past the head", lambda: _one("gemma3.rope.dimension_count", T.UINT32, 512), "n_dims <= ne0",
     "gemma3.rope.dimension_count = 512"),
    ("expert count past LLAMA_MAX_EXPERTS", lambda: _one("gemma3.expert_count", T.UINT32, 2000), "LLAMA_MAX_EXPERTS",
     "gemma3.expert_count = 2000"),
    ("experts used without experts", lambda: _one("gemma3.expert_used_count", T.UINT32, 2), "n_expert_used_max <= hparams.n_expert",
     "gemma3.expert_used_count = 2"),
    ("nextn layers past block_count", lambda: _one("gemma3.nextn_predict_layers", T.UINT32, 19), "n_layer_nextn <= hparams.n_layer_all",
     "gemma3.nextn_predict_layers = 19"),
    ("KV heads not dividing the heads in one layer",
     lambda: _one("gemma3.attention.head_count_kv", T.ARRAY, [1] * 17 + [3], T.UINT32), "GGML_ASSERT",
     "3 KV heads in layer 17 do not divide the 4 attention heads"),
    ("duplicate vocabulary entry", _duplicate_token, "id_to_token.size() == token_to_id.size()",
     "tokens 300 and 301 are both"),
    ("sliding window without a sliding-window layer", lambda: _one("gemma3.attention.sliding_window_pattern", T.UINT32, 1),
     "is_swa_any()", "gemma3.attention.sliding_window_pattern = 1"),
    ("sliding-window flags all off",
     lambda: _one("gemma3.attention.sliding_window_pattern", T.ARRAY, [0] * 18, T.BOOL), "is_swa_any()",
     "gemma3.attention.sliding_window_pattern = [18 values]"),
    ("BOS added but there is none",
     lambda: {**_one("tokenizer.ggml.model", T.STRING, "t5"), **_one("tokenizer.ggml.bos_token_id", T.UINT32, 2**32 - 1)},
     "special_bos_id != LLAMA_TOKEN_NULL", "there is no BOS token"),
]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("attack,records,assertion,named", ATTACKS, ids=[a[0] for a in ATTACKS])
def test_attack_hparams_that_abort_llama_cpp_are_refused(
    demo_copies: list[MetadataPatcher], worker: LlamaWorker, attack: str, records: object, assertion: str, named: str
) -> None:
    assert callable(records)
    path = demo_copies[0].write(records())
    # The attack is real: llama.cpp itself dies on this file.
    outcome = worker.run(path)
    assert outcome.startswith("ABORT") and assertion in outcome, outcome
    with pytest.raises(InvalidFileError) as e:
        validate_model(path)
    message = str(e.value)
    assert message.startswith(f"{path}: ") and named in message and "\n" not in message, message


@pytest.mark.timeout(600)
def test_attack_block_count_zero_through_the_cli(demo_copies: list[MetadataPatcher]) -> None:
    """`ember validate` said OK and `ember run FILE hi` died with exit 134; now
    both exit 1 with one line naming the key."""
    path = demo_copies[0].write(_one("gemma3.block_count", T.UINT32, 0))
    for args in (("validate", path), ("run", path, "hi")):
        r = run_ember(*args)
        assert r.returncode == 1, (args, r.returncode, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "gemma3.block_count = 0" in lines[0] and "Traceback" not in r.stdout, r.stderr
    path = demo_copies[0].write({})
    r = run_ember("validate", path)
    assert r.returncode == 0 and r.stdout.startswith("OK"), r.stderr


def _numeric_mutations() -> list[Mutation]:
    """For every numeric key of the demo model: edge values of its own type
    (0, 1, small odd numbers, off by one, doubled, huge, -1 as the unsigned
    maximum, NaN and infinities for floats) and wrong types (signed, wider,
    narrower, float, string, bool, arrays)."""
    h = read_header(demo_model_path())
    n_layer = int(h.get("gemma3.block_count"))
    out: list[Mutation] = []
    for kv in h.kv.values():
        key, v = kv.key, kv.value

        def add(what: str, vtype: T, value: object, sub: T | None = None, key: str = key) -> None:
            out.append((f"{key} = {what}", _one(key, vtype, value, sub)))

        if kv.type == T.UINT32:
            for x in dict.fromkeys([0, 1, 2, 3, 7, v - 1, v + 1, 2 * v, 1 << 20, 2**31 - 1, 2**31, 2**32 - 1]):
                if 0 <= x < 2**32 and x != v:
                    add(str(x), T.UINT32, x)
            add("int32", T.INT32, v)
            add("int32 -1", T.INT32, -1)
            add("float32", T.FLOAT32, float(v))
            add("float32 NaN", T.FLOAT32, math.nan)
            add("uint64", T.UINT64, v)
            add("int64 -1", T.INT64, -1)
            add("uint16", T.UINT16, v & 0xFFFF)
            add("string", T.STRING, str(v))
            add("bool", T.BOOL, 1)
            add("one uint32 per layer", T.ARRAY, [v] * n_layer, T.UINT32)
            add("three int32", T.ARRAY, [v] * 3, T.INT32)
        elif kv.type == T.FLOAT32:
            for x in [0.0, -0.0, -1.0, 1e-45, 1e-30, 1.0, 2 * v, 1e30, 3.4e38, math.nan, math.inf, -math.inf]:
                add(repr(x), T.FLOAT32, x)
            add("float64", T.FLOAT64, v)
            add("uint32 1", T.UINT32, 1)
            add("int32 0", T.INT32, 0)
            add("string", T.STRING, repr(v))
        elif kv.type == T.BOOL:
            add(str(not v), T.BOOL, int(not v))
            add("uint8 1", T.UINT8, 1)
            add("uint32", T.UINT32, int(v))
            add("int8 -1", T.INT8, -1)
            add("string", T.STRING, "true")
    return out


def _added_key_mutations() -> list[Mutation]:
    """Keys llama.cpp reads for gemma3 that the demo lacks, added with edge
    values (and a wrong type each)."""
    g = "gemma3."
    u32 = [0, 1, 2, 7, 128, 255, 256, 2**31 - 1, 2**32 - 1]
    f32 = [0.0, -1.0, 1e-30, 30.0, 1e30, math.nan, math.inf, -math.inf]
    keys: dict[str, list[object]] = {
        g + "attention.sliding_window_pattern": [0, 1, 2, 6, 2**32 - 1],
        g + "rope.dimension_count": u32 + [257, 512],
        g + "rope.dimension_count_swa": [0, 1, 128, 255, 256, 512],
        g + "attention.key_length_swa": [0, 128, 256, 512],
        g + "attention.value_length_swa": [0, 128, 256],
        g + "rope.scaling.original_context_length": [0, 1, 2**32 - 1],
        g + "expert_count": [0, 1, 8, 2000],
        g + "expert_used_count": [0, 1, 2],
        g + "expert_group_count": [0, 1, 2],
        g + "expert_group_used_count": [0, 1],
        g + "nextn_predict_layers": [0, 1, 17, 18, 19],
        g + "pooling_type": [0, 1, 2, 3, 4, 5, 2**32 - 1],
        g + "embedding_length_out": [0, 7, 640, 2**32 - 1],
        g + "vocab_size": [0, 5, 2**32 - 1],
        "tokenizer.ggml.eot_token_id": [0, 2**32 - 1],
        "tokenizer.ggml.seperator_token_id": [0, 2**32 - 1],
        g + "rope.freq_base_swa": f32,
        g + "final_logit_softcapping": f32,
        g + "rope.scaling.factor": f32,
        g + "rope.scaling.attn_factor": f32,
        g + "attention.scale": f32,
        g + "attention.layer_norm_epsilon": f32,
        g + "attention.clamp_kqv": [0.0, -1.0, math.nan],
        g + "logit_scale": [0.0, math.nan],
    }
    out: list[Mutation] = []
    for key, values in keys.items():
        vtype = T.FLOAT32 if isinstance(values[0], float) else T.UINT32
        for v in values:
            out.append((f"{key} = {v!r} (added)", _one(key, vtype, v)))
        out.append((f"{key} = string (added)", _one(key, T.STRING, "1")))
    pattern = g + "attention.sliding_window_pattern"
    for flags in ([0] * 18, [1] * 18, [1, 0] * 9, [1] * 3, [0] * 3):
        out.append((f"{pattern} = {flags} (added)", _one(pattern, T.ARRAY, flags, T.BOOL)))
    for scaling in ("none", "linear", "yarn", "longrope", "", "bogus"):
        out.append((f"{g}rope.scaling.type = {scaling!r} (added)", _one(g + "rope.scaling.type", T.STRING, scaling)))
    for flag in (0, 1):
        out.append((f"{g}attention.causal = {flag} (added)", _one(g + "attention.causal", T.BOOL, flag)))
    return out


def _fuzz_lane(patcher: MetadataPatcher, mutations: list[Mutation]) -> list[tuple[str, str | None, str | None]]:
    """(mutation, our error or None, llama.cpp's outcome for accepted files)."""
    worker = LlamaWorker()
    results: list[tuple[str, str | None, str | None]] = []
    try:
        for what, records in mutations:
            path = patcher.write(records)
            try:
                validate_model(path)
            except InvalidFileError as e:
                msg = str(e)
                assert msg.startswith(f"{path}: ") and "\n" not in msg and len(msg) < 400, (what, msg)
                results.append((what, msg, None))
                continue
            results.append((what, None, worker.run(path)))
    finally:
        worker.close()
    return results


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_fuzz_numeric_metadata_accepted_files_load_and_generate(demo_copies: list[MetadataPatcher]) -> None:
    mutations = _numeric_mutations() + _added_key_mutations()
    assert len(mutations) >= 300
    with ThreadPoolExecutor(max_workers=2) as pool:
        lanes = pool.map(_fuzz_lane, demo_copies, [mutations[0::2], mutations[1::2]])
        results = [r for lane in lanes for r in lane]
    assert len(results) == len(mutations)
    accepted = [(what, outcome) for what, error, outcome in results if error is None]
    failed = [(what, outcome) for what, outcome in accepted if not (outcome or "").startswith("OK")]
    assert not failed, f"{len(failed)} files pass validation but do not load and generate in llama.cpp: {failed}"
    for what, error, _ in results:
        if error is not None:
            key = what.split(" = ")[0]
            assert key.split(".")[-1] in error or "tensor" in error, (what, error)
    # Both sides are exercised: many variants load, most are refused.
    assert len(accepted) >= 60 and len(results) - len(accepted) >= 200, (len(accepted), len(results))


def test_valid_per_layer_arrays_and_unknown_keys_pass(demo_copies: list[MetadataPatcher]) -> None:
    """What llama.cpp accepts stays accepted: per-layer arrays of the right
    length, special-token ids past the vocabulary (llama.cpp falls back to
    its defaults), keys it does not read."""
    n = 18
    records = {
        **_one("gemma3.attention.head_count", T.ARRAY, [4] * n, T.INT32),
        **_one("gemma3.feed_forward_length", T.ARRAY, [2048] * n, T.UINT32),
        **_one("tokenizer.ggml.padding_token_id", T.UINT32, 2**32 - 1),
        **_one("gemma3.rope.scaling.type", T.STRING, "linear"),
        **_one("gemma3.expert_count", T.UINT32, 0),
        **_one("some.tool.value", T.FLOAT32, math.nan),
    }
    assert validate_model(demo_copies[1].write(records)) == [demo_copies[1].path]


@pytest.mark.parametrize(
    "records,named",
    [
        (_one("gemma3.pooling_type", T.UINT32, 9), "gemma3.pooling_type = 9"),
        (_one("gemma3.attention.sliding_window", T.UINT32, 2**32 - 1), "gemma3.attention.sliding_window = 4294967295"),
        (_one("gemma3.context_length", T.UINT32, 2**32 - 1), "gemma3.context_length = 4294967295"),
        (_one("gemma3.expert_group_count", T.UINT32, 2), "gemma3.expert_group_count = 2"),
        (_one("tokenizer.ggml.model", T.STRING, "sentencepiece"), "tokenizer.ggml.model = 'sentencepiece'"),
        (_one("tokenizer.ggml.scores", T.ARRAY, [0.0] * 10, T.FLOAT32), "tokenizer.ggml.scores = [10 values]"),
        (_one("tokenizer.ggml.token_type", T.ARRAY, [1] * 4, T.UINT8), "must be an array of int32"),
        (_one("general.architecture", T.UINT32, 3), "general.architecture = 3"),
        (_one("general.file_type", T.FLOAT32, 15.0), "general.file_type = 15.0: must be a uint32"),
        (_one("gemma3.attention.key_length_swa", T.UINT32, 128), "gemma3.attention.key_length_swa = 128"),
        (_one("gemma3.rope.freq_base", T.FLOAT32, math.inf), "gemma3.rope.freq_base = inf"),
    ],
    ids=["pooling", "window", "context", "expert groups", "tokenizer model", "short scores", "token types", "arch type",
         "file type", "swa head size", "rope base"],
)
def test_other_hparams_are_refused_with_one_line(demo_copies: list[MetadataPatcher], records: dict[str, bytes], named: str) -> None:
    path = demo_copies[1].write(records)
    with pytest.raises(InvalidFileError) as e:
        validate_model(path)
    assert str(e.value).startswith(f"{path}: ") and named in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_adapters_and_projectors_are_not_models(tmp_path: Path) -> None:
    """LoRA adapters and vision projectors carry no model hyperparameters."""
    import gguf
    import numpy as np

    for kind, arch in (("adapter", "llama"), ("model", "clip")):
        p = tmp_path / f"{kind}-{arch}.gguf"
        w = gguf.GGUFWriter(p, arch)
        w.add_type(kind)
        w.add_block_count(0)
        w.add_tensor("blk.3.attn_q.weight.lora_a", np.ones((4, 8), dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        assert validate_model(p) == [p]



# --- the architectures Ember converts ------------------------------------------------------------
# Tiny random models made with transformers and converted by Ember (llama, qwen2,
# qwen3, gemma3); InternLM2 and Baichuan share llama's tensors and are the
# llama file with its architecture renamed.


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from convert_fixtures import (
        QWEN2_RE,
        SPECIALS_QWEN,
        make_bpe_tokenizer,
        make_spm_tokenizer,
        pad_vocab,
        torch_threads,
    )

    from ember.convert import convert_model

    torch_threads()
    d = tmp_path_factory.mktemp("tiny")
    spm = make_spm_tokenizer(d / "spm", bos="<s>", eos="</s>")
    bpe = make_bpe_tokenizer(d / "bpe", QWEN2_RE, SPECIALS_QWEN, bos=None, eos="<|im_end|>")
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256)
    configs = {
        "llama": (spm.vocab_size(), "spm", transformers.LlamaConfig, transformers.LlamaForCausalLM, {"tie_word_embeddings": False}),
        "qwen2": (pad_vocab(len(bpe)), "bpe", transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
        "qwen3": (pad_vocab(len(bpe)), "bpe", transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {"head_dim": 32}),
        "gemma3": (spm.vocab_size(), "spm", transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM,
                   {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 4,
                    "layer_types": ["sliding_attention", "full_attention"]}),
    }
    out: dict[str, Path] = {}
    for arch, (vocab, tok, config_cls, model_cls, extra) in configs.items():
        src = d / arch
        shutil.copytree(d / tok, src)
        cfg = config_cls(vocab_size=vocab, **common, **extra)
        cfg.architectures = [model_cls.__name__]
        torch.manual_seed(0)
        model_cls(cfg).save_pretrained(src)
        out[arch] = convert_model(src, d / f"{arch}.gguf", outtype="f32")
    for arch in ("internlm2", "baichuan"):
        out[arch] = rewrite_gguf(out["llama"], d / f"{arch}.gguf", arch=arch)
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma3", "internlm2", "baichuan"])
def test_converted_architectures_pass_and_generate(tiny_models: dict[str, Path], worker: LlamaWorker, arch: str) -> None:
    """No false alarms: every architecture Ember converts passes every check
    (shapes included) and generates in llama.cpp."""
    path = tiny_models[arch]
    assert read_header(path).get("general.architecture") == arch
    assert validate_model(path) == [path]
    assert worker.run(path).startswith("OK")


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "internlm2", "baichuan"])
def test_attack_rope_dimension_below_the_head_size(tiny_models: dict[str, Path], worker: LlamaWorker, tmp_path: Path, arch: str) -> None:
    """These graphs assert that the whole head is rotated; no tensor shape depends on it."""
    head = read_header(tiny_models[arch]).get(f"{arch}.attention.key_length") or 16
    path = rewrite_gguf(tiny_models[arch], tmp_path / "m.gguf", values={f"{arch}.rope.dimension_count": (T.UINT32, head // 2)})
    outcome = worker.run(path)
    assert outcome.startswith("ABORT") and "n_embd_head == n_rot" in outcome, outcome
    with pytest.raises(InvalidFileError, match=rf"{arch}.rope.dimension_count = {head // 2}: must equal the head size {head}"):
        validate_model(path)


def test_attack_qwen2_heads_that_do_not_make_the_embedding(tiny_models: dict[str, Path], worker: LlamaWorker, tmp_path: Path) -> None:
    """Qwen2's Q projection is n_embd wide whatever the heads say: 8 heads of 16
    pass every tensor shape and abort when the graph splits Q into heads."""
    values = {
        "qwen2.attention.head_count": (T.UINT32, 8), "qwen2.attention.head_count_kv": (T.UINT32, 2),
        "qwen2.attention.key_length": (T.UINT32, 16), "qwen2.attention.value_length": (T.UINT32, 16),
        "qwen2.rope.dimension_count": (T.UINT32, 16),
    }
    path = rewrite_gguf(tiny_models["qwen2"], tmp_path / "m.gguf", values=values)
    assert worker.run(path).startswith("ABORT")
    with pytest.raises(InvalidFileError, match="8 heads of 16 .* must make the embedding length 64"):
        validate_model(path)


def test_llama_rope_dimension_and_vocabulary_mismatch_are_refused(tiny_models: dict[str, Path], worker: LlamaWorker, tmp_path: Path) -> None:
    """llama.cpp refuses these cleanly; validation says so first, in one line."""
    path = rewrite_gguf(tiny_models["llama"], tmp_path / "rot.gguf", values={"llama.rope.dimension_count": (T.UINT32, 8)})
    assert worker.run(path) == "ERR load"
    with pytest.raises(InvalidFileError, match="llama.rope.dimension_count = 8: must equal the head size 16"):
        validate_model(path)
    tokens = read_array(read_header(tiny_models["llama"]), "tokenizer.ggml.tokens")
    fewer = {"tokenizer.ggml.tokens": (T.ARRAY, tokens[:-1])}
    path = rewrite_gguf(tiny_models["llama"], tmp_path / "vocab.gguf", values=fewer)
    assert worker.run(path) == "ERR load"
    n = len(tokens)
    with pytest.raises(InvalidFileError, match=rf"tensor '(token_embd|output).weight' has shape \[64, {n}\] but the hyperparameters give \[64, {n - 1}\]"):
        validate_model(path)
