"""Qwen2.5-VL vision: a ViT with 2-D rotary positions, RMS norms, SwiGLU
MLPs and window attention (full attention every ``fullatt_block_indexes``),
then a 2x2 patch merger MLP. The 3-D patch convolution (two video frames) is
split into two 2-D ones, as clip expects. Images keep their aspect ratio,
resized (bicubic) to multiples of 28 pixels within the processor's pixel
limits. Tensors live under ``visual.`` (hub) or ``model.visual.``."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import gguf

from ember.convert.base import Planned
from ember.convert.source import TensorRef
from ember.convert.vision.base import Projector, V, block_id, same, split_rows, tensor_name, transformed
from ember.errors import ConversionError

OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

_BLOCK = {
    "attn.proj": V.V_ENC_ATTN_O,
    "norm1": V.V_ENC_INPUT_NORM,
    "norm2": V.V_ENC_POST_ATTN_NORM,
    "mlp.gate_proj": V.V_ENC_FFN_GATE,
    "mlp.up_proj": V.V_ENC_FFN_UP,
    "mlp.down_proj": V.V_ENC_FFN_DOWN,
}


class Qwen25VLProjector(Projector):
    projector_type = gguf.VisionProjectorType.QWEN25VL
    prefixes = (("visual.", "v."), ("model.visual.", "v."))

    def __init__(self, model_dir: Path, hparams: dict[str, Any], config_file: Path) -> None:
        super().__init__(model_dir, hparams, config_file)
        checks = {"spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112}
        for key, want in checks.items():
            if int(self.vp(key, default=want)) != want:
                raise ConversionError(f"{self.config_file}: vision_config {key} {self.vision[key]} is not supported; llama.cpp's Qwen2.5-VL encoder is built for {want}")
        full = self.vp("fullatt_block_indexes")
        step = full[0] + 1 if full else 0
        if not full or any(b - a != step for a, b in zip(full, full[1:])) or full[0] != step - 1:
            raise ConversionError(f"{self.config_file}: fullatt_block_indexes {full} is not a regular pattern (every n-th layer), which llama.cpp needs")
        self.n_wa_pattern = step

    def modify(self, name: str, ref: TensorRef) -> Iterable[Planned]:
        rest = name.partition(".")[2]
        module, _, suffix = rest.rpartition(".")
        if module == "patch_embed.proj":
            if len(ref.shape) != 5 or ref.shape[2] != 2:
                raise ConversionError(f"{ref.file}: {ref.name} has shape {list(ref.shape)}; expected a temporal patch of 2 frames")
            shape = (ref.shape[0], ref.shape[1], ref.shape[3], ref.shape[4])
            yield transformed(tensor_name(V.V_ENC_EMBD_PATCH), ref, lambda a: a[:, :, 0], shape)
            yield transformed(tensor_name(V.V_ENC_EMBD_PATCH) + ".1", ref, lambda a: a[:, :, 1], shape)
        elif module == "merger.ln_q":
            yield same(tensor_name(V.V_POST_NORM, suffix), ref)
        elif module in ("merger.mlp.0", "merger.mlp.2"):
            yield same(tensor_name(V.V_MMPROJ, suffix, int(module[-1])), ref)
        elif module.startswith("blocks.") and (bid := block_id(rest)) is not None and bid < self.block_count:
            local = module.split(".", 2)[2]
            if local == "attn.qkv":
                yield from split_rows([tensor_name(k, suffix, bid) for k in (V.V_ENC_ATTN_Q, V.V_ENC_ATTN_K, V.V_ENC_ATTN_V)], ref)
            elif (kind := _BLOCK.get(local)) is not None:
                yield same(tensor_name(kind, suffix, bid), ref)
            else:
                raise self.unknown(name)
        else:
            raise self.unknown(name)

    def required(self) -> list[str]:
        names = [tensor_name(V.V_ENC_EMBD_PATCH), tensor_name(V.V_ENC_EMBD_PATCH) + ".1", tensor_name(V.V_POST_NORM)]
        names += [tensor_name(V.V_MMPROJ, "weight", i) for i in (0, 2)]
        for bid in range(self.block_count):
            names += self.block_tensors(bid) + [tensor_name(V.V_ENC_FFN_GATE, "weight", bid)]
        return names

    def text_hidden_size(self) -> int:
        return int(self.vp("out_hidden_size", default=super().text_hidden_size()))

    def set_vision_parameters(self, w: gguf.GGUFWriter) -> None:
        w.add_vision_image_size(int(self.vp("image_size", default=560)))  # only sizes the warm-up image
        mean, std = self.mean_std(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
        w.add_vision_image_mean(mean)
        w.add_vision_image_std(std)
        w.add_vision_use_silu(True)
        w.add_vision_n_wa_pattern(self.n_wa_pattern)
        w.add_vision_spatial_merge_size(2)
        w.add_vision_window_size(112)
        w.add_vision_attention_layernorm_eps(1e-6)  # transformers' Qwen2.5-VL tower hard-codes it
        # The processor's pixel limits: the engine turns them into libmtmd's
        # image_min_tokens / image_max_tokens so images are resized as in transformers.
        lo = self.preprocessor.get("min_pixels") or (self.preprocessor.get("size") or {}).get("shortest_edge")
        hi = self.preprocessor.get("max_pixels") or (self.preprocessor.get("size") or {}).get("longest_edge")
        if lo:
            w.add_vision_min_pixels(int(lo))
        if hi:
            w.add_vision_max_pixels(int(hi))
