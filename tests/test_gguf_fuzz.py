"""Fuzz: hundreds of corrupted variants of real GGUF files (truncations, flipped
bytes, lying counts, lengths, types, shapes, offsets, alignment and split
metadata) through validate_model and inspect_model, and a sample through the
`ember` command. Zero crashes, zero tracebacks: every variant either passes
(and then llama.cpp's own parser accepts it too) or fails with a one-line
InvalidFileError naming the file."""

from __future__ import annotations

import random
import shutil
import struct
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cli_fixtures import run_ember
from gguf_fixtures import llama_cpp_gguf_ok, write_tiny_gguf

from ember.demo import demo_model_path
from ember.errors import InvalidFileError
from ember.gguf import inspect_model, read_header, split_model, validate_model

SEED = 20261122
U64 = struct.Struct("<Q")

Variant = tuple[str, bytes, bool]  # (description, file bytes, must be rejected)


def _put(data: bytes, offset: int, raw: bytes) -> bytes:
    return data[:offset] + raw + data[offset + len(raw) :]


def _variants(base: bytes, path: Path, rng: random.Random) -> Iterator[Variant]:
    h = read_header(path)
    size = len(base)
    data_end = h.data_offset + h.data_size
    # Truncations anywhere before the end of the last tensor's data.
    cuts = {0, 3, 4, 8, 16, 23, 24, h.tensor_info_end, h.data_offset, data_end - 1}
    cuts |= {rng.randrange(0, data_end) for _ in range(90)}
    for n in sorted(cuts):
        yield f"truncated to {n} bytes", base[:n], True
    # Random single-byte flips and runs of 0xFF in the header and tables.
    for _ in range(200):
        at = rng.randrange(0, h.tensor_info_end)
        yield f"byte {at} xor", _put(base, at, bytes([base[at] ^ rng.randrange(1, 256)])), False
    for _ in range(60):
        at = rng.randrange(0, h.tensor_info_end - 8)
        n = rng.randrange(2, 9)
        yield f"0xff x{n} at {at}", _put(base, at, b"\xff" * n), False
    # Magic and version.
    yield "bad magic", _put(base, 0, b"GGML"), True
    for v in (0, 1, 4, 0x03000000, 0xFFFFFFFF):
        yield f"version {v}", _put(base, 4, struct.pack("<I", v)), True
    # Lying tensor and key counts.
    for field, at, real in (("tensors", 8, len(h.tensors)), ("keys", 16, len(h.kv))):
        for v in (real + 1, real + 1000, 2**32, 2**63, 2**64 - 1, 10**6 + 1):
            yield f"{field} count {v}", _put(base, at, U64.pack(v)), True
    # Key names, value types, string lengths, array types and lengths.
    for kv in h.kv.values():
        yield f"key {kv.key} name length huge", _put(base, kv.offset, U64.pack(2**62)), True
        yield f"key {kv.key} name length past file", _put(base, kv.offset, U64.pack(size)), True
        type_at = kv.offset + 8 + len(kv.key.encode())
        yield f"key {kv.key} value type 13", _put(base, type_at, struct.pack("<I", 13)), True
        if kv.is_array:
            yield f"key {kv.key} array of arrays", _put(base, type_at + 4, struct.pack("<I", 9)), True
            yield f"key {kv.key} array length huge", _put(base, type_at + 8, U64.pack(2**61)), True
            yield f"key {kv.key} array length +1M", _put(base, type_at + 8, U64.pack(kv.count + 10**6)), True
        elif kv.type.name == "STRING":
            yield f"key {kv.key} string length past file", _put(base, kv.value_offset, U64.pack(size)), True
    # Tensor records: dimensions, shapes, types, offsets.
    for i, t in enumerate(h.tensors):
        name_len = len(t.name.encode())
        dims_at = t.info_offset + 8 + name_len
        shape_at = dims_at + 4
        type_at = shape_at + 8 * len(t.shape)
        off_at = type_at + 4
        yield f"{t.name} name length huge", _put(base, t.info_offset, U64.pack(2**40)), True
        for nd in (0, 5, 2**31):
            yield f"{t.name} n_dims {nd}", _put(base, dims_at, struct.pack("<I", nd)), True
        for ne in (0, -1, 2**62, 2**63 - 1):
            yield f"{t.name} ne0 {ne}", _put(base, shape_at, struct.pack("<q", ne)), True
        for code in (4, 5, 31, 42, 99, 2**31):
            yield f"{t.name} type {code}", _put(base, type_at, struct.pack("<I", code)), True
        for off in (t.offset + 1, t.offset + 32, 2**40, 2**64 - 32):
            yield f"{t.name} data offset {off}", _put(base, off_at, U64.pack(off)), True
        if i > 0:
            prev = h.tensors[i - 1].offset
            yield f"{t.name} overlaps previous", _put(base, off_at, U64.pack(prev)), True


