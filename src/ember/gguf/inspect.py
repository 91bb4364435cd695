"""What a GGUF model is: architecture, size, quantization, tokenizer, template,
shards. Read from the validated header tables only (no tensor data), so it is
instant even for large models, and any shard reports the whole model."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from gguf import GGUFValueType, LlamaFileType

from ember.gguf.validate import GGUFHeader, KeyValue

# Strings longer than this are summarized in ``ModelInfo.metadata``.
METADATA_STRING_LIMIT = 1024


@dataclass
class QuantStats:
    tensors: int
    bytes: int


@dataclass
class TensorEntry:
    name: str
    type: str
    shape: list[int]  # GGUF order: ne[0] (row length) first
    bytes: int
    shard: int  # 0-based index into ModelInfo.split_files


@dataclass
class ModelInfo:
    """The summary ``ember inspect`` shows. ``file_type`` is llama.cpp's
    LlamaFileType name without the MOSTLY_/ALL_ prefix (e.g. "Q4_K_M")."""

    path: str
    architecture: str | None
    name: str | None
    parameter_count: int
    file_type: str | None
    file_type_id: int | None
    context_length: int | None
    embedding_length: int | None
    block_count: int | None
    quant_types: dict[str, QuantStats]
    tensor_bytes: int
    bits_per_weight: float
    tokenizer: str | None
    vocab_size: int | None
    has_chat_template: bool
    chat_template: str | None
    split_count: int
    split_files: list[str]
    split_sizes: list[int]
    total_size: int
    gguf_version: int
    alignment: int
    metadata: dict[str, Any]
    tensors: list[TensorEntry] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serializable data (for ``--json``)."""
        return asdict(self)


def file_type_name(code: int) -> str:
    try:
        name = LlamaFileType(code).name
    except ValueError:
        return f"unknown ({code})"
    for prefix in ("MOSTLY_", "ALL_"):
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def format_params(n: int) -> str:
    """A parameter count as Ollama writes it (its ``format.HumanNumber``):
    7.6B, 8B, 268.10M, 500M, 12K, 999. The one formatter for every listing."""
    for unit, size, decimals in (("B", 1_000_000_000, 1), ("M", 1_000_000, 2)):
        if n >= size:
            value = n / size
            return f"{value:.0f}{unit}" if value == int(value) else f"{value:.{decimals}f}{unit}"
    if n >= 1_000:
        return f"{n / 1_000:.0f}K"
    return str(n)


def summarize_value(kv: KeyValue) -> Any:
    """A small JSON-friendly form of a metadata value: big arrays and long
    strings are replaced by a description."""
    if kv.is_array:
        sub = kv.sub_type.name.lower() if kv.sub_type is not None else "?"
        if kv.value is None or kv.count > 16:
            return {"array": sub, "length": kv.count}
        return list(kv.value)
    if kv.type == GGUFValueType.STRING:
        text = str(kv.value).encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        if len(text) > METADATA_STRING_LIMIT:
            return {"string": "long", "length": len(text)}
        return text
    return kv.value


def _int(h: GGUFHeader, key: str) -> int | None:
    v = h.get(key)
    return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _str(h: GGUFHeader, key: str) -> str | None:
    v = h.get(key)
    if not isinstance(v, str):
        return None
    return v.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def model_info(headers: Sequence[GGUFHeader], path: str | os.PathLike[str]) -> ModelInfo:
    """Build the summary from validated shard headers (first shard first)."""
    first = headers[0]
    arch = _str(first, "general.architecture")
    tensors: list[TensorEntry] = []
    quant: dict[str, QuantStats] = {}
    params = 0
    total_bytes = 0
    for i, h in enumerate(headers):
        for t in h.tensors:
            tensors.append(TensorEntry(t.name, t.type.name, list(t.shape), t.nbytes, i))
            q = quant.setdefault(t.type.name, QuantStats(0, 0))
            q.tensors += 1
            q.bytes += t.nbytes
            params += t.n_elements
            total_bytes += t.nbytes
    quant = dict(sorted(quant.items(), key=lambda kv: -kv[1].bytes))
    ft = _int(first, "general.file_type")
    vocab = first.kv.get("tokenizer.ggml.tokens")
    template = _str(first, "tokenizer.chat_template")
    metadata = {k: summarize_value(v) for k, v in first.kv.items()}
    return ModelInfo(
        path=str(path),
        architecture=arch,
        name=_str(first, "general.name"),
        parameter_count=params,
        file_type=file_type_name(ft) if ft is not None else None,
        file_type_id=ft,
        context_length=_int(first, f"{arch}.context_length") if arch else None,
        embedding_length=_int(first, f"{arch}.embedding_length") if arch else None,
        block_count=_int(first, f"{arch}.block_count") if arch else None,
        quant_types=quant,
        tensor_bytes=total_bytes,
        bits_per_weight=(total_bytes * 8 / params) if params else 0.0,
        tokenizer=_str(first, "tokenizer.ggml.model"),
        vocab_size=vocab.count if vocab is not None and vocab.is_array else None,
        has_chat_template=template is not None,
        chat_template=template,
        split_count=len(headers),
        split_files=[str(h.path) for h in headers],
        split_sizes=[h.file_size for h in headers],
        total_size=sum(h.file_size for h in headers),
        gguf_version=first.version,
        alignment=first.alignment,
        metadata=metadata,
        tensors=tensors,
    )

