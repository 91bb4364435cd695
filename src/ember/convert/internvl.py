"""InternVL 2.5 / 3: a vision encoder plus a language model (Qwen2 or
InternLM2). This is the language model: its config comes from ``llm_config``
(original ``InternVLChatModel``) or ``text_config`` (transformers'
``InternVLForConditionalGeneration``) and its tensors lose their prefix
(``language_model.``, or ``model.language_model.`` beside a top-level
``lm_head``); vision tensors are skipped here and go to its companion, the
projector (:mod:`ember.convert.vision.internvl`). No patched config needed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ember.convert.architectures import model_class
from ember.convert.base import Model
from ember.convert.vision.internvl import InternVLProjector
from ember.errors import ConversionError

PREFIX = "language_model."
NATIVE_PREFIX = "model.language_model."

# transformers' text_config names its model_type, not its class
_BY_MODEL_TYPE = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM", "internlm2": "InternLM2ForCausalLM"}


def _text_name(name: str) -> str | None:
    """The language model's own name for a checkpoint tensor, None for vision ones."""
    if name.startswith(NATIVE_PREFIX):
        return "model." + name[len(NATIVE_PREFIX) :]
    if name.startswith(PREFIX):
        return name[len(PREFIX) :]
    if name.startswith("lm_head."):
        return name
    return None


class InternVLModel(Model):
    """Never built itself: :meth:`from_config` gives the language model's converter."""

    @classmethod
    def from_config(cls, model_dir: Path, hparams: dict[str, Any], config_file: Path) -> Model:
        llm = hparams.get("llm_config") or hparams.get("text_config")
        if not isinstance(llm, dict):
            raise ConversionError(f"{config_file}: an InternVL config needs an 'llm_config' object describing its language model")
        archs = llm.get("architectures") or ([_BY_MODEL_TYPE[llm["model_type"]]] if llm.get("model_type") in _BY_MODEL_TYPE else [])
        inner = model_class(str(archs[0])) if archs else None
        if inner is None or issubclass(inner, InternVLModel):
            raise ConversionError(f"{config_file}: llm_config.architectures {archs!r} is not a supported language model (Qwen2ForCausalLM, InternLM2ForCausalLM, LlamaForCausalLM)")

        class Extracted(inner):  # type: ignore[misc, valid-type]
            def skip(self, name: str) -> bool:
                text = _text_name(name)
                return text is None or super().skip(text)

            def rename(self, name: str) -> str:
                return str(super().rename(_text_name(name) or name))

            def companions(self) -> list[Model]:
                return [InternVLProjector(model_dir, hparams, config_file)] if isinstance(hparams.get("vision_config"), dict) else []

        Extracted.__name__ = f"InternVL{inner.__name__}"
        merged = {"architectures": archs, **llm}
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if key in hparams and key not in merged:
                merged[key] = hparams[key]
        return Extracted(model_dir, merged, config_file)
