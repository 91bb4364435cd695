"""The model registry: Ollama-compatible names, Modelfiles, content-addressed
blobs and manifests under ``$EMBER_MODELS``; create, list, show, cp, rm, pull.

``resolve`` is what ``ember run`` and the server call to turn a name (or a
GGUF path) into the files, template, system prompt and parameters to load.

Dependencies run one way: ``create`` and ``pull`` (``hub``, ``remote``) build
on ``assemble`` (layers and manifests), ``derive`` (conversion and
quantization in a work folder) and ``core`` (reading), all on ``store``.

The package imports nothing itself: ``ember list`` loads :mod:`listing` and
:mod:`store` without the GGUF reader or the template engine; import names
from the module that defines them.
"""
