"""Vision projectors: the image half of a vision-language checkpoint -> the
``clip`` GGUF that libmtmd loads beside the language model's GGUF. One module
per architecture, each a :class:`~ember.convert.vision.base.Projector` (a
:class:`~ember.convert.base.Model` with ``gguf_type`` mmproj) that the
language model's converter returns from ``companions()``; the pipeline plans
and writes it beside the model as ``mmproj-<name>.gguf``."""
