"""Converter goldens, as Ollama keeps them: for each architecture a tiny model
is built here (transformers' layout and config, the converter's real input),
converted, and its metadata and a sha256 of every tensor's bytes compared with
``tests/data/convert/<architecture>.json``. Any change in what the converter
writes fails here; after a deliberate change, regenerate with
``EMBER_UPDATE_GOLDENS=1 pytest tests/test_convert_golden.py`` and review the
JSON diff.

Everything is reproducible on any machine: weights are integers from numpy's
frozen legacy generator scaled by a power of two (torch's and numpy's newer
normal samplers use platform-dependent math), saved as float32 (a bf16 copy
is rounded by torch, exactly); tokenizers are written out, not trained;
configs set every value the converter reads rather than take transformers'
defaults. One
value is left out: llama3 ``rope_freqs`` comes from float32 ``pow``, which
numpy computes with SIMD code that differs between CPUs in the last bit, so
only its type and shape are compared.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
import transformers
from convert_fixtures import LLAMA3_RE, QWEN2_RE, baichuan_layout, internlm2_layout
from safetensors.torch import save_file  # noqa: E402
from sentencepiece import sentencepiece_model_pb2 as spm_pb

from ember.convert import convert_model

GOLDENS = Path(__file__).parent / "data" / "convert"
UPDATE = os.environ.get("EMBER_UPDATE_GOLDENS") == "1"
NOT_REPRODUCIBLE = {"rope_freqs.weight"}  # see the module docstring
QWEN_CHAT = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"


# -- deterministic inputs -----------------------------------------------------


def values(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """float32 in [-0.5, 0.5): 24-bit integers times 2**-24, exact everywhere."""
    k = np.random.RandomState(seed).randint(-(2**23), 2**23, size=shape, dtype=np.int64)
    return k.astype(np.float32) * np.float32(2.0**-24)


def fill(model: Any, seed: int) -> Any:
    """Overwrite every parameter (transformers' random init is not portable)."""
    with torch.no_grad():
        for i, (_, p) in enumerate(model.named_parameters()):
            p.copy_(torch.from_numpy(values(tuple(p.shape), seed * 1000 + i)))
    return model


def _byte_chars() -> list[str]:
    """GPT-2's byte-level alphabet: the printable character standing for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


BPE_MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("e", "r"), ("o", "n"), ("Ġ", "s"), ("a", "n"), ("r", "e")]


def bpe_tokenizer(d: Path, regex: str, specials: list[str], bos: str | None, eos: str, chat_template: str | None = None) -> int:
    """A byte-level BPE tokenizer.json (256 bytes, a few merges, specials); returns its size."""
    vocab = {c: i for i, c in enumerate(_byte_chars())}
    for a, b in BPE_MERGES:
        vocab[a + b] = len(vocab)
    added = [{"id": len(vocab) + i, "content": s, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True} for i, s in enumerate(specials)]
    tokenizer = {
        "version": "1.0",
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            ],
        },
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "byte_fallback": False, "vocab": vocab, "merges": [f"{a} {b}" for a, b in BPE_MERGES]},
    }
    config: dict[str, Any] = {"bos_token": bos, "eos_token": eos, "add_bos_token": bos is not None, "tokenizer_class": "PreTrainedTokenizerFast"}
    if chat_template:
        config["chat_template"] = chat_template
    d.mkdir(parents=True, exist_ok=True)
    (d / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    return len(vocab) + len(specials)


def spm_tokenizer(d: Path, user_symbols: tuple[str, ...] = (), bos: str = "<s>", eos: str = "</s>", add_dummy_prefix: bool = True) -> int:
    """A SentencePiece BPE model with byte fallback, written piece by piece; returns its size."""
    m = spm_pb.ModelProto()  # type: ignore[attr-defined]
    m.trainer_spec.model_type = spm_pb.TrainerSpec.BPE  # type: ignore[attr-defined]
    m.trainer_spec.byte_fallback = True
    m.trainer_spec.unk_id, m.trainer_spec.bos_id, m.trainer_spec.eos_id, m.trainer_spec.pad_id = 0, 1, 2, -1
    m.normalizer_spec.name = "identity"
    m.normalizer_spec.add_dummy_prefix = add_dummy_prefix
    m.normalizer_spec.remove_extra_whitespaces = False
    m.normalizer_spec.escape_whitespaces = True
    piece = spm_pb.ModelProto.SentencePiece  # type: ignore[attr-defined]
    pieces = [("<unk>", 0.0, piece.UNKNOWN), (bos, 0.0, piece.CONTROL), (eos, 0.0, piece.CONTROL)]
    pieces += [(s, 0.0, piece.USER_DEFINED) for s in user_symbols]
    pieces += [(f"<0x{b:02X}>", 0.0, piece.BYTE) for b in range(256)]
    words = ["▁t", "he", "▁the", "in", "er", "▁a", "on", "▁", *"abcdefghijklmnopqrstuvwxyz"]
    pieces += [(w, -float(i), piece.NORMAL) for i, w in enumerate(words)]
    for text, score, kind in pieces:
        p = m.pieces.add()
        p.piece, p.score, p.type = text, score, kind
    m.trainer_spec.vocab_size = len(pieces)
    d.mkdir(parents=True, exist_ok=True)
    (d / "tokenizer.model").write_bytes(m.SerializeToString())
    config = {"bos_token": bos, "eos_token": eos, "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False}
    if user_symbols:
        config["added_tokens_decoder"] = {str(3 + i): {"content": s, "special": True} for i, s in enumerate(user_symbols)}
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    return len(pieces)


# -- one tiny model per architecture ------------------------------------------


def _llama(d: Path, dtype: Any = None) -> None:
    """Llama 3 layout (q/k permuted by the converter, llama3 rope scaling)."""
    n = bpe_tokenizer(d, LLAMA3_RE, ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"], bos="<|begin_of_text|>", eos="<|eot_id|>")
    cfg = transformers.LlamaConfig(
        vocab_size=n, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 500000.0},
    )
    cfg.architectures = ["LlamaForCausalLM"]
    model = fill(transformers.LlamaForCausalLM(cfg), 1)
    (model.to(dtype) if dtype is not None else model).save_pretrained(d)


def _mistral(d: Path) -> None:
    n = spm_tokenizer(d)
    cfg = transformers.MistralConfig(
        vocab_size=n, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=None,
    )
    cfg.architectures = ["MistralForCausalLM"]
    fill(transformers.MistralForCausalLM(cfg), 2).save_pretrained(d)


def _qwen2_model(d: Path) -> Any:
    n = bpe_tokenizer(d, QWEN2_RE, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], bos=None, eos="<|im_end|>", chat_template=QWEN_CHAT)
    cfg = transformers.Qwen2Config(
        vocab_size=n, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True, eos_token_id=n - 1,
    )
    cfg.architectures = ["Qwen2ForCausalLM"]
    return fill(transformers.Qwen2ForCausalLM(cfg), 3)


def _qwen2(d: Path) -> None:
    _qwen2_model(d).save_pretrained(d)


def _qwen3(d: Path) -> None:
    n = bpe_tokenizer(d, QWEN2_RE, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], bos=None, eos="<|im_end|>")
    cfg = transformers.Qwen3Config(
        vocab_size=n, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False,
    )
    cfg.architectures = ["Qwen3ForCausalLM"]
    fill(transformers.Qwen3ForCausalLM(cfg), 4).save_pretrained(d)


def _gemma3(d: Path) -> None:
    n = spm_tokenizer(d, user_symbols=("<start_of_turn>", "<end_of_turn>"), bos="<bos>", eos="<eos>", add_dummy_prefix=False)
    cfg = transformers.Gemma3TextConfig(
        vocab_size=n, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, query_pre_attn_scalar=16, max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=1000000.0,
        rope_local_base_freq=10000.0, sliding_window=4, layer_types=["sliding_attention", "full_attention"],
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    model = fill(transformers.Gemma3ForCausalLM(cfg), 5)
    model.config.architectures = ["Gemma3ForCausalLM"]
    model.save_pretrained(d)


def _llama_state(n_vocab: int, hidden: int, kv_heads: int, seed: int) -> dict[str, Any]:
    """A 2-layer, 4-head Llama's weights, to re-pack into another layout."""
    cfg = transformers.LlamaConfig(vocab_size=n_vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=kv_heads)
    model = fill(transformers.LlamaForCausalLM(cfg), seed)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def _internlm2(d: Path) -> None:
    """InternLM2's layout (packed wqkv, grouped per key/value head) from a Llama's weights."""
    n = spm_tokenizer(d, user_symbols=("<|im_start|>", "<|im_end|>"))
    sd = _llama_state(n, 64, 2, 6)
    out = internlm2_layout(sd, n_kv=2, head_dim=16)
    save_file(out, d / "model.safetensors")
    (d / "config.json").write_text(json.dumps({
        "architectures": ["InternLM2ForCausalLM"], "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
        "num_hidden_layers": 2, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 256, "vocab_size": n, "bos_token_id": 1, "eos_token_id": 2,
    }))


def _baichuan(d: Path) -> None:
    """Baichuan2's layout (W_pack; a NormHead lm_head, normalised by the converter) in a .bin."""
    n = spm_tokenizer(d)
    sd = _llama_state(n, 32, 4, 7)
    out = baichuan_layout(sd)
    torch.save(out, d / "pytorch_model.bin")
    (d / "config.json").write_text(json.dumps({
        "architectures": ["BaichuanForCausalLM"], "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
        "rms_norm_eps": 1e-6, "model_max_length": 256, "vocab_size": n, "norm_head": True, "bos_token_id": 1, "eos_token_id": 2,
    }))


def _internvl(d: Path) -> None:
    """InternVL's layout: the Qwen2 under ``language_model.``, vision tensors beside it (skipped)."""
    model = _qwen2_model(d)
    sd = {"language_model." + k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    sd["vision_model.embeddings.patch_embedding.weight"] = torch.from_numpy(values((32, 3, 14, 14), 80))
    sd["mlp1.1.weight"] = torch.from_numpy(values((64, 128), 81))
    save_file(sd, d / "model.safetensors")
    llm = model.config.to_dict()
    (d / "config.json").write_text(json.dumps({"architectures": ["InternVLChatModel"], "llm_config": llm, "vision_config": {"hidden_size": 32}}))


def _llama_bf16(d: Path) -> None:
    """The same Llama saved in bf16: copied byte for byte (auto), bf16 -> f16 by integer arithmetic."""
    _llama(d, torch.bfloat16)


# golden file -> (builder, the outtypes converted)
CASES: dict[str, tuple[Any, tuple[str, ...]]] = {
    "llama": (_llama, ("f32", "f16", "bf16", "q8_0")),
    "llama-bf16": (_llama_bf16, ("auto", "f16")),
    "mistral": (_mistral, ("f16",)),
    "qwen2": (_qwen2, ("f16",)),
    "qwen3": (_qwen3, ("f16",)),
    "gemma3": (_gemma3, ("f16",)),
    "internlm2": (_internlm2, ("f16",)),
    "baichuan": (_baichuan, ("f16",)),
    "internvl": (_internvl, ("f16",)),
}


# -- what is compared -----------------------------------------------------------


def summary(path: Path) -> dict[str, Any]:
    """Metadata (scalars as they are, arrays of more than 16 items by length
    and sha256 of their bytes) and, per tensor, "TYPE shape sha256"."""
    r = gguf.GGUFReader(path)
    meta: dict[str, Any] = {}
    for f in r.fields.values():
        if f.name.startswith("GGUF."):
            continue
        if f.types[0] == gguf.GGUFValueType.ARRAY and len(f.data) > 16:
            raw = b"".join(bytes(f.parts[i].tobytes()) for i in f.data)
            meta[f.name] = {"items": len(f.data), "sha256": hashlib.sha256(raw).hexdigest()}
        else:
            v = f.contents()
            meta[f.name] = [_plain(x) for x in v] if isinstance(v, list) else _plain(v)
    tensors: dict[str, str] = {}
    for t in r.tensors:
        data = bytes(r.data[t.data_offset : t.data_offset + t.n_bytes])
        digest = "(data not compared)" if t.name in NOT_REPRODUCIBLE else hashlib.sha256(data).hexdigest()
        tensors[t.name] = f"{t.tensor_type.name} {'x'.join(str(int(x)) for x in t.shape)} {digest}"
    return {"metadata": meta, "tensors": tensors}


def _plain(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v


@pytest.mark.parametrize("arch", sorted(CASES))
def test_golden(arch: str, tmp_path: Path) -> None:
    build, outtypes = CASES[arch]
    model_dir = tmp_path / f"Golden-{arch}"  # the folder name is the model's general.name
    build(model_dir)
    # the language models' goldens (InternVL's vision tower is a stand-in: no projector)
    got = {ot: summary(convert_model(model_dir, tmp_path / f"{ot}.gguf", outtype=ot, text_only=True)) for ot in outtypes}
    golden = GOLDENS / f"{arch}.json"
    if UPDATE:
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(json.dumps(got, indent=1, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
        return
    assert golden.is_file(), f"{golden} is missing: run with EMBER_UPDATE_GOLDENS=1 to write it"
    want = json.loads(golden.read_text(encoding="utf-8"))
    assert sorted(want) == sorted(outtypes), f"{golden.name} holds outtypes {sorted(want)}; regenerate it"
    for ot in outtypes:
        assert got[ot]["metadata"] == want[ot]["metadata"], f"{arch} --outtype {ot}: metadata differs from {golden.name}"
        assert got[ot]["tensors"] == want[ot]["tensors"], f"{arch} --outtype {ot}: tensors differ from {golden.name}"
