"""PEFT LoRA -> GGUF adapter: llama.cpp with the converted adapter reproduces
transformers+peft logits (plain LoRA with q/k permutation, rsLoRA with a
per-module rank pattern); DoRA and full embedding weights are refused."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import peft
import pytest
import torch
import transformers
from convert_fixtures import cpp_logits, hf_logits, ids_for, llama_load, make_spm_tokenizer, rel_diff, torch_threads

from ember.convert import convert_lora, convert_model
from ember.errors import ConversionError


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory):
    torch_threads()
    d = tmp_path_factory.mktemp("base")
    sp = make_spm_tokenizer(d)
    cfg = transformers.LlamaConfig(
        vocab_size=sp.vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.15, tie_word_embeddings=False,
    )
    cfg.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(10)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(d)
    g = convert_model(d, d.parent / "base-f32.gguf", outtype="f32")
    return d, g, sp.vocab_size()


def _adapter(base_dir: Path, out: Path, seed: int, **lora_kw):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32).eval()
    lcfg = peft.LoraConfig(init_lora_weights=False, **lora_kw)
    torch.manual_seed(seed)
    pm = peft.get_peft_model(model, lcfg).eval()
    with torch.no_grad():  # B non-zero and large enough to matter
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.2)
    pm.save_pretrained(out)
    return pm


@pytest.mark.parametrize("kind", ["lora", "rslora"])
def test_lora_matches_peft(base, tmp_path: Path, kind: str) -> None:
    d, g, n_vocab = base
    kw = dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"])
    if kind == "rslora":
        kw.update(use_rslora=True, rank_pattern={"down_proj": 4}, alpha_pattern={"o_proj": 4})
    pm = _adapter(d, tmp_path / "ad", seed=11, **kw)
    out = convert_lora(tmp_path / "ad", d if kind == "lora" else g, tmp_path / "ad.gguf", outtype="f32")
    r = gguf.GGUFReader(out)
    names = {t.name for t in r.tensors}
    assert "blk.0.attn_q.weight.lora_a" in names and "blk.1.ffn_down.weight.lora_b" in names
    assert bytes(r.fields["general.type"].parts[-1]).decode() == "adapter"
    ids = ids_for(n_vocab, seed=12)
    ref = hf_logits(pm, ids)
    base_logits = cpp_logits(llama_load(g), ids)
    assert rel_diff(base_logits, ref) > 0.05  # the adapter changes the model
    got = cpp_logits(llama_load(g, lora_path=str(out)), ids)
    assert rel_diff(got, ref) < 1e-3


def test_lora_refuses_dora_and_embeddings(base, tmp_path: Path) -> None:
    d, g, _ = base
    _adapter(d, tmp_path / "dora", seed=1, r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True)
    with pytest.raises(ConversionError, match="DoRA"):
        convert_lora(tmp_path / "dora", d, tmp_path / "x.gguf")
    _adapter(d, tmp_path / "emb", seed=1, r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"])
    with pytest.raises(ConversionError, match="full weight"):
        convert_lora(tmp_path / "emb", d, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()
    cfg = json.loads((tmp_path / "emb" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA"


def test_cli_convert_lora(base, tmp_path: Path) -> None:
    import subprocess
    import sys

    d, g, _ = base
    _adapter(d, tmp_path / "ad", seed=2, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    ok = subprocess.run([sys.executable, "-m", "ember.cli.main", "convert-lora", str(tmp_path / "ad"), "--base", str(g), "-o", str(tmp_path / "a.gguf")], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    r = gguf.GGUFReader(tmp_path / "a.gguf")
    assert float(r.fields["adapter.lora.alpha"].parts[-1][0]) == 8.0
    bad = subprocess.run([sys.executable, "-m", "ember.cli.main", "convert-lora", str(tmp_path), "--base", str(g)], capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.startswith("Error: ") and "adapter_config.json: missing" in bad.stderr and bad.stderr.count("\n") == 1
