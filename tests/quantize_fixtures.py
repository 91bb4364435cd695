"""Tiny GGUF models written with gguf-py for the quantize, merge-lora and eval
tests (no tests here). Dimensions are multiples of 256 so every K-quant and
i-quant applies without fallback."""

from __future__ import annotations

from pathlib import Path

import numpy as np

HIDDEN = 256
FF = 512
VOCAB = 512


def _vocab() -> tuple[list[str], list[float], list[int]]:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    types = [2, 3, 3] + [6] * 256
    letters = "abcdefghijklmnopqrstuvwxyz"
    extra = ["\u2581" + a for a in letters] + list(letters)
    extra += ["\u2581" + a + b for a in letters for b in letters]
    i = 0
    while len(tokens) < VOCAB:
        tokens.append(extra[i])
        types.append(1)
        i += 1
    scores = [0.0, 0.0, 0.0] + [0.0] * 256 + [-float(k) for k in range(VOCAB - 259)]
    return tokens, scores, types


def write_tiny_llama(
    path: Path,
    *,
    n_layer: int = 8,
    n_head: int = 4,
    n_head_kv: int = 2,
    dtype: str = "f16",
    tied: bool = False,
    seed: int = 0,
    std: float = 0.05,
) -> dict[str, np.ndarray]:
    """Write a random llama-architecture GGUF; returns the tensors (numpy order,
    float32) so tests can do their own arithmetic on them."""
    import gguf

    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-test-llama")
    w.add_block_count(n_layer)
    w.add_context_length(2048)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FF)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_dimension_count(HIDDEN // n_head)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(1 if dtype == "f16" else 0)
    tokens, scores, types = _vocab()
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)

    kv = HIDDEN // n_head * n_head_kv
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (VOCAB, HIDDEN), "output_norm.weight": (HIDDEN,)}
    if not tied:
        shapes["output.weight"] = (VOCAB, HIDDEN)
    for i in range(n_layer):
        p = f"blk.{i}."
        shapes.update(
            {
                p + "attn_norm.weight": (HIDDEN,),
                p + "attn_q.weight": (HIDDEN, HIDDEN),
                p + "attn_k.weight": (kv, HIDDEN),
                p + "attn_v.weight": (kv, HIDDEN),
                p + "attn_output.weight": (HIDDEN, HIDDEN),
                p + "ffn_norm.weight": (HIDDEN,),
                p + "ffn_gate.weight": (FF, HIDDEN),
                p + "ffn_up.weight": (FF, HIDDEN),
                p + "ffn_down.weight": (HIDDEN, FF),
            }
        )
    tensors: dict[str, np.ndarray] = {}
    for name, shape in shapes.items():
        if len(shape) == 1:
            arr = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            arr = (std * rng.standard_normal(shape)).astype(np.float32)
        tensors[name] = arr
        stored = arr.astype(np.float16) if (dtype == "f16" and len(shape) > 1) else arr
        w.add_tensor(name, stored)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


def tensor_types(path: Path) -> dict[str, str]:
    """name -> ggml type name of every tensor, read with gguf-py."""
    from gguf import GGUFReader

    return {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}


def file_type(path: Path) -> int:
    from gguf import GGUFReader

    return int(GGUFReader(path).get_field("general.file_type").contents())
