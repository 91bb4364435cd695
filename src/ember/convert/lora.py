"""PEFT LoRA adapter -> GGUF adapter in llama.cpp's format.

Each adapted weight W gets ``<gguf name>.lora_a`` (A, rank x in) and
``.lora_b`` (B, out x rank); llama.cpp adds ``scale * B @ A`` with
``scale = adapter.lora.alpha / rank``. B goes through the same
architecture-specific row transforms as the base weight (Llama's q/k
permutation, InternLM2's wqkv and Baichuan's W_pack splits), since
``permute(W + B A) = permute(W) + permute(B) A``. rsLoRA (scale alpha/sqrt(r))
is written as an adjusted alpha; per-module rank/alpha patterns are folded
into B. DoRA and full embedding/head weights have no llama.cpp equivalent and
are refused.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from ember.convert.architectures import make_model, model_class
from ember.convert.base import Model, Planned
from ember.convert.pipeline import card_metadata
from ember.convert.source import TensorRef, read_json_object, read_safetensors_header, read_torch_checkpoint, to_float32
from ember.convert.writer import Writer, add_tensor_infos, write_gguf
from ember.errors import ConversionError, InvalidFileError
from ember.progress import ProgressCallback

_PREFIXES = ("base_model.model.", "base_model.")
_GGUF_ARCH_TO_HF = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
    "internlm2": "InternLM2ForCausalLM",
    "baichuan": "BaichuanForCausalLM",
}


def _adapter_config(adapter_dir: Path) -> tuple[dict[str, Any], Path]:
    cfg_file = adapter_dir / "adapter_config.json"
    if not cfg_file.is_file():
        raise ConversionError(f"{cfg_file}: missing; a PEFT adapter folder has adapter_config.json and adapter_model.safetensors")
    cfg = read_json_object(cfg_file)
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise ConversionError(f"{cfg_file}: peft_type {cfg.get('peft_type')!r} is not supported; only LoRA adapters convert to llama.cpp adapters")
    if cfg.get("use_dora"):
        raise ConversionError(f"{cfg_file}: DoRA adapters (use_dora: true) have no llama.cpp equivalent; merge the adapter into the base model with peft and convert that")
    for key in ("r", "lora_alpha"):
        if not isinstance(cfg.get(key), (int, float)) or cfg[key] <= 0:
            raise ConversionError(f"{cfg_file}: {key!r} must be a positive number")
    return cfg, cfg_file


def _adapter_tensors(adapter_dir: Path) -> dict[str, TensorRef]:
    st = adapter_dir / "adapter_model.safetensors"
    if st.is_file():
        return read_safetensors_header(st)
    if (adapter_dir / "adapter_model.bin").is_file():
        return read_torch_checkpoint(adapter_dir / "adapter_model.bin")
    raise ConversionError(f"{adapter_dir}: no adapter_model.safetensors (or adapter_model.bin); copy the adapter weights into this folder")


def _base_model(base: Path) -> Model:
    if base.is_dir():
        return make_model(base)
    if base.is_file() and base.suffix == ".gguf":
        r = gguf.GGUFReader(base)

        def field(key: str, default: Any = None) -> Any:
            f = r.fields.get(key)
            if f is None:
                return default
            v = f.parts[f.data[0]]
            return bytes(v).decode() if f.types[0] == gguf.GGUFValueType.STRING else v[0].item()

        arch = field("general.architecture")
        hf = _GGUF_ARCH_TO_HF.get(str(arch))
        cls = model_class(hf) if hf is not None else None
        if hf is None or cls is None:
            raise ConversionError(f"{base}: base architecture {arch!r} is not supported for adapters; supported: {', '.join(_GGUF_ARCH_TO_HF)}")
        hparams = {
            "architectures": [hf],
            "num_hidden_layers": field(f"{arch}.block_count"),
            "hidden_size": field(f"{arch}.embedding_length"),
            "num_attention_heads": field(f"{arch}.attention.head_count"),
            "num_key_value_heads": field(f"{arch}.attention.head_count_kv"),
            "head_dim": field(f"{arch}.attention.key_length"),
            "tie_word_embeddings": not any(t.name == "output.weight" for t in r.tensors),
        }
        return cls(base.parent, hparams, base)
    raise ConversionError(f"{base}: not a Hugging Face model folder or a .gguf file; give --base the model the adapter was trained on")


def convert_lora(
    adapter_dir: str | os.PathLike[str],
    base: str | os.PathLike[str],
    outfile: str | os.PathLike[str] | None = None,
    *,
    outtype: str = "f16",
    progress: ProgressCallback | None = None,
) -> Path:
    """Convert a PEFT LoRA adapter (folder) for ``base`` (HF folder or GGUF) to a GGUF adapter."""
    adapter_dir, base = Path(adapter_dir), Path(base)
    qt = {"f16": gguf.GGMLQuantizationType.F16, "f32": gguf.GGMLQuantizationType.F32}.get(outtype.lower())
    if qt is None:
        raise ConversionError(f"--outtype {outtype!r}: LoRA adapters are written as f16 or f32")
    cfg, cfg_file = _adapter_config(adapter_dir)
    model = _base_model(base)
    refs = _adapter_tensors(adapter_dir)

    r_default = float(cfg["r"])
    alpha_default = float(cfg["lora_alpha"])
    rs = bool(cfg.get("use_rslora"))
    rank_pattern: dict[str, int] = cfg.get("rank_pattern") or {}
    alpha_pattern: dict[str, float] = cfg.get("alpha_pattern") or {}
    # llama.cpp: scale = alpha / rank. rsLoRA: scale = alpha / sqrt(rank).
    alpha_out = alpha_default * math.sqrt(r_default) if rs else alpha_default

    pairs: dict[str, dict[str, TensorRef]] = {}
    for name, ref in refs.items():
        short = name
        for prefix in _PREFIXES:
            if short.startswith(prefix):
                short = short[len(prefix) :]
                break
        if "lora_magnitude_vector" in short:
            raise ConversionError(f"{adapter_dir}: tensor {name!r} is a DoRA magnitude; DoRA adapters have no llama.cpp equivalent")
        if "lora_embedding_" in short:
            raise ConversionError(f"{adapter_dir}: tensor {name!r} adapts the token embeddings; llama.cpp adapters cannot carry embedding LoRA from PEFT, merge it with peft and convert the merged model")
        m = re.match(r"(.*)\.lora_([AB])(?:\.[^.]+)?\.weight$", short)
        if m is None:
            if short.endswith(("embed_tokens.weight", "lm_head.weight", "tok_embeddings.weight", "output.weight")) or ".modules_to_save." in short:
                raise ConversionError(
                    f"{adapter_dir}: tensor {name!r} is a full weight (modules_to_save or resized embeddings); llama.cpp adapters hold only LoRA A/B pairs, merge the adapter into the base model and convert that"
                )
            raise ConversionError(f"{adapter_dir}: tensor {name!r} is not a LoRA A/B weight; this adapter cannot be converted")
        pairs.setdefault(m.group(1), {})[m.group(2)] = ref

    plan: list[Planned] = []
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise InvalidFileError(f"{adapter_dir}: {module} has lora_{next(iter(ab))} but not its pair; the adapter file is incomplete")
        a, b = ab["A"], ab["B"]
        rank = a.shape[0]
        if b.shape[1] != rank:
            raise InvalidFileError(f"{adapter_dir}: {module}: lora_A has rank {rank} but lora_B has {b.shape[1]} columns; the adapter is corrupt")
        key = module.split(".")[-1]
        r_mod = float(next((v for k, v in rank_pattern.items() if module.endswith(k) or k == key), r_default))
        a_mod = float(next((v for k, v in alpha_pattern.items() if module.endswith(k) or k == key), alpha_default))
        want = a_mod / (math.sqrt(r_mod) if rs else r_mod)
        fold = want / (alpha_out / rank)
        base_name = model.rename(module + ".weight")
        if model.skip(base_name):
            continue
        b_ref = TensorRef(base_name, b.shape, b.dtype, b.file, b.load if fold == 1.0 else _scaled(b, fold))
        outs = list(model.modify(base_name, b_ref))
        if not outs:
            raise ConversionError(f"{adapter_dir}: {module} targets a weight the base GGUF does not have (tied to the embeddings); retrain without it or merge the adapter")
        for o in outs:
            stem = o.name.removesuffix(".weight")
            plan.append(Planned(stem + ".weight.lora_a", a.shape, a.dtype, a.load, qtype=qt))
            plan.append(Planned(stem + ".weight.lora_b", o.shape, o.src_dtype, o.load, qtype=qt))
    if not plan:
        raise ConversionError(f"{adapter_dir}: the adapter has no LoRA weights")

    w = Writer(None, gguf.MODEL_ARCH_NAMES[model.gguf_arch])
    for p in plan:
        p.out_qtype = qt
    add_tensor_infos(w, plan)
    md = card_metadata(adapter_dir)
    if outfile is None or Path(outfile).is_dir():
        name = gguf.naming_convention(md.name, md.basename, md.finetune, md.version, None, qt.name, model_type="LoRA") + ".gguf"
        dest = (Path(outfile) if outfile is not None else adapter_dir.parent) / name
    else:
        dest = Path(outfile)
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha_out)
    md.set_gguf_meta_model(w)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    write_gguf(w, plan, [dest], progress, f"Writing {dest.name}")
    return dest


def _scaled(ref: TensorRef, factor: float) -> Any:
    return lambda: to_float32(ref.load()) * np.float32(factor)


__all__ = ["convert_lora"]
