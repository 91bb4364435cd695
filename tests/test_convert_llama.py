"""Llama / Mistral conversion against transformers: logits, greedy
continuation and tokenizer parity for a BPE (Llama 3) and a SentencePiece
(Llama 2 / Mistral) tokenizer."""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest
import torch
import transformers
from convert_fixtures import (
    LLAMA3_RE,
    PARITY_TEXT,
    SPECIALS_LLAMA3,
    cpp_greedy,
    cpp_logits,
    hf_greedy,
    hf_logits,
    ids_for,
    llama_load,
    make_bpe_tokenizer,
    make_spm_tokenizer,
    pad_vocab,
    rel_diff,
    torch_threads,
)

from ember.convert import convert_model

CHAT = "{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n{{ m.content }}<|eot_id|>{% endfor %}"


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object, object]:
    torch_threads()
    d = tmp_path_factory.mktemp("llama3")
    tok = make_bpe_tokenizer(d, LLAMA3_RE, SPECIALS_LLAMA3, bos="<|begin_of_text|>", eos="<|eot_id|>", chat_template=CHAT)
    cfg = transformers.LlamaConfig(
        vocab_size=pad_vocab(len(tok)), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.15,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 32, "rope_theta": 500000.0},
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(d)
    (d / "README.md").write_text("---\nlicense: apache-2.0\nbase_model: meta-llama/Llama-3.2-1B\n---\n# Tiny\n")
    return d, model, tok


@pytest.mark.parametrize("outtype,tol", [("f32", 1e-3), ("f16", 2e-2)])
def test_llama3_logits(llama3_dir, tmp_path: Path, outtype: str, tol: float) -> None:
    d, model, tok = llama3_dir
    out = convert_model(d, tmp_path / f"m-{outtype}.gguf", outtype=outtype)
    llm = llama_load(out)
    ids = ids_for(len(tok))
    ref = hf_logits(model, ids)
    got = cpp_logits(llm, ids)
    assert rel_diff(got, ref) < tol
    if outtype == "f32":
        assert cpp_greedy(llm, ids[:8], 8) == hf_greedy(model, ids[:8], 8)
    r = gguf.GGUFReader(out)
    types = {t.name: t.tensor_type for t in r.tensors}
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert types["rope_freqs.weight"] == gguf.GGMLQuantizationType.F32
    assert types["blk.0.attn_q.weight"] == (gguf.GGMLQuantizationType.F32 if outtype == "f32" else gguf.GGMLQuantizationType.F16)


def test_llama3_tokenizer_and_metadata(llama3_dir, tmp_path: Path) -> None:
    d, model, tok = llama3_dir
    out = convert_model(d, tmp_path, outtype="f16")
    assert out.parent == tmp_path and out.name.endswith("-F16.gguf")
    llm = llama_load(out, vocab_only=True)
    for text in PARITY_TEXT:
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == tok.encode(text), text
    r = gguf.GGUFReader(out)
    kv = {f.name: f for f in r.fields.values()}

    def s(k: str) -> str:
        f = kv[k]
        return bytes(f.parts[f.data[0]]).decode()

    def i(k: str) -> int:
        f = kv[k]
        return int(f.parts[f.data[0]][0])

    assert s("tokenizer.ggml.pre") == "llama-bpe"
    assert s("general.license") == "apache-2.0"
    assert s("tokenizer.chat_template") == CHAT
    assert i("tokenizer.ggml.eos_token_id") == tok.convert_tokens_to_ids("<|eot_id|>")
    assert i("tokenizer.ggml.bos_token_id") == tok.convert_tokens_to_ids("<|begin_of_text|>")
    assert bool(kv["tokenizer.ggml.add_bos_token"].parts[-1][0]) is True


@pytest.fixture(scope="module")
def mistral_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object, object]:
    torch_threads()
    d = tmp_path_factory.mktemp("mistral")
    sp = make_spm_tokenizer(d)
    cfg = transformers.MistralConfig(
        vocab_size=sp.vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=256, initializer_range=0.15,
        sliding_window=None, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    torch.manual_seed(1)
    model = transformers.MistralForCausalLM(cfg).eval()
    model.save_pretrained(d)
    return d, model, sp


def test_mistral_spm(mistral_dir, tmp_path: Path) -> None:
    d, model, sp = mistral_dir
    out = convert_model(d, tmp_path / "mistral.gguf", outtype="f32")
    llm = llama_load(out)
    ids = ids_for(sp.vocab_size(), seed=3)
    assert rel_diff(cpp_logits(llm, ids), hf_logits(model, ids)) < 1e-3
    assert cpp_greedy(llm, ids[:6], 6) == hf_greedy(model, ids[:6], 6)
    for text in PARITY_TEXT:
        assert llm.tokenize(text.encode(), add_bos=True) == [1] + sp.encode(text), text


def test_sentencepiece_style_tokenizer_json_only(tmp_path: Path) -> None:
    """A Llama-2-style tokenizer shipped only as tokenizer.json (BPE with byte
    fallback and "▁"): converted for llama.cpp's SentencePiece tokenizer with
    merge-rank scores, it tokenizes like the HF tokenizer."""
    from convert_fixtures import corpus
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(corpus(), trainers.BpeTrainer(vocab_size=700, special_tokens=specials, show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    d = tmp_path / "hfspm"
    fast.save_pretrained(d)
    cfg = transformers.LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
    cfg.architectures = ["LlamaForCausalLM"]
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)
    assert not (d / "tokenizer.model").exists()
    out = convert_model(d, tmp_path / "t.gguf", vocab_only=True)
    llm = llama_load(out, vocab_only=True)
    for text in PARITY_TEXT:
        assert llm.tokenize(text.encode(), add_bos=True) == fast.encode(text), text
