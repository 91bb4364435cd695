"""Qwen2, Qwen3, Gemma 3, InternLM2, Baichuan2 and InternVL conversions
reproduce the transformers logits in llama.cpp. InternLM2, Baichuan2 and
InternVL are not in transformers: their checkpoints are re-packed here from a
tiny transformers Llama / Qwen2 (packed wqkv, W_pack with a NormHead lm_head,
``language_model.`` prefix with vision tensors) and must give the original
model's logits."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest
import torch
import transformers
from convert_fixtures import (
    PARITY_TEXT,
    QWEN2_RE,
    SPECIALS_QWEN,
    baichuan_layout,
    cpp_greedy,
    cpp_logits,
    hf_greedy,
    hf_logits,
    ids_for,
    internlm2_layout,
    llama_load,
    make_bpe_tokenizer,
    make_spm_tokenizer,
    pad_vocab,
    rel_diff,
    torch_threads,
)
from safetensors.torch import save_file  # noqa: E402

from ember.convert import convert_model

QWEN_CHAT = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"


def check(model, gguf_path: Path, n_real: int, *, seed: int = 0, tol: float = 1e-3, greedy: bool = True) -> None:
    llm = llama_load(gguf_path)
    ids = ids_for(n_real, seed=seed)
    d = rel_diff(cpp_logits(llm, ids), hf_logits(model, ids))
    assert d < tol, d
    if greedy:
        assert cpp_greedy(llm, ids[:6], 6) == hf_greedy(model, ids[:6], 6)


def kv(path: Path) -> dict[str, object]:
    r = gguf.GGUFReader(path)
    out: dict[str, object] = {}
    for f in r.fields.values():
        if f.types and f.types[0] == gguf.GGUFValueType.STRING:
            out[f.name] = bytes(f.parts[f.data[0]]).decode()
        elif f.types and f.types[0] != gguf.GGUFValueType.ARRAY:
            out[f.name] = f.parts[f.data[0]][0].item()
    return out


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory: pytest.TempPathFactory):
    torch_threads()
    d = tmp_path_factory.mktemp("qwen2")
    tok = make_bpe_tokenizer(d, QWEN2_RE, SPECIALS_QWEN, bos=None, eos="<|im_end|>", chat_template=QWEN_CHAT)
    cfg = transformers.Qwen2Config(
        vocab_size=pad_vocab(len(tok)), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.15, tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id, rope_theta=1000000.0,
    )
    cfg.architectures = ["Qwen2ForCausalLM"]
    torch.manual_seed(2)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # non-zero q/k/v biases
        for layer in model.model.layers:
            for p in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                p.bias.normal_(0, 0.3)
    model.save_pretrained(d)
    return d, model, tok


@pytest.mark.parametrize("outtype,tol", [("f32", 1e-3), ("f16", 2e-2)])
def test_qwen2(qwen2, tmp_path: Path, outtype: str, tol: float) -> None:
    d, model, tok = qwen2
    out = convert_model(d, tmp_path / "q.gguf", outtype=outtype)
    check(model, out, len(tok), tol=tol, greedy=outtype == "f32")
    if outtype == "f32":
        meta = kv(out)
        assert meta["tokenizer.ggml.pre"] == "qwen2"
        assert meta["tokenizer.ggml.eos_token_id"] == tok.convert_tokens_to_ids("<|im_end|>")
        assert meta["tokenizer.ggml.eot_token_id"] == tok.convert_tokens_to_ids("<|im_end|>")
        assert meta["tokenizer.chat_template"] == QWEN_CHAT
        llm = llama_load(out, vocab_only=True)
        for text in PARITY_TEXT + ["<|im_start|>user\nhi<|im_end|>"]:
            assert llm.tokenize(text.encode(), add_bos=True, special=True) == tok.encode(text), text


def test_qwen3(tmp_path: Path) -> None:
    torch_threads()
    d = tmp_path / "qwen3"
    tok = make_bpe_tokenizer(d, QWEN2_RE, SPECIALS_QWEN, bos=None, eos="<|im_end|>")
    cfg = transformers.Qwen3Config(
        vocab_size=pad_vocab(len(tok)), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=256, initializer_range=0.15, tie_word_embeddings=False,
    )
    cfg.architectures = ["Qwen3ForCausalLM"]
    torch.manual_seed(3)
    model = transformers.Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_norm.weight.uniform_(0.5, 1.5)
            layer.self_attn.k_norm.weight.uniform_(0.5, 1.5)
    model.save_pretrained(d)
    check(model, convert_model(d, tmp_path / "q3.gguf", outtype="f32"), len(tok), seed=3)


def test_gemma3(tmp_path: Path) -> None:
    torch_threads()
    d = tmp_path / "gemma3"
    sp = make_spm_tokenizer(d, add_dummy_prefix=False, user_symbols=("<start_of_turn>", "<end_of_turn>"), bos="<bos>", eos="<eos>")
    cfg = transformers.Gemma3TextConfig(
        vocab_size=sp.vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, max_position_embeddings=256, initializer_range=0.15,
        sliding_window=4, layer_types=["sliding_attention", "full_attention"], bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    torch.manual_seed(4)
    model = transformers.Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(-0.5, 0.5)
    model.config.architectures = ["Gemma3ForCausalLM"]
    model.save_pretrained(d)
    out = convert_model(d, tmp_path / "g.gguf", outtype="f32")
    check(model, out, sp.vocab_size(), seed=4)
    assert "output.weight" not in {t.name for t in gguf.GGUFReader(out).tensors}  # tied
    meta = kv(out)
    assert meta["tokenizer.ggml.add_space_prefix"] is False or meta["tokenizer.ggml.add_space_prefix"] == 0
    llm = llama_load(out, vocab_only=True)
    for text in PARITY_TEXT:
        assert llm.tokenize(text.encode(), add_bos=False) == sp.encode(text), text


def _tiny_llama(vocab: int, seed: int, layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2):
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, max_position_embeddings=256, initializer_range=0.15, tie_word_embeddings=False, rope_theta=10000.0,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


def _internlm2_checkpoint(d: Path):
    """A tiny Llama and the same weights in InternLM2's layout (packed wqkv)."""
    sp = make_spm_tokenizer(d, user_symbols=("<|im_start|>", "<|im_end|>"))
    cfgj = json.loads((d / "tokenizer_config.json").read_text())
    cfgj["added_tokens_decoder"] = {str(sp.piece_to_id(t)): {"content": t, "special": True} for t in ("<|im_start|>", "<|im_end|>")}
    (d / "tokenizer_config.json").write_text(json.dumps(cfgj))
    model = _tiny_llama(sp.vocab_size(), seed=5, heads=4, kv_heads=2)
    c = model.config
    out = internlm2_layout({k: v.contiguous() for k, v in model.state_dict().items()}, n_kv=2, head_dim=16)
    config = {
        "architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": c.num_hidden_layers, "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": 10000.0, "rope_scaling": {"type": "dynamic", "factor": 2.0}, "max_position_embeddings": 256, "vocab_size": sp.vocab_size(),
        "bias": False, "bos_token_id": 1, "eos_token_id": 2,
    }
    return model, sp, out, config


