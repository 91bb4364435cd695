"""ember.quantize: every llama.cpp quant type from a tiny f16 llama, checked
against llama.cpp's type-selection rules (re-derived below from
llama-quant.cpp's llama_tensor_get_type, independently of the code under
test), loaded and run in llama.cpp; options, imatrix, splits, errors, CLI."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cli_fixtures import run_ember
from quantize_fixtures import file_type, tensor_types, write_tiny_llama

from ember.errors import InvalidFileError, QuantizationError
from ember.ggml_types import find_ggml_type

q = importlib.import_module("ember.quantize")  # the submodule: ember.quantize is the API function
N_LAYER = 8
TOOLS = Path(__file__).resolve().parent.parent / "bench" / ".tools" / "bin"

# --------------------------------------------------------------------------
# llama.cpp's mix rules for a dense llama (no experts, not Falcon, not 70B),
# written from llama-quant.cpp as the expected answer.
# --------------------------------------------------------------------------
DEFAULT = {
    "Q4_0": "Q4_0", "Q4_1": "Q4_1", "Q5_0": "Q5_0", "Q5_1": "Q5_1", "Q8_0": "Q8_0", "F16": "F16",
    "BF16": "BF16", "F32": "F32", "Q1_0": "Q1_0", "Q2_0": "Q2_0", "MXFP4_MOE": "MXFP4",
    "Q2_K": "Q2_K", "Q2_K_S": "Q2_K", "IQ3_XS": "IQ3_S", "Q3_K_S": "Q3_K", "Q3_K_M": "Q3_K",
    "Q3_K_L": "Q3_K", "Q4_K_S": "Q4_K", "Q4_K_M": "Q4_K", "Q5_K_S": "Q5_K", "Q5_K_M": "Q5_K",
    "Q6_K": "Q6_K", "TQ1_0": "TQ1_0", "TQ2_0": "TQ2_0", "IQ2_XXS": "IQ2_XXS", "IQ2_XS": "IQ2_XS",
    "IQ2_S": "IQ2_XS", "IQ2_M": "IQ2_S", "IQ3_XXS": "IQ3_XXS", "IQ1_S": "IQ1_S", "IQ1_M": "IQ1_M",
    "IQ4_NL": "IQ4_NL", "IQ4_XS": "IQ4_XS", "IQ3_S": "IQ3_S", "IQ3_M": "IQ3_S",
}
LOW_IQ = {"IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M"}


def ggml_block_size(name: str) -> int:
    t = find_ggml_type(name)
    assert t is not None, name
    return t.block_size


def _order(names: list[str]) -> list[str]:
    def key(n: str) -> tuple[int, str]:
        layer = int(n.split(".")[1]) if n.startswith("blk.") else -1
        return (layer, n)

    return sorted(names, key=key)


def expected_types(shapes: dict[str, tuple[int, ...]], ft: str, *, n_gqa: int, has_imatrix: bool) -> dict[str, str]:
    """name -> type for the mix ``ft``; ``shapes`` in ggml order (ne0 first)."""
    out: dict[str, str] = {}
    if ft == "COPY":
        return {}
    default = DEFAULT[ft]
    quantized = default not in ("F16", "BF16", "F32")
    tied = "output.weight" not in shapes
    n_v = sum(1 for n in shapes if n.endswith("attn_v.weight"))
    i_v = i_down = i_gate = i_up = 0
    n_layer = N_LAYER

    def more_bits(i: int, n: int) -> bool:
        return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2

    for name in _order(list(shapes)):
        shape = shapes[name]
        if len(shape) < 2 or not name.endswith("weight") or "_norm.weight" in name:
            out[name] = "F32"
            continue
        if not quantized:
            out[name] = default
            continue
        t = default
        if name == "output.weight" or (tied and name == "token_embd.weight"):
            if ft == "MXFP4_MOE" or shape[0] % ggml_block_size(t):
                t = "Q8_0"
            elif ft in LOW_IQ or ft == "IQ3_XXS":
                t = "Q5_K"
            elif t != "Q8_0":
                t = "Q6_K"
        elif ft == "MXFP4_MOE":
            t = "Q8_0"
        elif name == "token_embd.weight":
            if ft in ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ1_M"):
                t = "Q2_K"
            elif ft in ("IQ2_S", "IQ2_M", "IQ3_XXS"):
                t = "IQ3_S"
            elif ft in ("TQ1_0", "TQ2_0", "Q2_0"):
                t = "Q4_K"
        elif ft in LOW_IQ:
            s_or_m = ft in ("IQ2_S", "IQ2_M")
            if "attn_v.weight" in name:
                t = "Q4_K" if n_gqa >= 4 else ("IQ3_S" if s_or_m else "Q2_K")
                i_v += 1
            elif "ffn_down" in name:
                if i_down < n_layer // 8:
                    t = "IQ3_S" if s_or_m else "Q2_K"
                i_down += 1
            elif "attn_output.weight" in name:
                if ft in ("IQ1_S", "IQ1_M"):
                    t = "IQ2_XXS"
                elif s_or_m:
                    t = "IQ3_S"
        elif "attn_v.weight" in name:
            if ft == "Q2_K":
                t = "Q4_K" if n_gqa >= 4 else "Q3_K"
            elif ft == "Q2_K_S" and n_gqa >= 4:
                t = "Q4_K"
            elif ft == "IQ3_XXS":
                t = "Q4_K" if n_gqa >= 4 else ("IQ3_XXS" if has_imatrix else "IQ3_S")
            elif ft in ("IQ3_XS", "IQ3_S") and n_gqa >= 4:
                t = "Q4_K"
            elif ft == "IQ3_M":
                t = "Q4_K"
            elif ft == "Q3_K_M":
                t = "Q5_K" if i_v < 2 else "Q4_K"
            elif ft == "Q3_K_L":
                t = "Q5_K"
            elif ft in ("IQ4_NL", "IQ4_XS") and n_gqa >= 4:
                t = "Q5_K"
            elif ft in ("Q4_K_M", "Q5_K_M") and more_bits(i_v, n_v):
                t = "Q6_K"
            elif ft == "Q4_K_S" and i_v < 4:
                t = "Q5_K"
            i_v += 1
        elif "attn_k.weight" in name or "attn_q.weight" in name:
            if ft == "IQ3_XS":
                t = "IQ3_XXS"
            elif ft == "IQ3_XXS":
                t = "IQ2_S"
        elif "ffn_down" in name:
            i, n = i_down, n_layer
            if ft == "Q2_K":
                t = "Q3_K"
            elif ft == "Q2_K_S":
                t = "Q4_K" if i < n // 8 else t
            elif ft == "IQ3_XXS" and not has_imatrix:
                t = "Q4_K" if i < n // 8 else "Q3_K"
            elif ft == "Q3_K_M":
                t = "Q5_K" if i < n // 16 else "Q4_K"
            elif ft == "IQ3_M" and i < n // 8:
                t = "Q4_K"
            elif ft == "Q3_K_L":
                t = "Q5_K"
            elif ft == "Q4_K_M":
                t = "Q6_K" if more_bits(i, n) else t
            elif i < n // 8 and ft in ("IQ4_NL", "IQ4_XS") and not has_imatrix:
                t = "Q5_K"
            elif ft == "Q5_K_M" and more_bits(i, n):
                t = "Q6_K"
            elif ft == "Q4_K_S" and i < n // 8:
                t = "Q5_K"
            elif ft in ("Q4_0", "Q5_0") and has_imatrix and i < n // 8:
                t = "Q4_1" if ft == "Q4_0" else "Q5_1"
            i_down += 1
        elif "attn_output.weight" in name:
            t = {"Q2_K": "Q3_K", "IQ3_XXS": "IQ3_S", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K", "IQ3_M": "Q4_K"}.get(ft, t)
        elif "ffn_gate" in name or "ffn_up" in name:
            i = i_gate if "ffn_gate" in name else i_up
            if ft == "IQ3_XS" and N_LAYER // 8 <= i < 7 * N_LAYER // 8:
                t = "IQ3_XXS"
            if "ffn_gate" in name:
                i_gate += 1
            else:
                i_up += 1
        out[name] = t
    return out


# --------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("quant")


@pytest.fixture(scope="module")
def tiny(work: Path) -> Path:
    path = work / "tiny-f16.gguf"
    write_tiny_llama(path, n_layer=N_LAYER, n_head=4, n_head_kv=2)
    return path


@pytest.fixture(scope="module")
def shapes(tiny: Path) -> dict[str, tuple[int, ...]]:
    from gguf import GGUFReader

    return {t.name: tuple(int(x) for x in t.shape) for t in GGUFReader(tiny).tensors}


def write_imatrix(path: Path, shapes: dict[str, tuple[int, ...]], seed: int = 1) -> dict[str, np.ndarray]:
    """An importance matrix in llama-imatrix's GGUF format for every 2-D
    weight; returns the normalised values llama-quantize would use."""
    import gguf

    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_type("imatrix")
    w.add_array("imatrix.datasets", ["test-data.txt"])
    w.add_uint32("imatrix.chunk_count", 3)
    w.add_uint32("imatrix.chunk_size", 512)
    expected = {}
    for name, shape in sorted(shapes.items()):
        if len(shape) < 2 or name == "token_embd.weight":
            continue
        sums = rng.uniform(0.5, 5.0, size=(1, shape[0])).astype(np.float32)
        w.add_tensor(name + ".in_sum2", sums)
        w.add_tensor(name + ".counts", np.array([[7.0]], dtype=np.float32))
        expected[name] = sums.reshape(-1) / 7.0
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


@pytest.fixture(scope="module")
def imatrix(work: Path, shapes: dict[str, tuple[int, ...]]) -> Path:
    path = work / "imatrix.gguf"
    write_imatrix(path, shapes)
    return path


def generate(path: Path, n: int = 4) -> list[int]:
    """Load in llama.cpp (the engine) and generate ``n`` tokens greedily."""
    from ember.engine import load_model

    m = load_model(path, {"num_thread": 1})  # tiny model: one thread beats a busy machine
    try:
        toks = m.tokenize("hello world", add_special=True)
        for _ in range(n):
            logits = m.logits(toks)
            assert np.isfinite(logits).all()
            toks.append(int(np.argmax(logits[-1])))
        return toks
    finally:
        m.close()


def no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.startswith(".") and ".tmp" in p.name]


# --------------------------------------------------------------------------
# names
# --------------------------------------------------------------------------


def test_parse_quant_type_names_aliases_and_numbers() -> None:
    assert q.parse_quant_type("q4_k_m") == "Q4_K_M"
    assert q.parse_quant_type("Q4_K") == "Q4_K_M"  # llama.cpp's alias
    assert q.parse_quant_type("q3_k") == "Q3_K_M"
    assert q.parse_quant_type("q5-k") == "Q5_K_M"
    assert q.parse_quant_type("fp16") == "F16"
    assert q.parse_quant_type("f32") == "F32"
    assert q.parse_quant_type("bf16") == "BF16"
    assert q.parse_quant_type("15") == "Q4_K_M"  # ftype numbers like llama-quantize
    assert q.parse_quant_type("iq2_xxs") == "IQ2_XXS"
    with pytest.raises(QuantizationError) as e:
        q.parse_quant_type("q4_z")
    assert "Q4_K_M" in str(e.value) and "q4_z" in str(e.value)


def test_type_names_load_without_llama_cpp() -> None:
    """The CLI, the converter and the registry check type names at start-up;
    llama.cpp loads only when a quantization function is first used."""
    code = (
        "import importlib, sys; q = importlib.import_module('ember.quantize'); q.parse_quant_type('q4_k');"
        "import ember.options; assert 'llama_cpp' not in sys.modules, 'loaded early';"
        "import ember; assert callable(q.quantize_model) and 'llama_cpp' in sys.modules and callable(ember.quantize)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_table_matches_llama_cpp_ftypes() -> None:
    import llama_cpp as lc

    for name, t in q.QUANT_TYPES.items():
        if name == "COPY":
            continue
        assert getattr(lc, f"LLAMA_FTYPE_MOSTLY_{name}", None) == t.ftype or (name == "F32" and t.ftype == lc.LLAMA_FTYPE_ALL_F32), name
        assert t.description and t.bits_per_weight > 0
        assert t.tensor_type == DEFAULT[name], name  # the type llama.cpp's mix gives most tensors
        main = find_ggml_type(t.tensor_type)
        assert main is not None and main.quantize_target


# --------------------------------------------------------------------------
# every type
# --------------------------------------------------------------------------

PLAIN = [n for n, t in q.QUANT_TYPES.items() if not t.needs_imatrix]
NEEDS_IMATRIX = [n for n, t in q.QUANT_TYPES.items() if t.needs_imatrix]


def _check_output(out: Path, src: Path, name: str, shapes: dict[str, tuple[int, ...]], *, has_imatrix: bool) -> None:
    ftype = q.QUANT_TYPES[name].ftype if name != "COPY" else 1
    if name == "Q2_0":
        # gguf-py 0.19 (and so ember's validator) does not know Q2_0 tensors yet:
        # check the file type and run it through llama.cpp directly.
        import llama_cpp as lc

        from ember.engine.llama import ensure_backend

        ensure_backend()
        m = lc.llama_model_load_from_file(str(out).encode(), lc.llama_model_default_params())
        assert m
        try:
            assert lc.llama_model_ftype(m) == ftype
        finally:
            lc.llama_model_free(m)
        llm = lc.Llama(str(out), n_ctx=64, verbose=False, logits_all=True)
        toks = llm.tokenize(b"hello world")
        llm.eval(toks)
        assert np.isfinite(np.asarray(llm.scores[: len(toks)])).all()
        del llm
        return
    assert file_type(out) == ftype
    if True:
        got = tensor_types(out)
        if name == "COPY":
            assert got == tensor_types(src)
        else:
            want = expected_types(shapes, name, n_gqa=2, has_imatrix=has_imatrix)
            assert got == want, {k: (got[k], want[k]) for k in got if got[k] != want[k]}
    # llama.cpp's own dry run plans the same types as it then writes.
    if name != "COPY":
        plan = q.plan_quantization(src, name, has_imatrix=has_imatrix)
        assert {t.name: t.target_type for t in plan.tensors} == tensor_types(out)
        estimate = q.model_file_size_estimate(src, plan)
        assert abs(estimate - out.stat().st_size) / out.stat().st_size < 0.01
    toks = generate(out)
    assert len(toks) > 4


@pytest.mark.parametrize("name", PLAIN)
def test_every_type_without_imatrix(name: str, tiny: Path, work: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    out = work / f"plain-{name}.gguf"
    files = q.quantize_model(tiny, out, name, nthread=1)
    assert files == [out]
    assert out.stat().st_mode & 0o044 == 0o044 or os.umask(os.umask(0)) & 0o044  # readable like any new file
    _check_output(out, tiny, name, shapes, has_imatrix=False)
    assert no_temp_files(work)


@pytest.mark.parametrize("name", NEEDS_IMATRIX)
def test_imatrix_types_refused_without_imatrix(name: str, tiny: Path, work: Path) -> None:
    out = work / f"noim-{name}.gguf"
    with pytest.raises(QuantizationError) as e:
        q.quantize_model(tiny, out, name)
    assert "--imatrix" in str(e.value) and "importance matrix" in str(e.value)
    assert not out.exists() and no_temp_files(work)


@pytest.mark.parametrize("name", NEEDS_IMATRIX + ["Q4_0", "IQ4_XS"])
def test_types_with_imatrix(name: str, tiny: Path, work: Path, imatrix: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    out = work / f"im-{name}.gguf"
    q.quantize_model(tiny, out, name, imatrix=imatrix, nthread=1)
    _check_output(out, tiny, name, shapes, has_imatrix=True)
    from gguf import GGUFReader

    r = GGUFReader(out)
    assert r.get_field("quantize.imatrix.file").contents() == str(imatrix)
    assert r.get_field("quantize.imatrix.dataset").contents() == "test-data.txt"
    assert r.get_field("quantize.imatrix.chunks_count").contents() == 3


def test_imatrix_loading_gguf_and_legacy_agree(work: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    expected = write_imatrix(work / "im2.gguf", shapes, seed=5)
    im = q.load_imatrix(work / "im2.gguf")
    assert set(im.data) == set(expected)
    for k, v in expected.items():
        np.testing.assert_allclose(im.data[k], v, rtol=1e-6)
    assert im.datasets == ["test-data.txt"] and im.chunk_count == 3
    # legacy .dat: n_entries, then (len, name, ncall, nval, values), then chunks + dataset
    raw = bytearray(np.int32(len(expected)).tobytes())
    for k, v in expected.items():
        raw += np.int32(len(k)).tobytes() + k.encode() + np.int32(4).tobytes() + np.int32(v.size).tobytes()
        raw += (v * 4).astype("<f4").tobytes()
    raw += np.int32(9).tobytes() + np.int32(4).tobytes() + b"data"
    (work / "im.dat").write_bytes(bytes(raw))
    leg = q.load_imatrix(work / "im.dat")
    assert leg.chunk_count == 9 and leg.datasets == ["data"]
    for k, v in expected.items():
        np.testing.assert_allclose(leg.data[k], v, rtol=1e-6)
    (work / "bad.dat").write_bytes(b"\x00\x00")
    with pytest.raises(InvalidFileError):
        q.load_imatrix(work / "bad.dat")


# --------------------------------------------------------------------------
# options
# --------------------------------------------------------------------------


def test_type_overrides_pure_and_leave_output(tiny: Path, work: Path) -> None:
    out = work / "over.gguf"
    q.quantize_model(
        tiny, out, "Q4_K_M", output_tensor_type="q8_0", token_embedding_type="F16",
        tensor_types={"attn_v": "q5_0", r"blk\.1\.ffn_up": "IQ4_NL"},
    )
    t = tensor_types(out)
    assert t["output.weight"] == "Q8_0" and t["token_embd.weight"] == "F16"
    assert all(t[f"blk.{i}.attn_v.weight"] == "Q5_0" for i in range(N_LAYER))
    assert t["blk.1.ffn_up.weight"] == "IQ4_NL" and t["blk.2.ffn_up.weight"] == "Q4_K"
    generate(out, 2)

    pure = work / "pure.gguf"
    q.quantize_model(tiny, pure, "Q4_K_M", pure=True)
    t = tensor_types(pure)
    assert {v for k, v in t.items() if "norm" not in k} == {"Q4_K"}

    leave = work / "leave.gguf"
    q.quantize_model(tiny, leave, "Q4_0", leave_output_tensor=True)
    assert tensor_types(leave)["output.weight"] == "F16"

    with pytest.raises(QuantizationError, match="unknown tensor type"):
        q.quantize_model(tiny, work / "x.gguf", "Q4_0", tensor_types={"attn_v": "q7"})
    with pytest.raises(QuantizationError, match="bad pattern"):
        q.quantize_model(tiny, work / "x.gguf", "Q4_0", tensor_types={"attn_v(": "q8_0"})


def test_requantize_needs_permission(tiny: Path, work: Path) -> None:
    q8 = work / "rq-q8.gguf"
    q.quantize_model(tiny, q8, "Q8_0")
    with pytest.raises(QuantizationError, match="--allow-requantize"):
        q.quantize_model(q8, work / "rq-q4.gguf", "Q4_K_M")
    assert not (work / "rq-q4.gguf").exists()
    q.quantize_model(q8, work / "rq-q4.gguf", "Q4_K_M", allow_requantize=True)
    assert tensor_types(work / "rq-q4.gguf")["blk.1.attn_q.weight"] == "Q4_K"


def test_progress_counts_tensors(tiny: Path, work: Path) -> None:
    seen: list[tuple[int, int]] = []
    q.quantize_model(tiny, work / "prog.gguf", "Q5_K_M", progress=lambda d, c, t: seen.append((c, t)))
    n = len(tensor_types(tiny))
    assert seen[-1] == (n, n)
    assert all(t == n for _, t in seen) and [c for c, _ in seen] == sorted(c for c, _ in seen)


def test_bad_inputs(tiny: Path, work: Path) -> None:
    with pytest.raises(InvalidFileError):
        q.quantize_model(work / "missing.gguf", work / "o.gguf", "Q4_0")
    junk = work / "junk.gguf"
    junk.write_bytes(b"GGUF" + os.urandom(64))
    with pytest.raises(InvalidFileError):
        q.quantize_model(junk, work / "o.gguf", "Q4_0")
    with pytest.raises(QuantizationError, match="unknown quantization type"):
        q.quantize_model(tiny, work / "o.gguf", "Q3")
    with pytest.raises(InvalidFileError):
        q.quantize_model(tiny, work / "o.gguf", "IQ2_XXS", imatrix=work / "nope.dat")
    with pytest.raises(QuantizationError, match="cannot write"):
        q.quantize_model(tiny, tiny / "o.gguf", "Q4_0")  # parent is a file
    assert not (work / "o.gguf").exists() and no_temp_files(work)


def test_split_input_and_keep_split(tiny: Path, work: Path) -> None:
    from ember.gguf.split import split_model

    folder = work / "split"
    folder.mkdir()
    shards = split_model(tiny, folder / "tiny", max_tensors=40)
    shards = sorted(Path(p) for p in shards)
    assert len(shards) == 2
    one = q.quantize_model(shards[1], folder / "joined-q4.gguf", "Q4_K_M")  # any shard finds the rest
    assert one == [folder / "joined-q4.gguf"]
    generate(one[0], 2)
    kept = q.quantize_model(shards[0], folder / "kept-q4.gguf", "Q4_K_M", keep_split=True)
    assert [p.name for p in kept] == ["kept-q4-00001-of-00002.gguf", "kept-q4-00002-of-00002.gguf"]
    generate(kept[0], 2)
    merged_types = {**tensor_types(kept[0]), **tensor_types(kept[1])}
    assert merged_types == tensor_types(one[0])
    assert no_temp_files(folder)


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------


def _ember(*args: str) -> subprocess.CompletedProcess[str]:
    return run_ember(*args, timeout=120)


def test_cli_quantize_and_list(tiny: Path, work: Path) -> None:
    r = _ember("quantize", str(tiny), str(work / "cli.gguf"), "q4_k", "--tensor-type", "attn_q=q8_0", "-t", "2")
    assert r.returncode == 0, r.stderr
    assert tensor_types(work / "cli.gguf")["blk.0.attn_q.weight"] == "Q8_0"
    r = _ember("quantize", str(tiny), str(work / "cli2.gguf"), "IQ2_XXS")
    assert r.returncode == 1 and r.stderr.startswith("Error:") and "--imatrix" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = _ember("quantize", "--list", str(tiny))
    assert r.returncode == 0, r.stderr
    assert "Q4_K_M" in r.stdout and "IQ2_XXS" in r.stdout and "MB" in r.stdout


# --------------------------------------------------------------------------
# llama.cpp's own tool (built by bench/build_llama_tools.sh)
# --------------------------------------------------------------------------


@pytest.mark.skipif(not (TOOLS / "llama-quantize").exists(), reason="bench/.tools/bin/llama-quantize not built")
@pytest.mark.parametrize("name", ["Q4_K_M", "Q5_K_M", "Q3_K_S", "Q2_K", "Q8_0", "IQ4_XS", "TQ1_0", "IQ2_XXS"])
def test_same_bytes_as_llama_quantize(name: str, tiny: Path, work: Path, imatrix: Path) -> None:
    ours, theirs = work / f"ours-{name}.gguf", work / f"theirs-{name}.gguf"
    extra = ["--imatrix", str(imatrix)] if q.QUANT_TYPES[name].needs_imatrix else []
    q.quantize_model(tiny, ours, name, imatrix=imatrix if extra else None, nthread=2)
    r = subprocess.run([str(TOOLS / "llama-quantize"), *extra, str(tiny), str(theirs), name, "2"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert tensor_types(ours) == tensor_types(theirs)
    assert ours.read_bytes() == theirs.read_bytes()


# --------------------------------------------------------------------------
# recommend
# --------------------------------------------------------------------------


def test_recommend_fits_memory(tiny: Path, work: Path) -> None:
    import json

    from ember.engine import load_model
    from ember.gguf import read_model

    kv, compute = q.kv_and_compute(read_model(tiny)[0], 2048)
    m = load_model(tiny, {"num_thread": 1})
    try:
        ctx = m.new_context(2048)
        assert ctx.buffers["CPU KV"] == kv  # the engine allocates exactly this
        assert 0.5 < compute / ctx.buffers["CPU compute"] < 2.0  # an estimate
        ctx.close()
    finally:
        m.close()
    roomy = q.recommend(tiny, 10**9, num_ctx=2048)
    assert roomy.choice is not None and roomy.choice.qtype == "F16"
    q8 = next(r for r in roomy.rows if r.qtype == "Q8_0")
    plan = q.plan_quantization(tiny, "Q8_0")
    assert q8.weights == q.model_file_size_estimate(tiny, plan)
    # a budget between Q4_K_M's and Q5_K_M's totals picks Q4_K_M
    rows = {r.qtype: r for r in roomy.rows}
    budget = (rows["Q4_K_M"].total + rows["Q5_K_S"].total) // 2
    assert q.recommend(tiny, budget, num_ctx=2048).choice.qtype == "Q4_K_M"
    assert q.recommend(tiny, 1000, num_ctx=2048).choice is None
    # measured numbers replace the published ones
    qf = work / "quality.json"
    qf.write_text(json.dumps({"types": {"Q8_0": {"kld": 0.001, "ppl": 10.0, "ppl_base": 9.9}, "Q4_K_M": {"kld": 0.02}}}))
    rec = q.recommend(tiny, 10**9, num_ctx=2048, quality_file=qf)
    assert [r.qtype for r in rec.rows] == ["Q8_0", "Q4_K_M"]
    assert "KLD 0.0010" in rec.rows[0].quality and "measured" in rec.quality_source
    r = _ember("quantize", "--recommend", str(tiny), "--memory", "1G", "--num-ctx", "2048")
    assert r.returncode == 0 and "recommended: F16" in r.stdout
    # registry names work like files (demo: the bundled model, already Q4_K_M)
    r = _ember("quantize", "--recommend", "demo", "--memory", "2G")
    assert r.returncode == 0 and "recommended: Q4_K_M" in r.stdout, r.stderr
    r = _ember("quantize", "--recommend", "no-such-model", "--memory", "2G")
    assert r.returncode == 1 and "not found" in r.stderr and "Traceback" not in r.stderr


def test_recommend_on_quantized_source_only_offers_smaller(work: Path, tiny: Path) -> None:
    src = work / "rec-q4km.gguf"
    q.quantize_model(tiny, src, "Q4_K_M", nthread=1)
    rec = q.recommend(src, 10**9, num_ctx=512)
    assert rec.rows[0].qtype == "Q4_K_M" and "as it is" in rec.rows[0].quality
    assert rec.choice.qtype == "Q4_K_M"
    assert all(r.weights < rec.rows[0].weights for r in rec.rows[1:])


def test_plan_reproduces_the_demo_models_own_mix() -> None:
    """The demo file was made by llama-quantize Q4_K_M (tied 262k embeddings,
    640-wide rows): llama.cpp's dry run through Ember plans exactly its types."""
    from ember.demo import demo_model_path
    from ember.gguf import read_model

    demo = demo_model_path()
    actual = {t.name: t.type.name for t in read_model(demo)[0].tensors}
    plan = q.plan_quantization(demo, "Q4_K_M")
    assert {t.name: t.target_type for t in plan.tensors} == actual
    assert actual["token_embd.weight"] == "Q8_0"  # Q6_K does not fit 640-wide rows
    assert abs(q.model_file_size_estimate(demo, plan) - demo.stat().st_size) / demo.stat().st_size < 0.001


