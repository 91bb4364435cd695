"""The language model of Qwen2.5-VL (llama.cpp's ``qwen2vl``): Qwen2 with
multimodal rotary positions (M-RoPE), whose sections (time, height, width)
split each head's rotary pairs. Its config is at the top level (hub) or in
``text_config`` (transformers 5); its tensors under ``model.`` or
``model.language_model.``. The vision tower is its companion, the projector
(:mod:`ember.convert.vision.qwen25vl`)."""

from __future__ import annotations

from typing import Any

import gguf

from ember.convert.base import Model
from ember.convert.vision.qwen25vl import Qwen25VLProjector
from ember.errors import ConversionError


class Qwen25VLTextModel(Model):
    gguf_arch = gguf.MODEL_ARCH.QWEN2VL

    def __init__(self, model_dir: Any, hparams: dict[str, Any], config_file: Any) -> None:
        if isinstance(hparams.get("text_config"), dict):
            hparams = {**hparams, **hparams["text_config"]}
        super().__init__(model_dir, hparams, config_file)

    def companions(self) -> list[Model]:
        return [Qwen25VLProjector(self.model_dir, self.hparams, self.config_file)] if isinstance(self.hparams.get("vision_config"), dict) else []

    def skip(self, name: str) -> bool:
        return super().skip(name) or name.startswith(("visual.", "model.visual."))

    def rename(self, name: str) -> str:
        return name.replace("model.language_model.", "model.", 1)

    def rope_params(self) -> dict[str, Any]:
        rp = super().rope_params()
        if str(rp.get("rope_type", "")).lower() == "mrope":
            rp["rope_type"] = "default"  # M-RoPE is the architecture, not a scaling
        return rp

    def set_parameters(self, w: gguf.GGUFWriter) -> None:
        super().set_parameters(w)
        sections = super().rope_params().get("mrope_section")
        if not isinstance(sections, list) or not 1 <= len(sections) <= 4:
            raise ConversionError(f"{self.config_file}: no mrope_section in rope_parameters (or rope_scaling); a Qwen2.5-VL config needs it")
        if sum(sections) * 2 != self.head_dim:
            raise ConversionError(f"{self.config_file}: mrope_section {sections} covers {sum(sections) * 2} of the head's {self.head_dim} dimensions")
        w.add_rope_dimension_sections([int(s) for s in sections] + [0] * (4 - len(sections)))
