"""`ember inspect` / `ember validate` / shard discovery on real files: the demo
model (gemma-3-270m Q4_K_M) checked against llama.cpp and gguf-py, a tiny
GGUF with every value type, and one-line CLI errors."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import gguf
import pytest
from cli_fixtures import run_ember
from gguf_fixtures import llama_cpp_gguf_ok, llama_cpp_gguf_tables, write_tiny_gguf

from ember.demo import demo_model_path
from ember.errors import InvalidFileError
from ember.gguf import find_shards, inspect_model, read_header, split_model, validate_model
from ember.gguf import validate as gv


@pytest.fixture(scope="module")
def demo() -> Path:
    return demo_model_path()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf")[0]


def test_inspect_demo_against_llama_cpp(demo: Path) -> None:
    import llama_cpp

    info = inspect_model(demo)
    assert info.architecture == "gemma3"
    assert info.name == "Gemma 3 270m"
    assert info.file_type == "Q4_K_M" and info.file_type_id == gguf.LlamaFileType.MOSTLY_Q4_K_M
    assert info.context_length == 32768
    assert info.embedding_length == 640 and info.block_count == 18
    assert info.tokenizer == "llama" and info.vocab_size == 262144
    assert not info.has_chat_template and info.chat_template is None
    assert info.split_count == 1 and info.split_files == [str(demo)]
    assert info.total_size == demo.stat().st_size

    # Parameter count and tensor bytes as llama.cpp itself reports them.
    llm = llama_cpp.Llama(model_path=str(demo), n_ctx=64, verbose=False)
    try:
        assert info.parameter_count == llama_cpp.llama_model_n_params(llm.model) == 268_098_176
        assert info.tensor_bytes == llama_cpp.llama_model_size(llm.model)
    finally:
        llm.close()
    assert info.bits_per_weight == pytest.approx(info.tensor_bytes * 8 / info.parameter_count)
    assert 7.0 < info.bits_per_weight < 7.7

    # Every key and tensor record as llama.cpp's own GGUF parser reads them.
    ref = llama_cpp_gguf_tables(demo)
    h = read_header(demo)
    assert (h.version, h.alignment, h.data_offset) == (ref["version"], ref["alignment"], ref["data_offset"])
    ours = []
    for kv in h.kv.values():
        if kv.is_array:
            ours.append((kv.key, int(kv.type), (int(kv.sub_type), kv.count)))
        else:
            ours.append((kv.key, int(kv.type), kv.value))
    assert ours == ref["kv"]
    assert [(t.name, int(t.type), list(t.shape) + [1] * (4 - len(t.shape)), t.offset, t.nbytes) for t in h.tensors] == ref["tensors"]
    counts: dict[str, list[int]] = {}
    for t in ref["tensors"]:
        c = counts.setdefault(gguf.GGMLQuantizationType(t[1]).name, [0, 0])
        c[0] += 1
        c[1] += t[4]
    assert {k: [v.tensors, v.bytes] for k, v in info.quant_types.items()} == counts
    assert [e.name for e in info.tensors] == [t[0] for t in ref["tensors"]]


def test_tiny_every_value_type(tiny: Path) -> None:
    info = inspect_model(tiny)
    m = info.metadata
    assert (m["test.u8"], m["test.i8"], m["test.u16"], m["test.i16"]) == (200, -5, 60000, -30000)
    assert (m["test.u32"], m["test.i32"], m["test.u64"], m["test.i64"]) == (4_000_000_000, -2_000_000_000, 2**63 + 5, -(2**62))
    assert m["test.f32"] == 0.5 and m["test.f64"] == 3.141592653589793 and m["test.bool"] is True
    assert m["test.string"] == "héllo wörld"
    assert m["test.arr_i32"] == [1, -2, 3] and m["test.arr_f32"] == [0.25, 0.5]
    assert m["test.arr_bool"] == [True, False, True] and m["test.arr_str"] == ["a", "bc", "déf"]
    assert m["test.arr_u16"] == [1, 2, 65535]
    assert m["tokenizer.ggml.tokens"] == {"array": "string", "length": 100}
    assert info.has_chat_template and info.chat_template == "{% for m in messages %}{{ m.content }}{% endfor %}"
    assert info.file_type == "Q8_0" and info.tokenizer == "gpt2" and info.vocab_size == 100
    assert {k: v.tensors for k, v in info.quant_types.items()} == {"F32": 3, "F16": 1, "Q8_0": 1, "Q4_K": 1, "I32": 1}
    assert info.parameter_count == 8 * 64 + 64 + 4 * 64 + 2 * 64 + 256 + 5 + 3
    assert llama_cpp_gguf_ok(tiny)
    # gguf-py's reader agrees on every key and tensor of the tiny file.
    reader = gguf.GGUFReader(tiny)
    for key, field in reader.fields.items():
        if not key.startswith("GGUF.") and key not in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores"):
            assert m[key] == field.contents(), key
    assert [(e.name, e.type, e.shape, e.bytes) for e in info.tensors] == [
        (t.name, t.tensor_type.name, [int(x) for x in t.shape], int(t.n_bytes)) for t in reader.tensors
    ]


def test_validate_is_cheap(demo: Path) -> None:
    gv._CACHE.clear()
    t0 = time.perf_counter()
    assert validate_model(demo) == [demo]
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    validate_model(demo)
    again = time.perf_counter() - t0
    # Headers and tables only (never the 235 MB of tensor data); cached after.
    assert first < 1.0, first
    assert again < 0.05, again


def test_find_shards(tmp_path: Path, tiny: Path) -> None:
    shards = split_model(tiny, tmp_path / "m", max_tensors=3)
    assert len(shards) == 3
    for s in shards:
        assert find_shards(s) == shards
        assert validate_model(s) == shards
    assert validate_model(shards) == shards
    assert find_shards(tiny) == [tiny]
    with pytest.raises(InvalidFileError, match=r"m-00002-of-00003.gguf: split.no is 1 but this file is shard 1 of 3"):
        validate_model([shards[1], shards[0], shards[2]])
    with pytest.raises(InvalidFileError, match=r"is shard 1 of 3: open the whole set"):
        validate_model([shards[0]])
    # A shard under a name llama.cpp cannot follow: say which names it needs.
    odd = tmp_path / "first.gguf"
    shutil.copy(shards[0], odd)
    with pytest.raises(InvalidFileError, match=r"first.gguf: is shard 1 of 3 .*first-00001-of-00003.gguf, first-00002-of-00003.gguf"):
        find_shards(odd)
    shards[1].unlink()
    with pytest.raises(InvalidFileError, match=r"shard 2 of 3 is missing: expected .*m-00002-of-00003.gguf"):
        find_shards(shards[2])


def test_cli_inspect_and_validate(demo: Path) -> None:
    r = run_ember("inspect", demo, "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    expected = inspect_model(demo).to_dict()
    expected.pop("tensors")
    assert data == json.loads(json.dumps(expected))
    r = run_ember("inspect", demo, "--json", "--tensors")
    assert len(json.loads(r.stdout)["tensors"]) == 236
    r = run_ember("inspect", demo)
    assert r.returncode == 0 and "gemma3" in r.stdout and "Q4_K_M" in r.stdout and "32768" in r.stdout
    assert "Q8_0" in r.stdout  # the quantization table
    r = run_ember("validate", demo)
    assert r.returncode == 0 and r.stdout.startswith("OK: ") and "236 tensors" in r.stdout


def test_cli_errors_are_one_line(tmp_path: Path, demo: Path) -> None:
    text = tmp_path / "notes.gguf"
    text.write_text("hello, not a model\n")
    trunc = tmp_path / "trunc.gguf"
    with open(demo, "rb") as f:
        trunc.write_bytes(f.read(4_000_000))
    cases = [
        (["validate", tmp_path / "missing.gguf"], "no such file"),
        (["inspect", tmp_path], "is a directory"),
        (["validate", text], "not a GGUF file"),
        (["inspect", trunc], "truncated"),
        (["merge", trunc, tmp_path / "out.gguf"], "truncated"),
        (["merge", demo, tmp_path / "out.gguf"], "is not a split model"),
        (["split", demo, tmp_path / "x", "--max-size", "2G", "--max-tensors", "4"], "not both"),
        (["split", demo, tmp_path / "x", "--max-size", "lots"], "invalid size"),
    ]
    for args, needle in cases:
        r = run_ember(*args)
        assert r.returncode == 1, (args, r.stdout, r.stderr)
        assert "Traceback" not in r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: ") and needle in lines[0], (args, r.stderr)
    assert not (tmp_path / "out.gguf").exists()
