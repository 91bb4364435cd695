"""Hugging Face checkpoints -> GGUF (``convert_model``, or ``plan`` then
``write``) and PEFT LoRA adapters -> GGUF adapters (``convert_lora``).

Modules: ``pipeline`` (plan and write), ``architectures`` (which module
converts which Hugging Face architecture), ``base`` (what an architecture
module subclasses), one module per architecture, ``source`` (config and lazy
tensors of a checkpoint), ``tokenizer``, ``cast`` (tensor data into GGML
types), ``writer`` (GGUF files, the only code that knows gguf-py's writer),
``lora``."""

from __future__ import annotations

from ember.convert.architectures import supported_architectures
from ember.convert.lora import convert_lora
from ember.convert.pipeline import ConversionPlan, Output, convert_model, plan, write
from ember.errors import ConversionError, InvalidFileError

__all__ = ["convert_model", "plan", "write", "ConversionPlan", "Output", "convert_lora", "supported_architectures", "ConversionError", "InvalidFileError"]
