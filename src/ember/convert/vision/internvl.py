"""InternVL 2.5 / 3 vision: InternViT (CLS token, fused or split q/k/v, layer
scales), pixel shuffle by ``1 / downsample_ratio``, then an MLP projector
(LayerNorm, Linear, GELU, Linear). Two layouts: the original
``InternVLChatModel`` (``vision_model.*``, ``mlp1.*``) and transformers'
``InternVLForConditionalGeneration`` (``vision_tower.*``,
``multi_modal_projector.*``, optionally under ``model.``). Images are tiled
dynamically (``min/max_dynamic_patch``) with a thumbnail last."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from ember.convert.base import Planned
from ember.convert.source import TensorRef
from ember.convert.vision.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Projector,
    V,
    block_id,
    same,
    split_rows,
    square_size,
    tensor_name,
    transformed,
)
from ember.errors import ConversionError

# per-layer source names (both layouts) -> GGUF tensor kinds
_BLOCK = {
    # original InternVisionModel
    "attn.proj": V.V_ENC_ATTN_O,
    "attn.q_norm": V.V_ENC_ATTN_Q_NORM,
    "attn.k_norm": V.V_ENC_ATTN_K_NORM,
    "norm1": V.V_ENC_INPUT_NORM,
    "norm2": V.V_ENC_POST_ATTN_NORM,
    "ls1": V.V_LAYER_SCALE_1,
    "ls2": V.V_LAYER_SCALE_2,
    "mlp.fc1": V.V_ENC_FFN_UP,
    "mlp.fc2": V.V_ENC_FFN_DOWN,
    # transformers' InternVLVisionModel
    "attention.q_proj": V.V_ENC_ATTN_Q,
    "attention.k_proj": V.V_ENC_ATTN_K,
    "attention.v_proj": V.V_ENC_ATTN_V,
    "attention.projection_layer": V.V_ENC_ATTN_O,
    "attention.q_norm": V.V_ENC_ATTN_Q_NORM,
    "attention.k_norm": V.V_ENC_ATTN_K_NORM,
    "layernorm_before": V.V_ENC_INPUT_NORM,
    "layernorm_after": V.V_ENC_POST_ATTN_NORM,
    "lambda_1": V.V_LAYER_SCALE_1,
    "lambda_2": V.V_LAYER_SCALE_2,
}

_GLOBAL = {
    "embeddings.class_embedding": V.V_ENC_EMBD_CLS,
    "embeddings.cls_token": V.V_ENC_EMBD_CLS,
    "embeddings.patch_embedding": V.V_ENC_EMBD_PATCH,
    "embeddings.patch_embeddings.projection": V.V_ENC_EMBD_PATCH,
    "embeddings.position_embedding": V.V_ENC_EMBD_POS,
    "embeddings.position_embeddings": V.V_ENC_EMBD_POS,
}

# projector: mm.model.mlp.{0: LayerNorm, 1: Linear, 3: Linear}
_MLP = {"mlp1.0": 0, "mlp1.1": 1, "mlp1.3": 3, "layer_norm": 0, "linear_1": 1, "linear_2": 3}


def _cls_row_last(a: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """transformers puts the CLS token first, with position row 0; clip's
    graph appends it after the patches and adds the rows in that order. Moving
    row 0 last gives every token its own row (attention does not care about
    the order), where an unchanged table shifts every patch by one row."""
    rows = a.reshape(-1, a.shape[-1])
    return np.concatenate([rows[1:], rows[:1]]).reshape(a.shape)


class InternVLProjector(Projector):
    projector_type = gguf.VisionProjectorType.INTERNVL
    prefixes = (
        ("vision_model.", "v."),
        ("model.vision_tower.", "v."),
        ("vision_tower.", "v."),
        ("mlp1.", "mm.mlp1."),
        ("model.multi_modal_projector.", "mm."),
        ("multi_modal_projector.", "mm."),
    )

    def __init__(self, model_dir: Path, hparams: dict[str, Any], config_file: Path) -> None:
        super().__init__(model_dir, hparams, config_file)
        layer = hparams.get("select_layer", hparams.get("vision_feature_layer", -1))
        if layer != -1:
            raise ConversionError(f"{self.config_file}: select_layer {layer} is not supported (llama.cpp's InternVL encoder uses the last layer)")
        if self.vp("hidden_act", default="gelu") not in ("gelu", "silu"):
            raise ConversionError(f"{self.config_file}: vision hidden_act {self.vision['hidden_act']!r} is not supported; gelu or silu")

    def modify(self, name: str, ref: TensorRef) -> Iterable[Planned]:
        tower, _, rest = name.partition(".")
        if tower == "mm":
            module, _, suffix = rest.rpartition(".")
            idx = _MLP.get(module)
            if idx is None:
                raise self.unknown(name)
            yield same(tensor_name(V.V_MMPROJ_MLP, suffix, idx), ref)
            return
        for src, kind in _GLOBAL.items():
            if rest == src or rest.startswith(src + "."):
                suffix = rest[len(src) + 1 :] or ("" if kind == V.V_ENC_EMBD_CLS else "weight")  # clip: "v.class_embd"
                if kind == V.V_ENC_EMBD_POS:
                    yield transformed(tensor_name(kind, suffix), ref, _cls_row_last, ref.shape, keep_f32=True)
                else:
                    yield same(tensor_name(kind, suffix), ref, keep_f32=kind != V.V_ENC_EMBD_PATCH)
                return
        bid = block_id(rest)
        if bid is None or not rest.startswith(("encoder.layers.", "encoder.layer.")) or bid >= self.block_count:
            raise self.unknown(name)
        local = rest.split(".", 3)[3]  # after encoder.layer(s).N.
        module, _, suffix = local.rpartition(".")
        if local in ("ls1", "ls2", "lambda_1", "lambda_2"):
            module, suffix = local, "weight"
        if module == "attn.qkv":
            yield from split_rows([tensor_name(k, suffix, bid) for k in (V.V_ENC_ATTN_Q, V.V_ENC_ATTN_K, V.V_ENC_ATTN_V)], ref)
            return
        block_kind = _BLOCK.get(module)
        if block_kind is None:
            raise self.unknown(name)
        yield same(tensor_name(block_kind, suffix, bid), ref)

    def required(self) -> list[str]:
        names = [tensor_name(V.V_ENC_EMBD_CLS, ""), tensor_name(V.V_ENC_EMBD_PATCH), tensor_name(V.V_ENC_EMBD_POS)]
        names += [tensor_name(V.V_MMPROJ_MLP, "weight", i) for i in (0, 1, 3)]
        for bid in range(self.block_count):
            names += self.block_tensors(bid)
        return names

    def set_vision_parameters(self, w: gguf.GGUFWriter) -> None:
        w.add_vision_image_size(square_size(self.vp("image_size")))
        mean, std = self.mean_std(IMAGENET_MEAN, IMAGENET_STD)
        w.add_vision_image_mean(mean)
        w.add_vision_image_std(std)
        w.add_vision_attention_layernorm_eps(float(self.vp("layer_norm_eps", default=1e-6)))
        if self.vp("hidden_act", default="gelu") == "silu":
            w.add_vision_use_silu(True)
        else:
            w.add_vision_use_gelu(True)
        ratio = float(self.hparams.get("downsample_ratio", 0.5))
        if ratio <= 0 or abs(1 / ratio - round(1 / ratio)) > 1e-6:
            raise ConversionError(f"{self.config_file}: downsample_ratio {ratio} is not 1/n")
        w.add_vision_projector_scale_factor(round(1 / ratio))
        # tiling limits: config.json (original) or the image processor (transformers)
        lo = self.hparams.get("min_dynamic_patch", self.preprocessor.get("min_patches"))
        hi = self.hparams.get("max_dynamic_patch", self.preprocessor.get("max_patches"))
        if self.hparams.get("dynamic_image_size") is False or self.preprocessor.get("crop_to_patches") is False:
            lo = hi = 1
        if lo is not None:
            w.add_vision_preproc_min_tiles(int(lo))
        if hi is not None:
            w.add_vision_preproc_max_tiles(int(hi))