# --------------------------------------------------------------------------
# importance matrix from text
# --------------------------------------------------------------------------


def test_compute_imatrix_matches_numpy_and_enables_iq_types(work: Path) -> None:
    path = work / "im-src.gguf"
    tensors = write_tiny_llama(path, n_layer=2, seed=4)
    text = work / "im-text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40, encoding="utf-8")
    r = q.compute_imatrix(path, text, work / "computed-imatrix.gguf", n_ctx=64, threads=1)
    im = q.load_imatrix(r.path)
    assert len(im.data) == 2 * 7 and im.chunk_count == r.n_chunks and im.datasets == ["im-text.txt"]
    # blk.0's attention input is rms_norm(embedding) * attn_norm: recompute it.
    from ember.engine import load_model

    m = load_model(path, {"num_thread": 1})
    toks = m.tokenize(text.read_text(encoding="utf-8"))
    m.close()
    emb = tensors["token_embd.weight"].astype(np.float16).astype(np.float64)
    g = tensors["blk.0.attn_norm.weight"].astype(np.float64)
    acc = np.zeros(emb.shape[1])
    for c in range(r.n_chunks):
        chunk = list(toks[c * 64 : (c + 1) * 64])
        chunk[0] = 1  # BOS
        x = emb[chunk]
        h = x / np.sqrt((x * x).mean(axis=1, keepdims=True) + 1e-5) * g
        acc += (h * h).sum(axis=0)
    want = acc / (64 * r.n_chunks)
    np.testing.assert_allclose(im.data["blk.0.attn_q.weight"], want, rtol=2e-3)
    np.testing.assert_allclose(im.data["blk.0.attn_k.weight"], want, rtol=2e-3)
    out = work / "iq2xxs-computed.gguf"
    q.quantize_model(path, out, "IQ2_XXS", imatrix=r.path, nthread=1)
    generate(out, 2)
    cli = _ember("imatrix", str(path), "--file", str(text), "-o", str(work / "cli-imatrix.gguf"), "--ctx", "64", "-t", "1")
    assert cli.returncode == 0, cli.stderr
    assert set(q.load_imatrix(work / "cli-imatrix.gguf").data) == set(im.data)


@pytest.mark.skipif(not (TOOLS / "llama-imatrix").exists(), reason="bench/.tools/bin/llama-imatrix not built")
def test_compute_imatrix_matches_llama_imatrix(work: Path) -> None:
    path = work / "im-cmp.gguf"
    write_tiny_llama(path, n_layer=2, seed=4)
    text = work / "im-cmp.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40, encoding="utf-8")
    ours = q.compute_imatrix(path, text, work / "ours-imatrix.gguf", n_ctx=64, threads=1)
    r = subprocess.run(
        [str(TOOLS / "llama-imatrix"), "-m", str(path), "-f", str(text), "-c", "64", "-o", str(work / "theirs-imatrix.gguf"), "-t", "1"],
        capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = q.load_imatrix(ours.path), q.load_imatrix(work / "theirs-imatrix.gguf")
    assert set(a.data) == set(b.data) and a.chunk_count == b.chunk_count
    for k in b.data:
        np.testing.assert_allclose(a.data[k], b.data[k], rtol=1e-3, atol=1e-3 * float(np.abs(b.data[k]).max()))
