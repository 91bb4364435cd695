"""`ember split` / `ember merge`: shards llama.cpp loads and generates the same
greedy tokens from, byte-identical round trips, llama.cpp's own shard layouts,
atomic outputs and flat memory."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

import gguf
import pytest
from cli_fixtures import EMBER, run_ember
from gguf_fixtures import llama_cpp_gguf_tables, write_tiny_gguf

from ember.demo import demo_model_path
from ember.errors import InvalidFileError
from ember.gguf import inspect_model, merge_model, plan_split, read_header, split_model, validate_model

ROOT = Path(__file__).resolve().parents[1]
GGUF_SPLIT = ROOT / "bench" / ".tools" / "bin" / "llama-gguf-split"
SPLIT_KEYS = [("split.no", 2), ("split.tensors.count", 5), ("split.count", 2)]  # u16, i32, u16


@pytest.fixture(scope="module")
def demo() -> Path:
    return demo_model_path()


@pytest.fixture()
def tiny(tmp_path: Path) -> Path:
    return write_tiny_gguf(tmp_path / "tiny.gguf")[0]


def greedy_tokens(path: Path, n: int = 8) -> list[int]:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=2, verbose=False)
    try:
        prompt = llm.tokenize(b"The capital of France is")
        out: list[int] = []
        for tok in llm.generate(prompt, temp=0.0, top_k=1):
            out.append(int(tok))
            if len(out) == n:
                break
        return out
    finally:
        llm.close()


def test_split_by_size_loads_in_llama_cpp_and_merges_back(tmp_path: Path, demo: Path) -> None:
    # Run `ember split` under a fresh interpreter whose only child it is, to read its peak RSS.
    measure = (
        "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); print(r.returncode); print(r.stderr[-2000:])"
    )
    out = subprocess.run(
        [sys.executable, "-c", measure, str(EMBER), "split", str(demo), str(tmp_path / "demo"), "--max-size", "100M"],
        capture_output=True, text=True, check=True,
    ).stdout.split("\n", 2)
    child_rss_kb, rc = int(out[0]), int(out[1])
    assert rc == 0, out[2]
    shards = [tmp_path / f"demo-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    assert sorted(tmp_path.iterdir()) == shards  # nothing else (no temporary files)
    # Streaming: the whole `ember` process (Python and its imports included)
    # stays far below the 253 MB model; llama-gguf-split itself peaks near 220 MB.
    assert child_rss_kb * 1024 < 0.5 * demo.stat().st_size, child_rss_kb

    original = llama_cpp_gguf_tables(demo)
    total = 0
    for i, s in enumerate(shards):
        ref = llama_cpp_gguf_tables(s)
        keys = [(k, t) for k, t, _ in ref["kv"]]
        # Shard 1 keeps every key in order; all shards end with llama-gguf-split's split keys.
        expected = [(k, t) for k, t, _ in original["kv"]] if i == 0 else []
        assert keys == expected + SPLIT_KEYS
        assert {k: v for k, _, v in ref["kv"] if k.startswith("split.")} == {
            "split.no": i, "split.count": 3, "split.tensors.count": 236,
        }
        padded = sum(-(-t[4] // 32) * 32 for t in ref["tensors"])
        assert padded <= 100_000_000 or len(ref["tensors"]) == 1
        total += len(ref["tensors"])
    assert total == 236
    assert validate_model(shards[1]) == shards
    info = inspect_model(shards[2])
    whole = inspect_model(demo)
    assert info.split_count == 3 and info.split_files == [str(s) for s in shards]
    assert (info.parameter_count, info.quant_types, info.architecture) == (
        whole.parameter_count, whole.quant_types, whole.architecture,
    )

    # llama.cpp finds the other shards from the first and generates the same tokens.
    assert greedy_tokens(shards[0]) == greedy_tokens(demo)

    r = run_ember("merge", shards[1], tmp_path / "merged.gguf")
    assert r.returncode == 0, r.stderr
    assert filecmp.cmp(tmp_path / "merged.gguf", demo, shallow=False)


def test_split_by_tensor_count_no_tensor_first_split(tmp_path: Path, tiny: Path) -> None:
    plans = plan_split(tiny, tmp_path / "t", max_tensors=3, no_tensor_first_split=True)
    assert [len(p.tensors) for p in plans] == [0, 3, 3, 1]
    assert split_model(tiny, tmp_path / "t", max_tensors=3, no_tensor_first_split=True, dry_run=True) == [
        p.path for p in plans
    ]
    assert list(tmp_path.iterdir()) == [tiny]  # dry run writes nothing
    seen: list[tuple[str, int, int]] = []
    shards = split_model(
        tiny, tmp_path / "t.gguf", max_tensors=3, no_tensor_first_split=True,
        progress=lambda d, c, t: seen.append((d, c, t)),
    )
    assert [s.name for s in shards] == [f"t-0000{i}-of-00004.gguf" for i in (1, 2, 3, 4)]
    assert [len(read_header(s).tensors) for s in shards] == [0, 3, 3, 1]
    total = sum(t.nbytes for t in read_header(tiny).tensors)
    assert seen[-1][1:] == (total, total) and all(c <= t for _, c, t in seen)
    assert inspect_model(shards[3]).parameter_count == inspect_model(tiny).parameter_count
    out = merge_model(shards[2], tmp_path / "merged.gguf")
    assert filecmp.cmp(out, tiny, shallow=False)
    # Any shard of a split model can be split again (the whole model is re-split).
    again = split_model(shards[1], tmp_path / "again", max_tensors=4)
    assert [len(read_header(s).tensors) for s in again] == [4, 3]
    assert filecmp.cmp(merge_model(again[1], tmp_path / "merged2.gguf"), tiny, shallow=False)
    r = run_ember("split", tiny, tmp_path / "dry", "--max-tensors", "5", "--dry-run")
    assert r.returncode == 0 and "dry-00001-of-00002.gguf" in r.stdout and "dry-00002-of-00002.gguf" in r.stdout
    assert not list(tmp_path.glob("dry*"))


def test_llama_cpp_python_split_layout_merges_and_inspects(tmp_path: Path) -> None:
    # gguf-py (llama.cpp's Python library) writes shards itself: its key order
    # differs from llama-gguf-split's, and small_first_shard is llama.cpp's
    # metadata-only first shard.
    unsplit = write_tiny_gguf(tmp_path / "one.gguf")[0]
    shards = write_tiny_gguf(tmp_path / "many.gguf", split_max_tensors=2, small_first_shard=True)
    assert [s.name for s in shards] == [f"many-0000{i}-of-00005.gguf" for i in (1, 2, 3, 4, 5)]
    info = inspect_model(shards[3])
    assert info.split_count == 5 and [e.shard for e in info.tensors] == [1, 1, 2, 2, 3, 3, 4]
    assert info.metadata["test.string"] == "héllo wörld"
    assert filecmp.cmp(merge_model(shards[0], tmp_path / "merged.gguf"), unsplit, shallow=False)
    r = run_ember("inspect", shards[4])
    assert r.returncode == 0 and "5 shards" in r.stdout


@pytest.mark.skipif(not GGUF_SPLIT.exists(), reason="bench/build_llama_tools.sh has not been run")
def test_same_bytes_as_llama_gguf_split(tmp_path: Path, demo: Path) -> None:
    theirs, ours = tmp_path / "theirs", tmp_path / "ours"
    theirs.mkdir()
    for args, kwargs in (
        (["--split-max-size", "100M"], {"max_size": 100_000_000}),
        (["--split-max-tensors", "100", "--no-tensor-first-split"], {"max_tensors": 100, "no_tensor_first_split": True}),
    ):
        for d in (theirs, ours):
            for f in d.glob("*") if d.exists() else []:
                f.unlink()
        subprocess.run([str(GGUF_SPLIT), "--split", *args, str(demo), str(theirs / "m")], check=True, capture_output=True)
        mine = split_model(demo, ours / "m", **kwargs)
        assert sorted(p.name for p in theirs.iterdir()) == [p.name for p in mine]
        for p in mine:
            assert filecmp.cmp(p, theirs / p.name, shallow=False), p.name
    # Their shards merge back into the original file.
    out = merge_model(theirs / "m-00001-of-00004.gguf", tmp_path / "merged.gguf")
    assert filecmp.cmp(out, demo, shallow=False)


def test_outputs_are_atomic(tmp_path: Path, tiny: Path) -> None:
    out = tmp_path / "out"

    def interrupt(description: str, completed: int, total: int) -> None:
        if completed > total // 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        split_model(tiny, out / "t", max_tensors=2, progress=interrupt)
    with pytest.raises(KeyboardInterrupt):
        merge_model(split_model(tiny, tmp_path / "s", max_tensors=4)[0], out / "m.gguf", progress=interrupt)
    assert list(out.iterdir()) == []  # neither finished shards nor temporary files


def test_refuses_to_overwrite_its_input(tmp_path: Path, tiny: Path) -> None:
    shards = split_model(tiny, tmp_path / "s", max_tensors=4)
    with pytest.raises(InvalidFileError, match="is one of the input files"):
        merge_model(shards[0], shards[1])
    assert validate_model(shards[0]) == shards
    r = run_ember("split", tiny, tmp_path / "x", "--max-tensors", "0")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "must be positive" in r.stderr
    assert gguf.GGUFReader(shards[1]).fields["split.count"].contents() == 2
