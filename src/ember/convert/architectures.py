"""Which converter handles which Hugging Face architecture.

The table names, for each ``architectures[0]`` of a config.json, the module
and the :class:`~ember.convert.base.Model` subclass that converts it
(``"module:Class"``, as entry points are written). Modules are imported by
name on first use, so converting a Llama never imports the Baichuan code and
no architecture module imports a registry back. Adding an architecture is one
new module and one line here.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from ember.convert.base import Model
from ember.convert.source import load_config
from ember.errors import ConversionError

ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "ember.convert.llama:LlamaModel",
    "LLaMAForCausalLM": "ember.convert.llama:LlamaModel",
    "MistralForCausalLM": "ember.convert.mistral:MistralModel",
    "Qwen2ForCausalLM": "ember.convert.qwen:Qwen2Model",
    "Qwen3ForCausalLM": "ember.convert.qwen:Qwen3Model",
    "Gemma3ForCausalLM": "ember.convert.gemma3:Gemma3Model",
    "Gemma3ForConditionalGeneration": "ember.convert.gemma3:Gemma3Model",
    "InternLM2ForCausalLM": "ember.convert.internlm2:InternLM2Model",
    "BaichuanForCausalLM": "ember.convert.baichuan:BaichuanModel",
    "BaiChuanForCausalLM": "ember.convert.baichuan:BaichuanModel",
    "InternVLChatModel": "ember.convert.internvl:InternVLModel",
    "InternVLForConditionalGeneration": "ember.convert.internvl:InternVLModel",
    "Qwen2_5_VLForConditionalGeneration": "ember.convert.qwen2vl:Qwen25VLTextModel",
}


def supported_architectures() -> list[str]:
    return sorted(ARCHITECTURES)


def model_class(hf_arch: str) -> type[Model] | None:
    """The converter class for a Hugging Face architecture name (None if unsupported)."""
    target = ARCHITECTURES.get(hf_arch)
    if target is None:
        return None
    module, _, name = target.partition(":")
    cls = getattr(importlib.import_module(module), name)
    if not (isinstance(cls, type) and issubclass(cls, Model)):
        raise TypeError(f"{target} (for {hf_arch}) is not a Model subclass")
    return cls


def make_model(model_dir: Path) -> Model:
    """The converter for a Hugging Face model folder, chosen by its config.json."""
    hparams, config_file = load_config(model_dir)
    archs = hparams.get("architectures")
    if not isinstance(archs, list) or not archs:
        raise ConversionError(f"{config_file}: no 'architectures' list; add the model class name, e.g. \"architectures\": [\"LlamaForCausalLM\"]")
    arch = str(archs[0])
    cls = model_class(arch)
    if cls is None:
        raise ConversionError(f"{config_file}: architecture {arch!r} is not supported; supported: {', '.join(supported_architectures())}")
    return cls.from_config(model_dir, hparams, config_file)
