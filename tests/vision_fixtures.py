"""Tiny random-weight vision-language checkpoints built by transformers, one
per architecture and layout Ember converts, each saved as users download them
(hub layouts: InternVL's original ``vision_model.``/``mlp1.`` names, Gemma 3's
``vision_tower.vision_model.`` without the pooling head), with the image
processor that belongs to it. Plus the reference side of the fidelity tests:
transformers' pixel values, image features and logits for the same input."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from convert_fixtures import QWEN2_RE, SPECIALS_QWEN, make_bpe_tokenizer, make_spm_tokenizer, pad_vocab, torch_threads

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


@dataclass
class VisionFixture:
    """A saved checkpoint folder and the float32 transformers model it holds."""

    arch: str  # "internvl", "internvl-original", "gemma3", "qwen25vl"
    path: Path
    model: Any
    processor: Any  # transformers image processor (PIL backend)
    image_token_id: int
    n_vocab_real: int
    extra: dict[str, Any] = field(default_factory=dict)


def sample_image(width: int, height: int, seed: int = 0) -> Any:
    """A deterministic RGB image with gradients, edges and noise (resampling shows)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    r = (x * 255 // max(1, width - 1)).astype(np.int32)
    g = (y * 255 // max(1, height - 1)).astype(np.int32)
    b = (((x // 7) + (y // 5)) % 2 * 180).astype(np.int32)
    img = np.stack([r, g, b], axis=-1) + rng.integers(-30, 31, size=(height, width, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def randomize(model: Any, seed: int, one_plus_norms: bool = False) -> None:
    """Weights of order one everywhere (transformers' 0.02 init makes every
    layer nearly the identity, so a wrong mapping would still pass): matrices
    ~ N(0, 1/fan_in), norms and layer scales around 1 (around 0 where the
    model adds 1 itself), biases small."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            low = name.lower()
            if p.ndim <= 1 and ("norm" in low or "lambda" in low or low.endswith((".ls1", ".ls2"))):
                center = 0.0 if one_plus_norms and "norm" in low and "vision" not in low else 1.0
                p.copy_(center + (torch.rand(p.shape, generator=gen) - 0.5))
            elif p.ndim <= 1:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
            else:
                fan_in = int(np.prod(p.shape[1:])) if p.ndim > 2 else p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(max(fan_in, 1)))


CHATML = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
GEMMA_CHAT = "{% for m in messages %}<start_of_turn>{{ 'model' if m.role == 'assistant' else m.role }}\n{{ m.content }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"


def _qwen_tokenizer(out: Path, extra: list[str]) -> Any:
    return make_bpe_tokenizer(out, QWEN2_RE, SPECIALS_QWEN + extra, bos=None, eos="<|im_end|>", vocab_size=400, chat_template=CHATML)


def _save_tensors(sd: dict[str, Any], out: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, out / "model.safetensors")


# ---------------------------------------------------------------------------
# InternVL (Qwen2 language model)


def build_internvl(out: Path, layout: str = "native", seed: int = 11) -> VisionFixture:
    """``layout="native"``: transformers' InternVLForConditionalGeneration as
    saved by save_pretrained, with its GotOcr2 image processor. ``"original"``:
    the same weights renamed to OpenGVLab's InternVLChatModel layout (fused
    qkv, ``mlp1``, ``language_model.`` with its own ``lm_head``) and config,
    no preprocessor config (its remote code hard-codes ImageNet mean/std)."""
    import torch
    import transformers

    torch_threads()
    tok = _qwen_tokenizer(out, ["<img>", "</img>", "<IMG_CONTEXT>"])
    n_real = len(tok)
    image_token = tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    tc = transformers.Qwen2Config(
        vocab_size=pad_vocab(n_real), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False, rms_norm_eps=1e-6,
    )
    vc = transformers.InternVLVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=[56, 56], patch_size=[14, 14],
        attention_bias=True, layer_norm_eps=1e-6,
    )
    cfg = transformers.InternVLConfig(vision_config=vc.to_dict(), text_config=tc.to_dict(), image_token_id=image_token, downsample_ratio=0.5, tie_word_embeddings=False, image_seq_length=4)
    torch.manual_seed(seed)
    model = transformers.InternVLForConditionalGeneration(cfg).eval()
    randomize(model, seed)
    proc = transformers.GotOcr2ImageProcessorPil(
        size={"height": 56, "width": 56}, crop_to_patches=True, min_patches=1, max_patches=6,
        image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD,
    )
    if layout == "native":
        model.save_pretrained(out)
        proc.save_pretrained(out)
    else:
        sd = model.state_dict()
        _save_tensors(_internvl_original_names(sd, vc.num_hidden_layers), out)
        llm = tc.to_dict()
        llm["architectures"] = ["Qwen2ForCausalLM"]
        (out / "config.json").write_text(json.dumps({
            "architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "llm_config": llm, "template": "internvl2_5",
            "vision_config": {
                "architectures": ["InternVisionModel"], "model_type": "intern_vit_6b", "hidden_size": 32, "intermediate_size": 64,
                "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 56, "patch_size": 14, "qkv_bias": True,
                "qk_normalization": False, "norm_type": "layer_norm", "layer_norm_eps": 1e-6, "hidden_act": "gelu",
            },
            "downsample_ratio": 0.5, "select_layer": -1, "dynamic_image_size": True, "use_thumbnail": True,
            "min_dynamic_patch": 1, "max_dynamic_patch": 6, "ps_version": "v2",
        }))
    return VisionFixture("internvl" if layout == "native" else "internvl-original", out, model, proc, image_token, n_real)


def _internvl_original_names(sd: dict[str, Any], n_layers: int) -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {}
    v = "model.vision_tower."
    for k, t in sd.items():
        if k.startswith("model.language_model."):
            out["language_model.model." + k[len("model.language_model.") :]] = t
        elif k == "lm_head.weight":
            out["language_model.lm_head.weight"] = t
    out["vision_model.embeddings.class_embedding"] = sd[v + "embeddings.cls_token"]
    out["vision_model.embeddings.patch_embedding.weight"] = sd[v + "embeddings.patch_embeddings.projection.weight"]
    out["vision_model.embeddings.patch_embedding.bias"] = sd[v + "embeddings.patch_embeddings.projection.bias"]
    out["vision_model.embeddings.position_embedding"] = sd[v + "embeddings.position_embeddings"]
    for i in range(n_layers):
        s, d = f"{v}encoder.layer.{i}.", f"vision_model.encoder.layers.{i}."
        for suffix in ("weight", "bias"):
            out[d + f"attn.qkv.{suffix}"] = torch.cat([sd[s + f"attention.{x}_proj.{suffix}"] for x in "qkv"])
            out[d + f"attn.proj.{suffix}"] = sd[s + f"attention.projection_layer.{suffix}"]
            out[d + f"norm1.{suffix}"] = sd[s + f"layernorm_before.{suffix}"]
            out[d + f"norm2.{suffix}"] = sd[s + f"layernorm_after.{suffix}"]
            out[d + f"mlp.fc1.{suffix}"] = sd[s + f"mlp.fc1.{suffix}"]
            out[d + f"mlp.fc2.{suffix}"] = sd[s + f"mlp.fc2.{suffix}"]
        out[d + "ls1"] = sd[s + "lambda_1"]
        out[d + "ls2"] = sd[s + "lambda_2"]
    p = "model.multi_modal_projector."
    for src, dst in (("layer_norm", "mlp1.0"), ("linear_1", "mlp1.1"), ("linear_2", "mlp1.3")):
        for suffix in ("weight", "bias"):
            out[f"{dst}.{suffix}"] = sd[f"{p}{src}.{suffix}"]
    return out


# ---------------------------------------------------------------------------
# Gemma 3 (SigLIP)


def build_gemma3(out: Path, seed: int = 12) -> VisionFixture:
    """Saved in the hub layout: ``vision_tower.vision_model.*`` and no pooling
    head (transformers 5 writes ``vision_tower.*`` plus a head it never uses)."""
    import torch
    import transformers

    torch_threads()
    symbols = ("<start_of_image>", "<end_of_image>", "<image_soft_token>", "<start_of_turn>", "<end_of_turn>")
    sp = make_spm_tokenizer(out, add_dummy_prefix=False, user_symbols=symbols, bos="<bos>", eos="<eos>", extra_config={"chat_template": GEMMA_CHAT})
    boi, eoi, soft = (sp.piece_to_id(s) for s in symbols[:3])
    tc = transformers.Gemma3TextConfig(
        vocab_size=pad_vocab(sp.vocab_size()), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, max_position_embeddings=512, sliding_window=512,
        layer_types=["sliding_attention", "full_attention"], bos_token_id=sp.bos_id(), eos_token_id=sp.eos_id(), pad_token_id=0,
    )
    vc = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=56, patch_size=14)
    cfg = transformers.Gemma3Config(text_config=tc.to_dict(), vision_config=vc.to_dict(), mm_tokens_per_image=4, image_token_index=soft, boi_token_index=boi, eoi_token_index=eoi)
    torch.manual_seed(seed)
    model = transformers.Gemma3ForConditionalGeneration(cfg).eval()
    randomize(model, seed, one_plus_norms=True)
    sd = {}
    for k, t in model.state_dict().items():
        if k.startswith("model.vision_tower.head.") or k == "lm_head.weight":
            continue
        if k.startswith("model.vision_tower."):
            sd["vision_tower.vision_model." + k[len("model.vision_tower.") :]] = t
        elif k.startswith("model.language_model."):
            sd["language_model.model." + k[len("model.language_model.") :]] = t
        elif k.startswith("model.multi_modal_projector."):
            sd["multi_modal_projector." + k[len("model.multi_modal_projector.") :]] = t
        else:
            raise AssertionError(k)
    _save_tensors(sd, out)
    (out / "config.json").write_text(json.dumps({**cfg.to_dict(), "architectures": ["Gemma3ForConditionalGeneration"]}))
    proc = transformers.Gemma3ImageProcessorPil(size={"height": 56, "width": 56}, image_mean=[0.5] * 3, image_std=[0.5] * 3, do_pan_and_scan=False)
    proc.save_pretrained(out)
    return VisionFixture("gemma3", out, model, proc, soft, sp.vocab_size(), {"boi": boi, "eoi": eoi})


# ---------------------------------------------------------------------------
# Qwen2.5-VL


def build_qwen25vl(out: Path, seed: int = 13) -> VisionFixture:
    import torch
    import transformers

    torch_threads()
    tok = _qwen_tokenizer(out, ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"])
    n_real = len(tok)
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")}
    vc = transformers.Qwen2_5_VLVisionConfig(
        hidden_size=32, intermediate_size=64, depth=4, num_heads=2, out_hidden_size=64, fullatt_block_indexes=[1, 3],
        window_size=112, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
    )
    tc = transformers.Qwen2_5_VLTextConfig(
        vocab_size=pad_vocab(n_real), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=ids["<|vision_end|>"],
        rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
    )
    cfg = transformers.Qwen2_5_VLConfig(
        vision_config=vc.to_dict(), text_config=tc.to_dict(), image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = transformers.Qwen2_5_VLForConditionalGeneration(cfg).eval()
    randomize(model, seed)
    model.save_pretrained(out)
    proc = transformers.Qwen2VLImageProcessorPil(min_pixels=4 * 28 * 28, max_pixels=64 * 28 * 28, patch_size=14, merge_size=2, temporal_patch_size=2)
    proc.save_pretrained(out)
    return VisionFixture("qwen25vl", out, model, proc, ids["<|image_pad|>"], n_real, ids)


BUILDERS = {
    "internvl": lambda d: build_internvl(d, "native"),
    "internvl-original": lambda d: build_internvl(d, "original"),
    "gemma3": build_gemma3,
    "qwen25vl": build_qwen25vl,
}


# ---------------------------------------------------------------------------
# the transformers side


def hf_pixels(fx: VisionFixture, image: Any) -> dict[str, Any]:
    """The image processor's output (tensors) for one image."""
    return dict(fx.processor(images=[image], return_tensors="pt"))


def hf_image_features(fx: VisionFixture, inputs: dict[str, Any]) -> np.ndarray:
    """Image features as the language model receives them: (n_tokens, n_embd)."""
    import torch

    m = fx.model.model
    with torch.no_grad():
        if fx.arch.startswith("internvl"):
            out = m.get_image_features(pixel_values=inputs["pixel_values"], vision_feature_layer=-1, vision_feature_select_strategy="default")
        elif fx.arch == "qwen25vl":
            out = m.get_image_features(pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"])
        else:
            out = m.get_image_features(pixel_values=inputs["pixel_values"])
    feats = getattr(out, "pooler_output", out)
    if isinstance(feats, (list, tuple)):
        feats = torch.cat([f.reshape(-1, f.shape[-1]) for f in feats])
    return feats.reshape(-1, feats.shape[-1]).float().numpy()


def hf_logits(fx: VisionFixture, ids: list[int], inputs: dict[str, Any]) -> np.ndarray:
    """Logits for every position of ``ids`` (image positions hold the image token)."""
    import torch

    kw: dict[str, Any] = {k: v for k, v in inputs.items() if k in ("pixel_values", "image_grid_thw")}
    image_mask = torch.tensor([[int(t == fx.image_token_id) for t in ids]])
    if fx.arch == "gemma3":
        kw["token_type_ids"] = image_mask  # bidirectional attention inside the image
    if fx.arch == "qwen25vl":
        kw["mm_token_type_ids"] = image_mask  # M-RoPE positions (row, column) for the image
    if fx.arch.startswith("internvl"):
        kw["vision_feature_layer"] = -1
        kw["vision_feature_select_strategy"] = "default"
    with torch.no_grad():
        return fx.model(input_ids=torch.tensor([ids]), **kw).logits[0].float().numpy()


def hf_greedy(fx: VisionFixture, ids: list[int], inputs: dict[str, Any], n: int) -> list[int]:
    out = list(ids)
    for _ in range(n):
        out.append(int(hf_logits(fx, out, inputs)[-1].argmax()))
    return out[len(ids) :]
