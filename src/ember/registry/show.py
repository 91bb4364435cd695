"""``ember show`` and ``/api/show``: a model's Modelfile, parameters, template,
details, capabilities and GGUF metadata, in Ollama's shapes.

Ollama's rules, followed here: ``model_info`` holds the model GGUF's metadata
with arrays of more than 5 items as ``[]`` unless ``verbose`` (then in full),
without ``general.name`` and ``tokenizer.chat_template``; ``projector_info``
the same for a projector; ``tensors`` (name, type, shape) only with
``verbose``; ``parameters`` one ``name value`` line per value, the name padded
to 30 characters and the value in Go's ``%#v`` (``stop "<|im_end|>"``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ember.errors import InvalidNameError, TemplateError
from ember.gguf import GGUFHeader, read_array
from ember.gguf.inspect import format_params
from ember.registry import ggufmeta
from ember.registry.core import ResolvedModel, find_model, from_manifest, resolve
from ember.registry.listing import details_of, iso_time
from ember.registry.modelfile import Modelfile
from ember.templates import ChatTemplate
from ember.templates.gotemplate import go_sprintf

SHORT_ARRAY = 5  # longer arrays are [] in model_info unless verbose (Ollama)
HIDDEN_KEYS = ("general.name", "tokenizer.chat_template")


@dataclass
class ModelDetails:
    name: str
    modelfile: str
    parameters: str  # Ollama's text form: one "name value" line per value
    template: str | None
    system: str | None
    license: list[str]
    messages: list[dict[str, str]]
    details: dict[str, Any]
    model_info: dict[str, Any]  # Ollama's model_info (JSON values)
    digest: str | None
    modified_at: datetime | None
    resolved: ResolvedModel
    capabilities: list[str] = field(default_factory=list)
    projector_info: dict[str, Any] = field(default_factory=dict)
    tensors: list[dict[str, Any]] | None = None  # with verbose only
    metadata: dict[str, Any] = field(default_factory=dict)  # every key, long values summarized (ember show -v)

    def to_json(self) -> dict[str, Any]:
        """Ollama's ``/api/show`` response body."""
        out: dict[str, Any] = {
            "modelfile": self.modelfile,
            "parameters": self.parameters,
            "template": self.template or "",
            "details": self.details,
            "model_info": self.model_info,
            "capabilities": self.capabilities,
        }
        if self.modified_at is not None:
            out["modified_at"] = iso_time(self.modified_at)
        if self.system:
            out["system"] = self.system
        if self.license:
            out["license"] = "\n".join(self.license)
        if self.messages:
            out["messages"] = self.messages
        if self.projector_info:
            out["projector_info"] = self.projector_info
        if self.tensors is not None:
            out["tensors"] = self.tensors
        return out


def show_model(name: str, *, verbose: bool = False) -> ModelDetails:
    """Details of a registry model, or of a GGUF file (from its own metadata)."""
    try:
        m = find_model(name)
    except InvalidNameError:
        m = None
    r = from_manifest(m) if m is not None else resolve(name)
    infos = [ggufmeta.read_info(p) for p in r.model_paths]
    first = infos[0]
    assert first.header is not None
    n_params = sum(i.n_params for i in infos)
    if m is not None:
        details = details_of(m)
    else:
        arch = first.architecture or ""
        details = {"parent_model": "", "format": "gguf", "family": arch, "families": [arch] if arch else None,
                   "parameter_size": format_params(n_params), "quantization_level": first.file_type or ""}
    model_info = model_info_json(first.header, verbose)
    model_info["general.parameter_count"] = n_params
    projector_info: dict[str, Any] = {}
    if r.projector_paths:
        proj = ggufmeta.read_info(r.projector_paths[0])
        assert proj.header is not None
        projector_info = model_info_json(proj.header, verbose)
    metadata = dict(first.metadata)
    metadata["general.parameter_count"] = n_params
    tensors = None
    if verbose:
        tensors = [{"name": t.name, "type": t.type.name, "shape": list(t.shape)}
                   for i in infos if i.header is not None for t in i.header.tensors]
    return ModelDetails(
        name=r.name,
        modelfile=modelfile_text(r),
        parameters=parameters_text(r.parameters),
        template=r.template,
        system=r.system,
        license=r.license,
        messages=r.messages,
        details=details,
        model_info=model_info,
        digest=r.digest,
        modified_at=r.modified_at,
        resolved=r,
        capabilities=capabilities(r, first.header),
        projector_info=projector_info,
        tensors=tensors,
        metadata=metadata,
    )


def model_info_json(header: GGUFHeader, verbose: bool) -> dict[str, Any]:
    """A GGUF's metadata as Ollama's ``model_info``: JSON values, long arrays
    ``[]`` unless ``verbose``."""
    out: dict[str, Any] = {}
    for key, kv in header.kv.items():
        if key in HIDDEN_KEYS:
            continue
        if kv.is_array:
            if kv.count > SHORT_ARRAY and not verbose:
                out[key] = []
            else:
                out[key] = [_json_value(v) for v in read_array(header, key)]
        else:
            out[key] = _json_value(kv.value)
    return out


def _json_value(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, str):
        return v.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    if isinstance(v, float) and not math.isfinite(v):
        return None  # JSON has no NaN or infinity
    return v


def capabilities(r: ResolvedModel, header: GGUFHeader) -> list[str]:
    """Ollama's capabilities: ``completion`` (or ``embedding`` for a model with a
    pooling type), what the parsed template can take (``tools``, ``insert``,
    ``thinking``: the Modelfile's template, else the GGUF's chat template),
    ``vision`` with a projector."""
    arch = header.get("general.architecture") or ""
    caps = ["embedding" if header.get(f"{arch}.pooling_type") is not None else "completion"]
    text = r.template if r.template is not None else header.get("tokenizer.chat_template")
    if isinstance(text, str) and text:
        try:
            caps += ChatTemplate.parse(text).capabilities
        except TemplateError:
            pass
    if r.projector_paths or header.get(f"{arch}.vision.block_count") is not None:
        caps.append("vision")
    return caps


def parameters_text(params: dict[str, Any]) -> str:
    """Ollama's ``parameters``: ``%-30s %#v`` per value (lists give one line each)."""
    lines = []
    for name, value in params.items():
        for v in value if isinstance(value, list) else [value]:
            lines.append(go_sprintf("%-*s %#v", 30, name, v))
    return "\n".join(lines)


def modelfile_text(r: ResolvedModel) -> str:
    """Ollama's ``show --modelfile``: FROM the blob paths, so the text creates
    the same model again."""
    out = [
        '# Modelfile generated by "ember show"',
        "# To build a new Modelfile based on this, replace FROM with:",
        f"# FROM {r.name}",
        "",
    ]
    body = Modelfile(
        from_=[str(p) for p in r.model_paths + r.projector_paths],
        adapters=[str(p) for p in r.adapter_paths],
        template=r.template,
        system=r.system,
        parameters=r.parameters,
        messages=r.messages,
        licenses=r.license,
    )
    return "\n".join(out) + "\n" + body.to_text()

