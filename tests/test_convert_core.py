"""Converter core: plan then write, dry run, vocab-only, split output, one-step
quantization, a second output (a projector) beside the model, progress,
atomic output and one-line errors (CLI included)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers
from convert_fixtures import (
    LLAMA3_RE,
    SPECIALS_LLAMA3,
    cpp_logits,
    ids_for,
    llama_load,
    make_bpe_tokenizer,
    pad_vocab,
    torch_threads,
)

from ember.convert import architectures, convert_model, plan, write
from ember.convert.base import Model, Planned
from ember.convert.cast import BLOCK, write_tensor
from ember.convert.llama import LlamaModel
from ember.convert.source import BF16
from ember.errors import ConversionError, InvalidFileError, QuantizationError


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    torch_threads()
    d = tmp_path_factory.mktemp("tiny") / "Tiny-Llama"
    tok = make_bpe_tokenizer(d, LLAMA3_RE, SPECIALS_LLAMA3, bos="<|begin_of_text|>", eos="<|eot_id|>")
    cfg = transformers.LlamaConfig(
        vocab_size=pad_vocab(len(tok)), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.15,
    )
    cfg.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(d)
    return d, len(tok)


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_dry_run_writes_nothing(tiny, tmp_path: Path) -> None:
    d, _ = tiny
    out = convert_model(d, tmp_path, dry_run=True)
    assert out.parent == tmp_path and out.name == "Tiny-Llama-203K-BF16.gguf"  # auto: bf16 checkpoint -> BF16; 203,328 parameters
    assert list(tmp_path.iterdir()) == []


def test_plan_then_write(tiny, tmp_path: Path) -> None:
    d, n = tiny
    p = plan(d, outtype="q8_0")
    assert p.main.type_label == "Q8_0" and p.metadata.size_label == "203K"
    assert p.destinations(tmp_path) == [[tmp_path / "Tiny-Llama-203K-Q8_0.gguf"]]
    assert p.destinations(tmp_path / "m-{ftype}.gguf") == [[tmp_path / "m-q8_0.gguf"]]
    assert list(tmp_path.iterdir()) == []  # planning writes nothing
    assert write(p, tmp_path) == [tmp_path / "Tiny-Llama-203K-Q8_0.gguf"]
    assert np.isfinite(cpp_logits(llama_load(tmp_path / "Tiny-Llama-203K-Q8_0.gguf"), ids_for(n))).all()
    with pytest.raises(ValueError, match="written already"):
        write(p, tmp_path / "again.gguf")


def test_dry_run_checks_quantized_outtypes(tiny, tmp_path: Path) -> None:
    """A quantized --outtype plans the f16 model first: a dry run checks it all."""
    d = copy_model(tiny[0], tmp_path / "m")
    assert convert_model(d, tmp_path, outtype="q4_k_m", dry_run=True) == tmp_path / "M-203K-Q4_K_M.gguf"
    (d / "tokenizer.json").unlink()
    with pytest.raises(ConversionError, match="no tokenizer found"):
        convert_model(d, tmp_path, outtype="q4_k_m", dry_run=True)
    with pytest.raises(QuantizationError, match="unknown quantization type .q9_z."):
        convert_model(d, tmp_path, outtype="q9_z", dry_run=True)
    assert [f.name for f in tmp_path.iterdir()] == ["m"]


class _Projector(Model):
    """A stand-in vision projector made from the checkpoint's ``vision.*`` tensors."""

    gguf_arch = gguf.MODEL_ARCH.MMPROJ
    gguf_type = gguf.GGUFType.MMPROJ

    def skip(self, name: str) -> bool:
        return not name.startswith("vision.")

    def map_name(self, name: str) -> str:
        return "v." + name.removeprefix("vision.")

    def validate(self, plan: list[Planned]) -> None:
        pass

    def set_parameters(self, w: gguf.GGUFWriter) -> None:
        w.add_bool(gguf.Keys.Clip.HAS_VISION_ENCODER, True)

    def set_vocab(self, w: gguf.GGUFWriter) -> None:
        pass


class VisionLlama(LlamaModel):
    def skip(self, name: str) -> bool:
        return name.startswith("vision.") or super().skip(name)

    def companions(self) -> list[Model]:
        return [_Projector(self.model_dir, {"num_hidden_layers": 1}, self.config_file)]


