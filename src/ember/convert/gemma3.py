"""Gemma 3 text models: RMSNorm weights stored as (w - 1) in HF, so +1 here;
tied embeddings (no lm_head); sliding-window pattern and local rope base keys.
For the multimodal Gemma3ForConditionalGeneration this is the text model (its
``text_config`` and ``language_model`` tensors); the vision tower is its
companion, the projector (:mod:`ember.convert.vision.gemma3`)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import gguf
import numpy as np

from ember.convert.base import Model, Planned, lazy
from ember.convert.source import TensorRef, to_float32
from ember.convert.vision.gemma3 import Gemma3Projector


def _plus_one(a: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    return to_float32(a) + np.float32(1.0)


class Gemma3Model(Model):
    gguf_arch = gguf.MODEL_ARCH.GEMMA3

    def __init__(self, model_dir: Any, hparams: dict[str, Any], config_file: Any) -> None:
        if "text_config" in hparams and "num_hidden_layers" not in hparams:
            hparams = {**hparams, **hparams["text_config"]}
        super().__init__(model_dir, hparams, config_file)

    def companions(self) -> list[Model]:
        return [Gemma3Projector(self.model_dir, self.hparams, self.config_file)] if isinstance(self.hparams.get("vision_config"), dict) else []

    def rename(self, name: str) -> str:
        return name.replace("model.language_model.", "model.").replace("language_model.model.", "model.")

    def skip(self, name: str) -> bool:
        return super().skip(name) or name.startswith(("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector."))

    def modify(self, name: str, ref: TensorRef) -> Iterable[Planned]:
        if name.endswith("norm.weight"):
            yield Planned(self.map_name(name), ref.shape, ref.dtype, lazy(_plus_one, ref))
        elif name == "lm_head.weight" and self.hparams.get("tie_word_embeddings", True):
            return  # tied to token_embd
        else:
            yield from super().modify(name, ref)

    def set_parameters(self, w: gguf.GGUFWriter) -> None:
        super().set_parameters(w)
        hp = self.hparams
        w.add_key_length(self.head_dim)
        w.add_value_length(self.head_dim)
        if hp.get("final_logit_softcapping"):
            w.add_final_logit_softcapping(float(hp["final_logit_softcapping"]))
        if hp.get("sliding_window"):
            w.add_sliding_window(int(hp["sliding_window"]))
            layer_types = hp.get("layer_types")
            if isinstance(layer_types, list) and len(layer_types) == self.block_count:
                w.add_sliding_window_pattern([t == "sliding_attention" for t in layer_types])
        rp = hp.get("rope_parameters") or {}
        local = (rp.get("sliding_attention") or {}).get("rope_theta") if isinstance(rp, dict) else None
        local = local or hp.get("rope_local_base_freq")
        if local:
            w.add_rope_freq_base_swa(float(local))
        if self.rope_params().get("rope_theta") is None:
            w.add_rope_freq_base(1_000_000.0)

    def vocab_options(self) -> dict[str, Any]:
        return {"add_space_prefix": False}
