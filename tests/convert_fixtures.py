"""Shared builders for the converter tests: tokenizers trained here, tiny
random transformers models saved with save_pretrained, and helpers that run
the same token ids through transformers (float32) and llama.cpp."""

from __future__ import annotations

import io
import json
import os
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

LLAMA3_RE = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2_RE = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"

TRAIN_TEXT = [
    "The quick brown fox jumps over the lazy dog. It's a sunny day, isn't it?",
    "Large language models run locally: convert, quantize, chat and serve them.",
    "我想在苹果公司工作。今天天气很好，我们去公园散步吧。人工智能正在改变世界。",
    "def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(i, add(i, 2))\n",
    "Emoji: 🚀 🦙 😀 ✅ and numbers 3 33 333 3333 3.14159 2026-11-22",
    "Whitespace   runs\t\ttabs\n\n\nnewlines    and    more     spaces",
    "Привет, как дела? Bonjour, ça va? ¿Qué tal? Grüße aus Köln.",
    "<html><body class=\"main\">Hello, world!</body></html> {\"key\": [1, 2, 3]}",
]

PARITY_TEXT = [
    "Hello world! The fox's dog didn't jump.",
    "我想在apple工作1314151天～ 你好，世界！",
    "    def f(x):\n\treturn x ** 2  # square\n",
    "🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙",
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n",
    "3 33 333 3333 33333 3.3 3..3 ------======= нещо на Български",
    "I've been 'told he's there, 'RE you sure? 'M not sure I'll make it",
    "mixed 中文 and English with émojis 🎉 and   spaces",
]

SPECIALS_LLAMA3 = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
SPECIALS_QWEN = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def corpus() -> list[str]:
    return TRAIN_TEXT * 20


def make_bpe_tokenizer(out: Path, regex: str, specials: list[str], bos: str | None, eos: str, vocab_size: int = 420, chat_template: str | None = None) -> Any:
    """A byte-level BPE tokenizer trained here, saved as tokenizer.json + tokenizer_config.json."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(regex), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos)
    if chat_template:
        fast.chat_template = chat_template
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    return fast


def make_spm_tokenizer(out: Path, vocab_size: int = 400, add_dummy_prefix: bool = True, user_symbols: tuple[str, ...] = (), bos: str = "<s>", eos: str = "</s>", extra_config: dict[str, Any] | None = None) -> Any:
    """A SentencePiece BPE model with byte fallback trained here (tokenizer.model)."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        add_dummy_prefix=add_dummy_prefix,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        split_digits=True,
        allow_whitespace_only_pieces=True,
        user_defined_symbols=list(user_symbols),
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        bos_piece=bos,
        eos_piece=eos,
        minloglevel=2,
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_bytes(buf.getvalue())
    cfg = {"bos_token": bos, "eos_token": eos, "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False}
    cfg.update(extra_config or {})
    (out / "tokenizer_config.json").write_text(json.dumps(cfg))
    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(buf.getvalue())
    return sp


def pad_vocab(n: int, multiple: int = 16) -> int:
    return (n + multiple - 1) // multiple * multiple


def save_hf(model: Any, out: Path) -> None:
    model.save_pretrained(out, safe_serialization=True)


def hf_logits(model: Any, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def hf_greedy(model: Any, ids: list[int], n: int) -> list[int]:
    out = list(ids)
    for _ in range(n):
        out.append(int(hf_logits(model, out)[-1].argmax()))
    return out[len(ids) :]


def llama_load(path: Path, **kw: Any) -> Any:
    from llama_cpp import Llama

    kw.setdefault("type_k", 0)
    kw.setdefault("type_v", 0)  # f32 KV cache: compare weights, not cache rounding
    return Llama(model_path=str(path), n_ctx=128, n_batch=128, logits_all=True, verbose=False, n_threads=2, seed=0, **kw)


def cpp_logits(llm: Any, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def cpp_greedy(llm: Any, ids: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(ids)
    out: list[int] = []
    for _ in range(n):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(nxt)
        llm.eval([nxt])
    return out


def rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / (b.max() - b.min()))


def ids_for(n_vocab_real: int, n: int = 24, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    return [int(x) for x in rng.integers(3, n_vocab_real, size=n)]


@cache
def torch_threads() -> None:
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(min(2, os.cpu_count() or 1))


def internlm2_layout(sd: dict[str, Any], n_kv: int, head_dim: int) -> dict[str, Any]:
    """A Llama state dict (torch tensors) in InternLM2's layout: q, k, v packed
    in one ``wqkv``, grouped per key/value head as [its query heads, k, v]."""
    import torch

    layers = sorted({int(k.split(".")[2]) for k in sd if k.startswith("model.layers.")})
    out = {"model.tok_embeddings.weight": sd["model.embed_tokens.weight"], "model.norm.weight": sd["model.norm.weight"], "output.weight": sd["lm_head.weight"]}
    for i in layers:
        p = f"model.layers.{i}."
        q = sd[p + "self_attn.q_proj.weight"]
        e = q.shape[1]
        grouped = [
            q.reshape(n_kv, -1, head_dim, e),
            sd[p + "self_attn.k_proj.weight"].reshape(n_kv, 1, head_dim, e),
            sd[p + "self_attn.v_proj.weight"].reshape(n_kv, 1, head_dim, e),
        ]
        out[p + "attention.wqkv.weight"] = torch.cat(grouped, dim=1).reshape(-1, e).contiguous()
        for ours, theirs in (("attention.wo", "self_attn.o_proj"), ("feed_forward.w1", "mlp.gate_proj"), ("feed_forward.w3", "mlp.up_proj"),
                             ("feed_forward.w2", "mlp.down_proj"), ("attention_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm")):
            out[p + ours + ".weight"] = sd[p + theirs + ".weight"]
    return out


def baichuan_layout(sd: dict[str, Any], lm_head: Any = None) -> dict[str, Any]:
    """A Llama state dict (torch tensors) in Baichuan's layout: q, k, v stacked
    in ``W_pack``; ``lm_head`` replaces the head's weights when given."""
    import torch

    layers = sorted({int(k.split(".")[2]) for k in sd if k.startswith("model.layers.")})
    head = sd["lm_head.weight"] if lm_head is None else lm_head
    out = {"model.embed_tokens.weight": sd["model.embed_tokens.weight"], "model.norm.weight": sd["model.norm.weight"], "lm_head.weight": head}
    for i in layers:
        p = f"model.layers.{i}."
        out[p + "self_attn.W_pack.weight"] = torch.cat([sd[p + "self_attn.q_proj.weight"], sd[p + "self_attn.k_proj.weight"], sd[p + "self_attn.v_proj.weight"]])
        for k in ("self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm"):
            out[p + k + ".weight"] = sd[p + k + ".weight"]
    return out