def _aligned_variants(tmp: Path) -> Iterator[Variant]:
    """general.alignment = 64 (valid), then lies about it."""
    import gguf
    import numpy as np

    p = tmp / "aligned.gguf"
    w = gguf.GGUFWriter(p, "llama")
    w.add_custom_alignment(64)
    w.data_alignment = 64
    w.add_tensor("a", np.ones(3, dtype=np.float32))
    w.add_tensor("b", np.ones(40, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    base = p.read_bytes()
    h = read_header(p)
    assert h.alignment == 64 and h.tensors[1].offset == 64
    kv = h.kv["general.alignment"]
    yield "alignment 64 (valid)", base, False
    for a in (0, 3, 48, 2**31):
        yield f"alignment {a}", _put(base, kv.value_offset, struct.pack("<I", a)), True
    yield "alignment as u64", _put(base, kv.value_offset - 4, struct.pack("<I", 10)), True


def _check_error(e: InvalidFileError, where: Path) -> None:
    msg = str(e)
    assert "\n" not in msg and msg.startswith(str(where)), msg
    assert len(msg) < 400, msg


@pytest.mark.timeout(180)
def test_fuzz_validate_and_inspect(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    tiny = write_tiny_gguf(tmp_path / "tiny.gguf")[0]
    variants = list(_variants(tiny.read_bytes(), tiny, rng))
    variants += list(_aligned_variants(tmp_path))
    # A few variants of the demo model's header region in truncated copies.
    demo = demo_model_path()
    dh = read_header(demo)
    with open(demo, "rb") as f:
        head = f.read(dh.tensor_info_end + 4096)
    variants.append(("demo header only", head, True))
    for _ in range(12):
        at = rng.randrange(0, dh.tensor_info_end)
        variants.append((f"demo header byte {at} xor", _put(head, at, bytes([head[at] ^ 0x5A])), True))
    assert len(variants) >= 500

    fuzz = tmp_path / "fuzz"
    fuzz.mkdir()
    rejected = passed = 0
    samples: list[tuple[Path, bool]] = []
    for i, (what, data, must_fail) in enumerate(variants):
        p = fuzz / f"v{i:04d}.gguf"
        p.write_bytes(data)
        try:
            validate_model(p)
            info = inspect_model(p)
        except InvalidFileError as e:
            _check_error(e, p)
            rejected += 1
            ok = False
        else:
            assert not must_fail, f"{what}: accepted"
            # Whatever we accept, llama.cpp's own parser accepts too.
            assert llama_cpp_gguf_ok(p), f"{what}: we accept it, llama.cpp's gguf parser does not"
            assert info.parameter_count > 0
            passed += 1
            ok = True
        if i % 17 == 0:
            samples.append((p, ok))
    print(f"fuzz: {len(variants)} variants, {rejected} rejected, {passed} accepted")
    assert rejected >= 450 and passed >= 1

    # A sample through the real command line: one line on stderr, exit 1, no traceback.
    jobs = [("validate" if j % 2 == 0 else "inspect", p, ok) for j, (p, ok) in enumerate(samples[:30])]
    with ThreadPoolExecutor(max_workers=2) as pool:
        runs = list(pool.map(lambda job: run_ember(job[0], job[1]), jobs))
    assert len(runs) == 30
    for (_, p, ok), r in zip(jobs, runs):
        assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
        if ok:
            assert r.returncode == 0, r.stderr
        else:
            assert r.returncode == 1, (p, r.stdout, r.stderr)
            lines = r.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith(f"Error: {p}: "), r.stderr

    # The valid originals still pass.
    assert validate_model(tiny) == [tiny] and validate_model(demo) == [demo]
    assert llama_cpp_gguf_ok(tiny)


def _set_key(path: Path, key: str, raw: bytes) -> None:
    kv = read_header(path).kv[key]
    data = path.read_bytes()
    path.write_bytes(_put(data, kv.value_offset, raw))


def test_fuzz_split_metadata(tmp_path: Path) -> None:
    tiny = write_tiny_gguf(tmp_path / "tiny.gguf")[0]
    good = split_model(tiny, tmp_path / "good" / "m", max_tensors=3)
    names = [p.name for p in good]
    cases: list[tuple[str, int, str, bytes]] = []  # (what, shard, key, new raw value)
    for shard in range(3):
        for c in (0, 1, 2, 4, 65535):
            cases.append((f"shard {shard} split.count {c}", shard, "split.count", struct.pack("<H", c)))
        for n in (0, 1, 2, 3, 9):
            if n != shard:
                cases.append((f"shard {shard} split.no {n}", shard, "split.no", struct.pack("<H", n)))
        for t in (0, 6, 8, -1, 2**31 - 1):
            cases.append((f"shard {shard} split.tensors.count {t}", shard, "split.tensors.count", struct.pack("<i", t)))
    for k, (what, shard, key, raw) in enumerate(cases):
        d = tmp_path / f"case{k}"
        d.mkdir()
        for n in names:
            shutil.copy(tmp_path / "good" / n, d / n)
        _set_key(d / names[shard], key, raw)
        for entry in (d / names[0], d / names[2]):
            with pytest.raises(InvalidFileError) as e:
                validate_model(entry)
                inspect_model(entry)
            assert "\n" not in str(e.value) and str(e.value).startswith(str(d)), (what, str(e.value))
        r = run_ember("validate", d / names[1]) if k % 10 == 0 else None
        if r is not None:
            assert r.returncode == 1 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr
    # A missing shard, then a shard copied into the wrong place.
    d = tmp_path / "missing"
    shutil.copytree(tmp_path / "good", d)
    (d / names[1]).unlink()
    with pytest.raises(InvalidFileError, match="shard 2 of 3 is missing"):
        validate_model(d / names[0])
    shutil.copy(d / names[2], d / names[1])
    with pytest.raises(InvalidFileError, match="split.no is 2 but this file is shard 2 of 3"):
        inspect_model(d / names[2])
    assert validate_model(good[1]) == good
