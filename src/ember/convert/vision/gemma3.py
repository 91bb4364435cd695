"""Gemma 3 vision: a SigLIP tower without its pooling head, average-pooled to
``mm_tokens_per_image`` tokens, RMS-normed (Gemma's ``1 + w`` weight, so +1
here) and projected by a plain matrix. Checkpoints on the hub store the tower
under ``vision_tower.vision_model.``; transformers 5 saves it under
``vision_tower.`` with a ``head`` it never uses: both are accepted, the head
is dropped. Images are resized (bilinear) to one square ``image_size``."""

from __future__ import annotations

import math
from collections.abc import Iterable

import gguf

from ember.convert.base import Planned
from ember.convert.source import TensorRef
from ember.convert.vision.base import Projector, V, block_id, same, square_size, tensor_name, transformed
from ember.errors import ConversionError

_BLOCK = {
    "self_attn.q_proj": V.V_ENC_ATTN_Q,
    "self_attn.k_proj": V.V_ENC_ATTN_K,
    "self_attn.v_proj": V.V_ENC_ATTN_V,
    "self_attn.out_proj": V.V_ENC_ATTN_O,
    "layer_norm1": V.V_ENC_INPUT_NORM,
    "layer_norm2": V.V_ENC_POST_ATTN_NORM,
    "mlp.fc1": V.V_ENC_FFN_UP,
    "mlp.fc2": V.V_ENC_FFN_DOWN,
}


class Gemma3Projector(Projector):
    projector_type = gguf.VisionProjectorType.GEMMA3
    prefixes = (
        ("vision_tower.vision_model.", "v."),
        ("model.vision_tower.vision_model.", "v."),
        ("model.vision_tower.", "v."),
        ("vision_tower.", "v."),
        ("model.multi_modal_projector.", "mm."),
        ("multi_modal_projector.", "mm."),
    )

    def modify(self, name: str, ref: TensorRef) -> Iterable[Planned]:
        rest = name.partition(".")[2]
        if name.startswith("mm."):
            if rest == "mm_input_projection_weight":
                yield same(tensor_name(V.V_MM_INP_PROJ), ref)
            elif rest == "mm_soft_emb_norm.weight":
                yield transformed(tensor_name(V.V_MM_SOFT_EMB_NORM), ref, lambda a: a + 1.0, ref.shape)
            else:
                raise self.unknown(name)
            return
        if rest.startswith("head."):
            return  # SigLIP's attention-pooling head: Gemma 3 does not use it
        module, _, suffix = rest.rpartition(".")
        if module == "embeddings.patch_embedding":
            yield same(tensor_name(V.V_ENC_EMBD_PATCH, suffix), ref, keep_f32=True)
        elif module == "embeddings.position_embedding":
            yield same(tensor_name(V.V_ENC_EMBD_POS, suffix), ref, keep_f32=True)
        elif module == "post_layernorm":
            yield same(tensor_name(V.V_POST_NORM, suffix), ref)
        elif module.startswith("encoder.layers.") and (bid := block_id(rest)) is not None and bid < self.block_count:
            kind = _BLOCK.get(module.split(".", 3)[3])
            if kind is None:
                raise self.unknown(name)
            yield same(tensor_name(kind, suffix, bid), ref)
        else:
            raise self.unknown(name)

    def required(self) -> list[str]:
        names = [tensor_name(V.V_ENC_EMBD_PATCH), tensor_name(V.V_ENC_EMBD_POS), tensor_name(V.V_MM_INP_PROJ), tensor_name(V.V_MM_SOFT_EMB_NORM)]
        for bid in range(self.block_count):
            names += self.block_tensors(bid)
        return names

    def set_vision_parameters(self, w: gguf.GGUFWriter) -> None:
        image_size, patch = square_size(self.vp("image_size")), square_size(self.vp("patch_size"))
        w.add_vision_image_size(image_size)
        mean, std = self.mean_std([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])
        w.add_vision_image_mean(mean)
        w.add_vision_image_std(std)
        w.add_vision_attention_layernorm_eps(float(self.vp("layer_norm_eps", default=1e-6)))
        w.add_vision_use_gelu(True)
        tokens = int(self.hparams.get("mm_tokens_per_image", self.preprocessor.get("image_seq_length", 256)))
        side = math.isqrt(tokens)
        per_side = image_size // patch
        if side * side != tokens or side == 0 or per_side % side:
            raise ConversionError(f"{self.config_file}: mm_tokens_per_image {tokens} does not pool the {per_side}x{per_side} patch grid evenly")
        w.add_vision_projector_scale_factor(per_side // side)