def test_internlm2_packed_wqkv_sharded(tmp_path: Path) -> None:
    torch_threads()
    d = tmp_path / "internlm2"
    model, sp, out, config = _internlm2_checkpoint(d)
    names = sorted(out)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2], "model-00002-of-00002.safetensors": names[len(names) // 2 :]}
    weight_map = {}
    for fn, ns in shards.items():
        save_file({n: out[n].to(torch.bfloat16) if n.endswith("w2.weight") else out[n] for n in ns}, d / fn)
        weight_map.update({n: fn for n in ns})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (d / "config.json").write_text(json.dumps(config))
    with torch.no_grad():  # the reference sees the same bf16-rounded w2
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.copy_(layer.mlp.down_proj.weight.to(torch.bfloat16).float())
    g = convert_model(d, tmp_path / "i.gguf", outtype="f32")
    check(model, g, sp.vocab_size(), seed=5)
    meta = kv(g)
    assert meta["general.architecture"] == "internlm2"
    assert meta["tokenizer.ggml.eos_token_id"] == sp.piece_to_id("<|im_end|>")


def test_internvl_extracts_internlm2(tmp_path: Path) -> None:
    torch_threads()
    d = tmp_path / "internvl-internlm2"
    model, sp, out, config = _internlm2_checkpoint(d)
    sd = {"language_model." + k: v for k, v in out.items()}
    sd["vision_model.embeddings.class_embedding"] = torch.randn(1, 1, 32)
    sd["mlp1.3.weight"] = torch.randn(64, 64)
    save_file(sd, d / "model.safetensors")
    (d / "config.json").write_text(json.dumps({"architectures": ["InternVLChatModel"], "llm_config": config, "vision_config": {"hidden_size": 32}}))
    g = convert_model(d, tmp_path / "ivl.gguf", outtype="f32", text_only=True)  # a stand-in vision tower: the language model alone
    check(model, g, sp.vocab_size(), seed=8)
    assert kv(g)["general.architecture"] == "internlm2"


def test_baichuan2_normhead_from_bin(tmp_path: Path) -> None:
    """32 layers: llama.cpp picks rope (7B) vs ALiBi (13B) for Baichuan by layer count."""
    torch_threads()
    d = tmp_path / "baichuan2"
    sp = make_spm_tokenizer(d)
    vocab = 125696  # Baichuan2's vocabulary size: NormHead detected from it
    model = _tiny_llama(vocab, seed=6, layers=32, hidden=32, heads=4, kv_heads=4)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    with torch.no_grad():
        head = torch.nn.functional.normalize(sd["lm_head.weight"])
        model.lm_head.weight.copy_(head)  # what NormHead computes at run time
        scaled = head * torch.empty(vocab, 1).uniform_(0.2, 3.0)  # stored weights: any row scale
    out = baichuan_layout(sd, lm_head=scaled)
    torch.save(out, d / "pytorch_model.bin")
    (d / "config.json").write_text(json.dumps({
        "architectures": ["BaichuanForCausalLM"], "model_type": "baichuan", "hidden_size": 32, "intermediate_size": 64,
        "num_attention_heads": 4, "num_hidden_layers": 32, "rms_norm_eps": model.config.rms_norm_eps, "max_position_embeddings": 256,
        "model_max_length": 256, "vocab_size": vocab, "bos_token_id": 1, "eos_token_id": 2,
    }))
    g = convert_model(d, tmp_path / "b.gguf", outtype="f32")
    check(model, g, sp.vocab_size(), seed=6, greedy=False)


def test_internvl_extracts_qwen2(qwen2, tmp_path: Path) -> None:
    src, model, tok = qwen2
    d = tmp_path / "internvl"
    d.mkdir()
    for f in src.iterdir():
        if f.name.startswith("tokenizer") or f.name.endswith(".jinja"):
            (d / f.name).write_bytes(f.read_bytes())
    sd = {"language_model." + k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    sd["vision_model.embeddings.patch_embedding.weight"] = torch.randn(32, 3, 14, 14)
    sd["vision_model.encoder.layers.0.attn.qkv.weight"] = torch.randn(96, 32)
    sd["mlp1.0.weight"] = torch.randn(128)
    sd["mlp1.1.weight"] = torch.randn(64, 128)
    save_file(sd, d / "model.safetensors")
    llm_config = model.config.to_dict()
    llm_config["architectures"] = ["Qwen2ForCausalLM"]
    (d / "config.json").write_text(json.dumps({
        "architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "llm_config": llm_config,
        "vision_config": {"architectures": ["InternVisionModel"], "hidden_size": 32, "image_size": 448, "patch_size": 14},
        "downsample_ratio": 0.5, "template": "internvl2_5",
    }))
    g = convert_model(d, tmp_path / "ivl.gguf", outtype="f32", text_only=True)  # a stand-in vision tower: the language model alone
    check(model, g, len(tok), seed=7)
    names = {t.name for t in gguf.GGUFReader(g).tensors}
    assert not any(n.startswith(("v.", "mm.", "vision")) for n in names)
    assert kv(g)["general.architecture"] == "qwen2"


def test_gemma3_multimodal_extracts_text_model(tmp_path: Path) -> None:
    """Gemma3ForConditionalGeneration (Gemma 3 4B and up): text_config and the
    language_model tensors are converted; the SigLIP tower goes to the
    projector written beside it (tests/test_convert_vision.py checks that one)."""
    torch_threads()
    d = tmp_path / "gemma3mm"
    sp = make_spm_tokenizer(d, add_dummy_prefix=False, bos="<bos>", eos="<eos>")
    tc = transformers.Gemma3TextConfig(
        vocab_size=sp.vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, max_position_embeddings=256, initializer_range=0.15,
        sliding_window=4, layer_types=["sliding_attention", "full_attention"],
    )
    vc = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14)
    cfg = transformers.Gemma3Config(text_config=tc.to_dict(), vision_config=vc.to_dict(), mm_tokens_per_image=4, image_token_index=5, boi_token_index=6, eoi_token_index=7)
    torch.manual_seed(9)
    model = transformers.Gemma3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(-0.5, 0.5)
    model.save_pretrained(d)
    g = convert_model(d, tmp_path / "g.gguf", outtype="f32")
    check(model, g, sp.vocab_size(), seed=9)
    names = {t.name for t in gguf.GGUFReader(g).tensors}
    assert all(n.startswith(("blk.", "token_embd", "output_norm")) for n in names)
    assert kv(tmp_path / "mmproj-g.gguf")["general.architecture"] == "clip"


def test_qwen2_vocab_json_merges_txt(qwen2, tmp_path: Path) -> None:
    """Slow-tokenizer files only (vocab.json + merges.txt, as InternVL2.5 ships
    its Qwen2 tokenizer): the pre-tokenizer comes from tokenizer_class."""
    src, model, tok = qwen2
    d = tmp_path / "slow"
    d.mkdir()
    for name in ("config.json", "model.safetensors"):
        (d / name).write_bytes((src / name).read_bytes())
    tok.backend_tokenizer.model.save(str(d))  # vocab.json + merges.txt
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    cfg["tokenizer_class"] = "Qwen2Tokenizer"
    cfg["added_tokens_decoder"] = {str(tok.convert_tokens_to_ids(t)): {"content": t, "special": True} for t in SPECIALS_QWEN}
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert not (d / "tokenizer.json").exists() and (d / "merges.txt").is_file()
    g = convert_model(d, tmp_path / "s.gguf", vocab_only=True)
    meta = kv(g)
    assert meta["tokenizer.ggml.pre"] == "qwen2"
    assert meta["tokenizer.ggml.eos_token_id"] == tok.convert_tokens_to_ids("<|im_end|>")
    llm = llama_load(g, vocab_only=True)
    for text in PARITY_TEXT + ["<|im_start|>user\nhi<|im_end|>"]:
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == tok.encode(text), text