def test_companion_output_beside_the_model(tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An architecture whose checkpoint holds a second model (a vision projector)
    gets a second GGUF, named after its general.type, from the same plan."""
    from safetensors.numpy import save_file

    d = copy_model(tiny[0], tmp_path / "vlm")
    save_file({"vision.patch_embd.weight": np.ones((64, 48), dtype=np.float32), "vision.post_ln.bias": np.zeros(64, dtype=np.float32)}, d / "model-vision.safetensors")
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["VisionLlamaForTest"]
    (d / "config.json").write_text(json.dumps(cfg))
    monkeypatch.setitem(architectures.ARCHITECTURES, "VisionLlamaForTest", f"{__name__}:VisionLlama")

    p = plan(d, outtype="f16")
    assert [len(o.tensors) for o in p.outputs] == [len(plan(tiny[0]).main.tensors), 2]
    assert p.destinations(tmp_path) == [[tmp_path / "Vlm-203K-F16.gguf"], [tmp_path / "mmproj-Vlm-203K-F16.gguf"]]
    model, projector = write(p, tmp_path / "out.gguf")
    assert (model, projector) == (tmp_path / "out.gguf", tmp_path / "mmproj-out.gguf")
    r = gguf.GGUFReader(projector)
    assert bytes(r.fields["general.type"].parts[-1]).decode() == "mmproj"
    assert bytes(r.fields["general.architecture"].parts[-1]).decode() == "clip"
    assert {t.name: t.tensor_type.name for t in r.tensors} == {"v.patch_embd.weight": "F16", "v.post_ln.bias": "F32"}
    assert np.array_equal(np.asarray(r.tensors[0].data, dtype=np.float32), np.ones((64, 48)))
    assert not any(t.name.startswith("v.") for t in gguf.GGUFReader(model).tensors)
    assert np.isfinite(cpp_logits(llama_load(model), ids_for(tiny[1]))).all()


def test_vocab_only(tiny, tmp_path: Path) -> None:
    d, _ = tiny
    out = convert_model(d, tmp_path / "v.gguf", vocab_only=True)
    r = gguf.GGUFReader(out)
    assert len(r.tensors) == 0
    assert "tokenizer.ggml.tokens" in r.fields
    llm = llama_load(out, vocab_only=True)
    assert llm.tokenize(b"hello world", add_bos=False)


def test_split_and_progress_and_templated_name(tiny, tmp_path: Path) -> None:
    d, n = tiny
    calls: list[tuple[str, int, int]] = []
    whole = convert_model(d, tmp_path / "whole.gguf", outtype="f32")
    first = convert_model(d, tmp_path / "m-{FTYPE}.gguf", outtype="f32", split_max_size=200_000, progress=lambda *a: calls.append(a))
    shards = sorted(tmp_path.glob("m-F32-*-of-*.gguf"))
    assert len(shards) >= 3 and first == shards[0]
    assert not list(tmp_path.glob(".*"))  # no temporary files left
    done = [c[1] for c in calls]
    assert done == sorted(done) and done[-1] == calls[-1][2] > 0
    ids = ids_for(n)
    a = cpp_logits(llama_load(whole), ids)
    b = cpp_logits(llama_load(first), ids)
    assert np.array_equal(a, b)


def test_outtype_q4_k_m_leaves_no_f16(tiny, tmp_path: Path) -> None:
    pytest.importorskip("ember.quantize")
    d, n = tiny
    out = convert_model(d, tmp_path, outtype="q4_k_m")
    assert out.name == "Tiny-Llama-203K-Q4_K_M.gguf"
    assert [p.name for p in tmp_path.iterdir()] == [out.name]
    r = gguf.GGUFReader(out)
    assert r.fields["general.file_type"].parts[-1][0] == gguf.LlamaFileType.MOSTLY_Q4_K_M
    llm = llama_load(out)
    assert np.isfinite(cpp_logits(llm, ids_for(n))).all()


def test_q8_0(tiny, tmp_path: Path) -> None:
    d, _ = tiny
    out = convert_model(d, tmp_path / "q8.gguf", outtype="q8_0")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(out).tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32


def test_bf16_passthrough_is_bit_exact(tiny, tmp_path: Path) -> None:
    from safetensors import safe_open

    d, _ = tiny
    out = convert_model(d, tmp_path / "b.gguf", outtype="bf16")
    r = {t.name: t for t in gguf.GGUFReader(out).tensors}
    with safe_open(d / "model.safetensors", "pt") as f:
        src = f.get_tensor("model.layers.1.mlp.up_proj.weight")
    got = np.asarray(r["blk.1.ffn_up.weight"].data).view(np.uint16).reshape(src.shape)
    assert np.array_equal(got, src.view(torch.int16).numpy().view(np.uint16))


# -- errors ------------------------------------------------------------------


def test_unsupported_architecture(tiny, tmp_path: Path) -> None:
    d = copy_model(tiny[0], tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["FalconForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match=r"config\.json: architecture 'FalconForCausalLM' is not supported; supported: .*LlamaForCausalLM"):
        convert_model(d, tmp_path / "o.gguf")


def test_missing_tokenizer(tiny, tmp_path: Path) -> None:
    d = copy_model(tiny[0], tmp_path / "m")
    (d / "tokenizer.json").unlink()
    with pytest.raises(ConversionError, match="no tokenizer found .*copy the tokenizer files"):
        convert_model(d, tmp_path / "o.gguf")
    assert not (tmp_path / "o.gguf").exists()


def test_truncated_safetensors(tiny, tmp_path: Path) -> None:
    d = copy_model(tiny[0], tmp_path / "m")
    st = d / "model.safetensors"
    with open(st, "r+b") as f:
        f.truncate(st.stat().st_size - 1000)
    with pytest.raises(InvalidFileError, match=r"model\.safetensors: truncated: tensor .* download it again"):
        convert_model(d, tmp_path / "o.gguf")
    assert list(tmp_path.glob("*.gguf")) == []


def test_inconsistent_config(tiny, tmp_path: Path) -> None:
    d = copy_model(tiny[0], tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_hidden_layers"] = 2
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match="num_hidden_layers is 2 but the checkpoint has layer 2"):
        convert_model(d, tmp_path / "o.gguf")
    cfg["num_hidden_layers"], cfg["hidden_size"] = 4, 128
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match="hidden_size is 128 but the token embedding has width 64"):
        convert_model(d, tmp_path / "o.gguf")


def test_cli_one_line_error_and_success(tiny, tmp_path: Path) -> None:
    d, _ = tiny
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    bad = subprocess.run([sys.executable, "-m", "ember.cli.main", "convert", str(tmp_path / "nope")], capture_output=True, text=True, env=env)
    assert bad.returncode == 1
    assert bad.stderr.count("\n") == 1 and bad.stderr.startswith("Error: ") and "not a directory" in bad.stderr
    ok = subprocess.run([sys.executable, "-m", "ember.cli.main", "convert", str(d), "--outtype", "f16", "-o", str(tmp_path / "x.gguf")], capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "x.gguf").is_file()
    assert "LlamaForCausalLM -> llama, 203K parameters in " in ok.stdout and f"wrote {tmp_path / 'x.gguf'}" in ok.stdout


def test_cli_dry_run_prints_the_plan(tiny, tmp_path: Path) -> None:
    d, _ = tiny
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "COLUMNS": "300"}
    r = subprocess.run([sys.executable, "-m", "ember.cli.main", "convert", str(d), "--outtype", "q4_k_m", "-o", str(tmp_path), "--dry-run"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("LlamaForCausalLM -> llama, 203K parameters in ") and "tokenizer gpt2 (llama-bpe)" in lines[0]
    assert lines[1].strip().startswith(f"{tmp_path / 'Tiny-Llama-203K-Q4_K_M.gguf'}: Q4_K_M, quantized by llama.cpp from ")
    assert lines[-1] == f"would write {tmp_path / 'Tiny-Llama-203K-Q4_K_M.gguf'}"
    assert list(tmp_path.iterdir()) == []


def test_bf16_to_f16_every_bit_pattern(tmp_path: Path) -> None:
    """The integer fast path equals a float32 round trip for all 65536 bf16
    values, written as the converter writes (staging blocks, two threads)."""
    words = np.tile(np.arange(65536, dtype=np.uint16), 4 * BLOCK // 65536 + 1)  # big enough for the two-thread path
    with np.errstate(over="ignore"):
        ref = np.left_shift(words, 16, dtype=np.uint32).view(np.float32).astype(np.float16)
    out = tmp_path / "f16.bin"
    with open(out, "wb") as f, ThreadPoolExecutor(1) as pool:
        f.write(b"\xee" * 7)  # data starts at an offset, as a tensor's does in a GGUF
        f.flush()
        write_tensor(words.view(BF16), gguf.GGMLQuantizationType.F16, f.fileno(), 7, pool)
    data = out.read_bytes()
    assert data[:7] == b"\xee" * 7
    assert np.array_equal(np.frombuffer(data[7:], dtype=np.uint16), ref.view(np.uint16))
