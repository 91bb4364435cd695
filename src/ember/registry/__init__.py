"""The model registry: Ollama-compatible names, Modelfiles, content-addressed
blobs and manifests under ``$EMBER_MODELS``; create, list, show, cp, rm, pull.

``resolve`` is what ``ember run`` and the server call to turn a name (or a
GGUF path) into the files, template, system prompt and parameters to load.

Dependencies run one way: ``create`` and ``pull`` (``hub``, ``remote``) build
on ``assemble`` (layers and manifests), ``derive`` (conversion and
quantization in a work folder) and ``core`` (reading), all on ``store``.
"""

from __future__ import annotations

from ember.gguf.inspect import format_params
from ember.registry.core import (
    ModelEntry,
    ResolvedModel,
    copy_model,
    delete_model,
    list_models,
    resolve,
)
from ember.registry.create import create_model
from ember.registry.modelfile import Modelfile, parse_modelfile, read_modelfile
from ember.registry.names import ModelName, parse_name
from ember.registry.pull import pull_model
from ember.registry.show import ModelDetails, show_model

__all__ = [
    "ModelDetails",
    "ModelEntry",
    "ModelName",
    "Modelfile",
    "ResolvedModel",
    "copy_model",
    "create_model",
    "delete_model",
    "format_params",
    "list_models",
    "parse_modelfile",
    "parse_name",
    "pull_model",
    "read_modelfile",
    "resolve",
    "show_model",
]
