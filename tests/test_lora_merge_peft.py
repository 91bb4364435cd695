"""merge-lora end to end with real PEFT: a tiny transformers Llama and a random
PEFT LoRA (made here), converted by ember.convert; the merged GGUF, run
without any adapter, reproduces transformers+peft logits."""

from __future__ import annotations

from pathlib import Path

import peft
import pytest
import torch
import transformers
from convert_fixtures import cpp_logits, hf_logits, ids_for, llama_load, make_spm_tokenizer, rel_diff, torch_threads

from ember.convert import convert_lora, convert_model
from ember.lora_merge import merge_lora


@pytest.mark.parametrize("rslora", [False, True])
def test_merged_gguf_reproduces_peft(tmp_path: Path, rslora: bool) -> None:
    torch_threads()
    d = tmp_path / "base"
    d.mkdir()
    sp = make_spm_tokenizer(d)
    cfg = transformers.LlamaConfig(
        vocab_size=sp.vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.15, tie_word_embeddings=False,
    )
    cfg.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(21)
    transformers.LlamaForCausalLM(cfg).eval().save_pretrained(d)
    base_gguf = convert_model(d, tmp_path / "base-f32.gguf", outtype="f32")

    model = transformers.LlamaForCausalLM.from_pretrained(d, torch_dtype=torch.float32).eval()
    lcfg = peft.LoraConfig(
        r=8, lora_alpha=16, use_rslora=rslora, init_lora_weights=False,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    torch.manual_seed(5)
    pm = peft.get_peft_model(model, lcfg).eval()
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.2)
    pm.save_pretrained(tmp_path / "adapter")
    adapter = convert_lora(tmp_path / "adapter", base_gguf, tmp_path / "adapter.gguf", outtype="f32")

    merged = merge_lora(base_gguf, adapter, tmp_path / "merged.gguf")
    assert merged.n_merged == 2 * 7

    ids = ids_for(sp.vocab_size(), seed=3)
    ref = hf_logits(pm, ids)
    assert rel_diff(cpp_logits(llama_load(base_gguf), ids), ref) > 0.05  # the adapter matters
    got = cpp_logits(llama_load(tmp_path / "merged.gguf"), ids)
    assert rel_diff(got, ref) < 1e-3
