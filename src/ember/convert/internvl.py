"""InternVL 2.5 / 3: a vision encoder plus a language model (Qwen2 or
InternLM2) stored under ``language_model.``. Only the language model is
converted: its config comes from ``llm_config`` and its tensors lose the
prefix; vision tensors are skipped. No patched config needed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ember.convert.architectures import model_class
from ember.convert.base import Model
from ember.errors import ConversionError

PREFIX = "language_model."


class InternVLModel(Model):
    """Never built itself: :meth:`from_config` gives the language model's converter."""

    @classmethod
    def from_config(cls, model_dir: Path, hparams: dict[str, Any], config_file: Path) -> Model:
        llm = hparams.get("llm_config") or hparams.get("text_config")
        if not isinstance(llm, dict):
            raise ConversionError(f"{config_file}: an InternVL config needs an 'llm_config' object describing its language model")
        archs = llm.get("architectures") or []
        inner = model_class(str(archs[0])) if archs else None
        if inner is None or issubclass(inner, InternVLModel):
            raise ConversionError(f"{config_file}: llm_config.architectures {archs!r} is not a supported language model (Qwen2ForCausalLM, InternLM2ForCausalLM, LlamaForCausalLM)")

        class Extracted(inner):  # type: ignore[misc, valid-type]
            def skip(self, name: str) -> bool:
                return not name.startswith(PREFIX) or super().skip(name[len(PREFIX) :])

            def rename(self, name: str) -> str:
                return str(super().rename(name[len(PREFIX) :]))

        Extracted.__name__ = f"InternVL{inner.__name__}"
        merged = dict(llm)
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if key in hparams and key not in merged:
                merged[key] = hparams[key]
        return Extracted(model_dir, merged, config_file)
