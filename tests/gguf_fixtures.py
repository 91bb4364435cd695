"""Helpers for the GGUF tests: a tiny real GGUF written with gguf-py (every
value type, several tensor types), llama.cpp's own GGUF parser through
ctypes as an oracle, and the `ember` console script."""

from __future__ import annotations

import ctypes
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import gguf
import numpy as np


def write_tiny_gguf(path: Path, *, split_max_tensors: int = 0, small_first_shard: bool = False) -> list[Path]:
    """A small GGUF with keys of every value type and tensors of several types
    (float and quantized, some needing padding). With ``split_max_tensors``
    gguf-py writes llama.cpp-style shards; returns the written paths."""
    w = gguf.GGUFWriter(
        path, "llama", split_max_tensors=split_max_tensors, small_first_shard=small_first_shard
    )
    w.add_name("tiny test model")
    w.add_context_length(128)
    w.add_embedding_length(64)
    w.add_block_count(1)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_uint8("test.u8", 200)
    w.add_int8("test.i8", -5)
    w.add_uint16("test.u16", 60000)
    w.add_int16("test.i16", -30000)
    w.add_uint32("test.u32", 4_000_000_000)
    w.add_int32("test.i32", -2_000_000_000)
    w.add_float32("test.f32", 0.5)
    w.add_uint64("test.u64", 2**63 + 5)
    w.add_int64("test.i64", -(2**62))
    w.add_float64("test.f64", 3.141592653589793)
    w.add_bool("test.bool", True)
    w.add_string("test.string", "héllo wörld")
    w.add_array("test.arr_i32", [1, -2, 3])
    w.add_array("test.arr_f32", [0.25, 0.5])
    w.add_array("test.arr_bool", [True, False, True])
    w.add_array("test.arr_str", ["a", "bc", "déf"])
    w.add_key_value("test.arr_u16", [1, 2, 65535], gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.UINT16)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"tok{i}" for i in range(100)])
    w.add_token_scores([float(-i) for i in range(100)])
    w.add_chat_template("{% for m in messages %}{{ m.content }}{% endfor %}")
    rng = np.random.default_rng(0)
    w.add_tensor("token_embd.weight", rng.standard_normal((8, 64)).astype(np.float32))
    w.add_tensor("blk.0.attn_norm.weight", rng.standard_normal(64).astype(np.float32))
    w.add_tensor("blk.0.attn_q.weight", rng.standard_normal((4, 64)).astype(np.float16))
    w.add_tensor(
        "blk.0.attn_k.weight", rng.integers(0, 255, (2, 68), dtype=np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q8_0
    )
    w.add_tensor(
        "blk.0.ffn_up.weight", rng.integers(0, 255, (1, 144), dtype=np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q4_K
    )
    w.add_tensor("blk.0.ids", np.arange(5, dtype=np.int32))
    w.add_tensor("output_norm.weight", rng.standard_normal(3).astype(np.float32))
    paths = w.format_shard_names(Path(path))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return paths


_GGML: ctypes.CDLL | None = None


class _InitParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]


def _ggml() -> ctypes.CDLL:
    global _GGML
    if _GGML is None:
        import llama_cpp

        lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
        vp, i64 = ctypes.c_void_p, ctypes.c_int64
        sigs = {
            "gguf_init_from_file": (vp, [ctypes.c_char_p, _InitParams]),
            "gguf_free": (None, [vp]),
            "gguf_get_version": (ctypes.c_uint32, [vp]),
            "gguf_get_alignment": (ctypes.c_size_t, [vp]),
            "gguf_get_data_offset": (ctypes.c_size_t, [vp]),
            "gguf_get_n_kv": (i64, [vp]),
            "gguf_get_key": (ctypes.c_char_p, [vp, i64]),
            "gguf_get_kv_type": (ctypes.c_int, [vp, i64]),
            "gguf_get_arr_type": (ctypes.c_int, [vp, i64]),
            "gguf_get_arr_n": (ctypes.c_size_t, [vp, i64]),
            "gguf_get_val_data": (vp, [vp, i64]),
            "gguf_get_val_str": (ctypes.c_char_p, [vp, i64]),
            "gguf_get_n_tensors": (i64, [vp]),
            "gguf_get_tensor_name": (ctypes.c_char_p, [vp, i64]),
            "gguf_get_tensor_type": (ctypes.c_int, [vp, i64]),
            "gguf_get_tensor_offset": (ctypes.c_size_t, [vp, i64]),
            "gguf_get_tensor_size": (ctypes.c_size_t, [vp, i64]),
            "gguf_get_tensor_ne": (ctypes.POINTER(ctypes.c_int64), [vp, i64]),
        }
        for name, (res, args) in sigs.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = res, args
        _GGML = lib
    return _GGML


def llama_cpp_gguf_ok(path: Path) -> bool:
    """Whether llama.cpp's own GGUF parser (ggml's gguf_init_from_file) accepts
    the file's header and tables."""
    lib = _ggml()
    ctx = lib.gguf_init_from_file(str(path).encode(), _InitParams(True, None))
    if not ctx:
        return False
    lib.gguf_free(ctx)
    return True


_CTYPES = {0: ctypes.c_uint8, 1: ctypes.c_int8, 2: ctypes.c_uint16, 3: ctypes.c_int16, 4: ctypes.c_uint32,
           5: ctypes.c_int32, 6: ctypes.c_float, 7: ctypes.c_bool, 10: ctypes.c_uint64, 11: ctypes.c_int64,
           12: ctypes.c_double}


def llama_cpp_gguf_tables(path: Path) -> dict[str, Any]:
    """The header as llama.cpp's parser reads it: keys (name, type, scalar value
    or (element type, length) for arrays) and tensors (name, type, ne, offset, size)."""
    lib = _ggml()
    ctx = lib.gguf_init_from_file(str(path).encode(), _InitParams(True, None))
    assert ctx, f"llama.cpp cannot parse {path}"
    try:
        kv = []
        for i in range(lib.gguf_get_n_kv(ctx)):
            key = lib.gguf_get_key(ctx, i).decode()
            t = lib.gguf_get_kv_type(ctx, i)
            if t == 9:
                value: Any = (lib.gguf_get_arr_type(ctx, i), lib.gguf_get_arr_n(ctx, i))
            elif t == 8:
                value = lib.gguf_get_val_str(ctx, i).decode()
            else:
                value = ctypes.cast(lib.gguf_get_val_data(ctx, i), ctypes.POINTER(_CTYPES[t]))[0]
            kv.append((key, t, value))
        tensors = []
        for i in range(lib.gguf_get_n_tensors(ctx)):
            ne = lib.gguf_get_tensor_ne(ctx, i)
            tensors.append((
                lib.gguf_get_tensor_name(ctx, i).decode(), lib.gguf_get_tensor_type(ctx, i),
                [ne[d] for d in range(4)], lib.gguf_get_tensor_offset(ctx, i), lib.gguf_get_tensor_size(ctx, i),
            ))
        return {
            "version": lib.gguf_get_version(ctx), "alignment": lib.gguf_get_alignment(ctx),
            "data_offset": lib.gguf_get_data_offset(ctx), "kv": kv, "tensors": tensors,
        }
    finally:
        lib.gguf_free(ctx)


_VALUE_FORMATS = {
    gguf.GGUFValueType.UINT8: "<B", gguf.GGUFValueType.INT8: "<b", gguf.GGUFValueType.UINT16: "<H",
    gguf.GGUFValueType.INT16: "<h", gguf.GGUFValueType.UINT32: "<I", gguf.GGUFValueType.INT32: "<i",
    gguf.GGUFValueType.FLOAT32: "<f", gguf.GGUFValueType.BOOL: "<B", gguf.GGUFValueType.UINT64: "<Q",
    gguf.GGUFValueType.INT64: "<q", gguf.GGUFValueType.FLOAT64: "<d",
}


def _encode(vtype: gguf.GGUFValueType, value: Any) -> bytes:
    if vtype == gguf.GGUFValueType.STRING:
        raw = str(value).encode()
        return struct.pack("<Q", len(raw)) + raw
    return struct.pack(_VALUE_FORMATS[vtype], value)


def kv_record(key: str, vtype: gguf.GGUFValueType, value: Any, sub_type: gguf.GGUFValueType | None = None) -> bytes:
    """One key/value record as GGUF stores it (arrays: ``value`` is a list of ``sub_type``)."""
    name = key.encode()
    out = struct.pack("<Q", len(name)) + name + struct.pack("<I", vtype)
    if vtype == gguf.GGUFValueType.ARRAY:
        assert sub_type is not None
        return out + struct.pack("<IQ", sub_type, len(value)) + b"".join(_encode(sub_type, v) for v in value)
    return out + _encode(vtype, value)


class MetadataPatcher:
    """A copy of a GGUF model whose key/value records can be replaced in place.

    The copy carries one extra string key, a pad whose length absorbs any
    change in the size of the other records, so the tensor data never moves:
    each variant rewrites only the header (a few MB for a 262k-token
    vocabulary), not the whole file. Each write gets a new mtime, so cached
    validation results of the previous variant are not reused."""

    PAD_KEY = "ember.test.pad"

    def __init__(self, src: Path, dest: Path, slack: int = 512) -> None:
        from ember.gguf import read_header

        h = read_header(src)
        with open(src, "rb") as f:
            head = f.read(h.tensor_info_end)
        self.path = dest
        self.version = h.version
        self.n_tensors = len(h.tensors)
        self.records = {k: head[kv.offset : kv.end] for k, kv in h.kv.items()}
        self.tensor_info = head[h.tensors[0].info_offset : h.tensor_info_end]
        unpadded = 24 + sum(map(len, self.records.values())) + len(kv_record(self.PAD_KEY, gguf.GGUFValueType.STRING, ""))
        unpadded += len(self.tensor_info)
        self.data_offset = -(-(unpadded + slack) // h.alignment) * h.alignment
        self._mtime = 1_000_000_000 * 10**9
        with open(src, "rb") as f_in, open(dest, "wb") as f_out:
            f_out.write(self._header({}))
            f_in.seek(h.data_offset)
            while chunk := f_in.read(1 << 24):
                f_out.write(chunk)

    def _header(self, replace: dict[str, bytes]) -> bytes:
        records = [replace.get(k, r) for k, r in self.records.items()]
        records += [r for k, r in replace.items() if k not in self.records]
        fixed = 24 + sum(map(len, records)) + len(kv_record(self.PAD_KEY, gguf.GGUFValueType.STRING, "")) + len(self.tensor_info)
        pad = self.data_offset - fixed
        if pad < 0:
            raise ValueError(f"replacement records grew the header by more than the slack ({-pad} bytes)")
        head = struct.pack("<4sIQQ", b"GGUF", self.version, self.n_tensors, len(records) + 1)
        out = head + b"".join(records) + kv_record(self.PAD_KEY, gguf.GGUFValueType.STRING, "x" * pad) + self.tensor_info
        assert len(out) == self.data_offset
        return out

    def write(self, replace: dict[str, bytes]) -> Path:
        """Rewrite the header with ``replace`` (key -> new record, see
        kv_record; keys the file lacks are added)."""
        with open(self.path, "r+b") as f:
            f.write(self._header(replace))
        self._mtime += 1_000_000
        os.utime(self.path, ns=(self._mtime, self._mtime))
        return self.path


WORKER = Path(__file__).parent / "llama_worker.py"


class LlamaWorker:
    """tests/llama_worker.py in a child process: load a GGUF in llama.cpp and
    generate a few tokens. ``run`` answers "OK ...", "ERR ..." (llama.cpp
    refused cleanly), "ABORT <last stderr line>" (the process died: a
    GGML_ASSERT or a crash; a fresh child takes over) or "HANG"."""

    def __init__(self, timeout: float = 120) -> None:
        self.timeout = timeout
        self.proc: subprocess.Popen[str] | None = None

    def _start(self) -> subprocess.Popen[str]:
        import tempfile

        self.stderr = tempfile.TemporaryFile("w+")
        env = {**os.environ, "GGML_NO_BACKTRACE": "1"}  # no gdb session per abort
        proc = subprocess.Popen(
            [sys.executable, str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True, env=env
        )
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "READY"
        return proc

    def run(self, path: Path) -> str:
        import select

        if self.proc is None or self.proc.poll() is not None:
            self.proc = self._start()
        proc = self.proc
        assert proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(f"{path}\n")
            proc.stdin.flush()
        except BrokenPipeError:
            pass
        ready, _, _ = select.select([proc.stdout], [], [], self.timeout)
        if not ready:
            self.close()
            return "HANG"
        line = proc.stdout.readline().strip()
        if line:
            return line
        proc.wait()
        self.stderr.seek(0)
        lines = [ln for ln in self.stderr.read().splitlines() if ln.strip()]
        self.proc = None
        return "ABORT " + next((ln for ln in reversed(lines) if "GGML_" in ln), lines[-1] if lines else f"exit {proc.returncode}")

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


def rewrite_gguf(src: Path, dst: Path, *, arch: str | None = None, values: dict[str, tuple[gguf.GGUFValueType, Any]] | None = None) -> Path:
    """A copy of a small GGUF with its architecture renamed (every "<old>." key
    follows) and some keys set to (type, value) pairs (arrays: of str, float
    or uint32, after their first element)."""
    reader = gguf.GGUFReader(src)
    old = str(reader.fields["general.architecture"].contents())
    new = arch or old
    w = gguf.GGUFWriter(dst, new)
    values = dict(values or {})
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        name = new + field.name[len(old) :] if field.name.startswith(old + ".") else field.name
        if name in values:
            continue
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_key_value(name, field.contents(), vtype, sub_type=field.types[-1])
        else:
            w.add_key_value(name, field.contents(), vtype)
    for name, (vtype, value) in values.items():
        if vtype == gguf.GGUFValueType.ARRAY:
            sub = {str: gguf.GGUFValueType.STRING, float: gguf.GGUFValueType.FLOAT32}.get(type(value[0]), gguf.GGUFValueType.UINT32)
            w.add_key_value(name, value, vtype, sub_type=sub)
        else:
            w.add_key_value(name, value, vtype)
    for t in reader.tensors:
        w.add_tensor(t.name, t.data, raw_shape=list(reversed([int(x) for x in t.shape])), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst
