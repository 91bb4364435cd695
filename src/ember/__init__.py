"""Ember: run large language models locally.

The public API (everything else is internal)::

    import ember

    with ember.load("demo", num_ctx=2048) as model:          # registry name, GGUF path, shard or HF dir
        print(model.generate("Once upon a time", num_predict=50).text)
        for chunk in model.chat([{"role": "user", "content": "Hi"}], stream=True):
            print(chunk.text, end="")

    ember.convert("path/to/hf-model", "model-f16.gguf")
    ember.quantize("model-f16.gguf", "model-q4_k_m.gguf", "Q4_K_M")
    ember.create("mymodel", modelfile="Modelfile")

Options use Ollama's names everywhere (num_ctx, num_gpu, num_thread, temperature,
top_k, num_predict, stop, ...). Long steps take ``progress=callback`` with
``callback(description, completed, total)``. Errors are :class:`EmberError`s.
"""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ember.__about__ import __version__
from ember.errors import (
    ContextOverflowError,
    ConversionError,
    DownloadError,
    EmberError,
    EngineError,
    InvalidFileError,
    InvalidNameError,
    ModelfileError,
    ModelNotFoundError,
    OptionError,
    QuantizationError,
    QueueFullError,
    TemplateError,
    WorkerError,
)
from ember.progress import ProgressCallback

if TYPE_CHECKING:
    from ember.api import Model, ModelInfo, Result, StreamChunk
    from ember.engine import MemoryReport
    from ember.gguf import ModelInfo as FileInfo
    from ember.registry.core import ResolvedModel
    from ember.registry.listing import ModelEntry
    from ember.registry.show import ModelDetails

PathLike = str | os.PathLike[str]

__all__ = [
    "ContextOverflowError",
    "ConversionError",
    "DownloadError",
    "EmberError",
    "EngineError",
    "InvalidFileError",
    "InvalidNameError",
    "MemoryReport",
    "Model",
    "ModelInfo",
    "ModelNotFoundError",
    "ModelfileError",
    "OptionError",
    "ProgressCallback",
    "QuantizationError",
    "QueueFullError",
    "Result",
    "StreamChunk",
    "TemplateError",
    "WorkerError",
    "__version__",
    "convert",
    "convert_lora",
    "copy",
    "create",
    "delete",
    "inspect",
    "list_models",
    "load",
    "merge",
    "pull",
    "quantize",
    "show",
    "split",
    "validate",
]


# Each function below imports its layer when called (``# lazy``): ``import ember``
# loads neither llama.cpp nor numpy, gguf-py, jinja2 or FastAPI (tests/test_layout.py).


def load(
    model: PathLike,
    *,
    num_parallel: int = 1,
    lora: list[tuple[PathLike, float]] | None = None,
    rpc: str | list[str] | None = None,
    projector: PathLike | None = None,
    progress: ProgressCallback | None = None,
    **options: Any,
) -> Model:
    """Load a model for generation.

    Args:
        model: a registry name (``"demo"``, ``"qwen2.5:7b"``), a GGUF file, any
            shard of a split GGUF (``model-00001-of-00002.gguf``: all shards are
            found and checked), or a Hugging Face directory (converted once to a
            cached F16 GGUF).
        num_parallel: sequences decoded together; requests from several threads
            or tasks run concurrently up to this many, the rest wait their turn.
        lora: GGUF LoRA adapters to apply, as ``(path, scale)`` pairs.
        rpc: RPC workers (``ember worker`` on other machines) to split the
            model's layers across, as ``["10.0.0.2:50052", ...]`` or one
            comma-separated string; each must be reachable (a one-line
            :class:`WorkerError` names the one that is not). Default:
            ``EMBER_RPC``. A worker lost during generation ends the process
            with one line on stderr: llama.cpp's RPC client cannot recover
            (see docs/multi-machine.md).
        projector: a vision projector GGUF (``mmproj-*.gguf``) for the model's
            images; a registry model with a projector layer loads its own.
        progress: ``callback(description, completed, total)`` for conversion.
        **options: Ollama's options. Load options: ``num_ctx`` (context per
            sequence; default the smaller of 4096 and the training context),
            ``num_gpu`` (layers on the GPU, -1 all; accepted and ignored on a
            CPU-only build), ``main_gpu``, ``num_thread`` (default: physical
            cores), ``num_batch``, ``use_mmap``, ``use_mlock``, ``flash_attn``,
            ``kv_cache_type`` (f32, f16, bf16, q8_0, q4_0, q4_1, iq4_nl, q5_0,
            q5_1), ``batch_invariant``, ``draft`` (a smaller model of the
            same family, registry name or GGUF file, that drafts tokens for
            speculative decoding; default: n-grams of the prompt and output),
            ``tensor_split`` (shares of the layers: this machine, then each
            worker; default by free memory), ``use_repack`` (False: the
            kernels RPC workers run, for identical numbers). Any other
            option (``temperature``, ``top_k``, ``top_p``, ``min_p``,
            ``repeat_penalty``, ``seed``, ``num_predict``, ``stop``, ...) becomes
            this model's default for every request.

    Returns:
        A :class:`Model`; use it as a context manager (or call ``close()``) to
        free its memory.
    """
    from ember.api import Model  # lazy: `import ember` loads no layer

    adapters = [(str(p), float(s)) for p, s in lora or []]
    if rpc is not None:
        options["rpc"] = rpc if isinstance(rpc, str) else ",".join(rpc)
    return Model(str(model), num_parallel=num_parallel, lora=adapters, projector=projector, progress=progress, **options)


def convert(
    model_dir: PathLike,
    outfile: PathLike | None = None,
    *,
    outtype: str = "auto",
    progress: ProgressCallback | None = None,
) -> Path:
    """Convert a Hugging Face checkpoint (safetensors or .bin) to GGUF; ``outtype``
    is f32, f16, bf16, q8_0, auto, or any llama.cpp quant type (q4_k_m, ...)."""
    from ember.convert import convert_model  # lazy: `import ember` loads no layer

    return Path(convert_model(model_dir, outfile, outtype=outtype, progress=progress))


def convert_lora(
    adapter_dir: PathLike,
    base: PathLike,
    outfile: PathLike | None = None,
    *,
    progress: ProgressCallback | None = None,
) -> Path:
    """Convert a PEFT LoRA adapter to a GGUF adapter for the given base model."""
    from ember.convert.lora import convert_lora as _convert_lora  # lazy: `import ember` loads no layer

    return Path(_convert_lora(adapter_dir, base, outfile, progress=progress))


def quantize(
    src: PathLike,
    dst: PathLike,
    qtype: str,
    *,
    progress: ProgressCallback | None = None,
    **kwargs: Any,
) -> list[Path]:
    """Quantize a GGUF to any llama.cpp type (Q4_0, Q4_K_M, Q6_K, Q8_0, IQ4_XS, ...).
    Keyword options: imatrix, output_tensor_type, token_embedding_type,
    tensor_types, pure, allow_requantize, keep_split, nthread."""
    from ember.quantize import quantize_model  # lazy: `import ember` loads no layer

    return [Path(p) for p in quantize_model(src, dst, qtype, progress=progress, **kwargs)]


def split(
    src: PathLike,
    out_prefix: PathLike,
    *,
    max_size: int | None = None,
    max_tensors: int | None = None,
    progress: ProgressCallback | None = None,
) -> list[Path]:
    """Split a GGUF into llama.cpp-compatible shards (``PREFIX-00001-of-0000N.gguf``)."""
    from ember.gguf import split_model  # lazy: `import ember` loads no layer

    return [Path(p) for p in split_model(src, out_prefix, max_size=max_size, max_tensors=max_tensors, progress=progress)]


def merge(first_shard: PathLike, out: PathLike, *, progress: ProgressCallback | None = None) -> Path:
    """Merge the shards of a split GGUF into one file."""
    from ember.gguf import merge_model  # lazy: `import ember` loads no layer

    return Path(merge_model(first_shard, out, progress=progress))


def inspect(path: PathLike) -> FileInfo:
    """Describe a GGUF (any shard reports the whole model) without loading it."""
    from ember.gguf import inspect_model  # lazy: `import ember` loads no layer

    return inspect_model(path)


def validate(path: PathLike) -> list[Path]:
    """Check a GGUF's structure (all shards); returns the shard paths in order."""
    from ember.gguf import validate_model  # lazy: `import ember` loads no layer

    return [Path(p) for p in validate_model(path)]


def create(
    name: str,
    modelfile: PathLike | None = None,
    *,
    quantize: str | None = None,
    progress: ProgressCallback | None = None,
) -> ResolvedModel:
    """Create a registry model from a Modelfile: a path to one, or its text."""
    from ember.registry.create import create_model  # lazy: `import ember` loads no layer

    source: Any = modelfile
    if modelfile is not None and (not isinstance(modelfile, str) or ("\n" not in modelfile and Path(modelfile).is_file())):
        source = Path(modelfile)
    return create_model(name, source, quantize=quantize, progress=progress)


def pull(ref: str, *, progress: ProgressCallback | None = None) -> ResolvedModel:
    """Download a model: an Ollama name (``llama3.2``, ``user/model:tag``) from
    Ollama's registry, or ``hf.co/user/repo[:Q4_K_M]`` (GGUF files, or a
    checkpoint converted) from Hugging Face."""
    from ember.registry.pull import pull_model  # lazy: `import ember` loads no layer

    return pull_model(ref, progress=progress)


def list_models() -> list[ModelEntry]:
    """The models in the registry (``$EMBER_MODELS``)."""
    from ember.registry.listing import list_models as _list  # lazy: `import ember` loads no layer

    return _list()


def show(name: str, *, verbose: bool = False) -> ModelDetails:
    """A registry model's Modelfile, parameters, template, system, capabilities
    and metadata (``.to_json()``: Ollama's ``/api/show`` body)."""
    from ember.registry.show import show_model  # lazy: `import ember` loads no layer

    return show_model(name, verbose=verbose)


def copy(src: str, dst: str) -> None:
    """Copy a registry model under a new name."""
    from ember.registry.core import copy_model  # lazy: `import ember` loads no layer

    copy_model(src, dst)


def delete(name: str) -> None:
    """Remove a registry model (blobs no other model uses are pruned)."""
    from ember.registry.core import delete_model  # lazy: `import ember` loads no layer

    delete_model(name)


def __getattr__(name: str) -> Any:
    """The classes load with llama.cpp, on first use: ``import ember`` loads
    neither llama.cpp nor numpy, gguf-py or the converter."""
    if name in ("Model", "Result", "StreamChunk", "ModelInfo", "MemoryReport"):
        from ember import api, engine  # lazy: `import ember` loads no layer

        return getattr(engine if name == "MemoryReport" else api, name)
    raise AttributeError(f"module 'ember' has no attribute {name!r}")


class _Package(types.ModuleType):
    """``convert`` and ``quantize`` are functions of this API and subpackages
    alike. Python binds a subpackage to its parent's attribute when it first
    loads, which would replace the functions; this keeps them. (Code that
    wants the packages imports from them, or uses importlib.import_module.)"""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("convert", "quantize") and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
