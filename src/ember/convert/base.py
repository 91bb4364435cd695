"""What an architecture module subclasses: :class:`Model` turns a checkpoint's
config and tensor headers into planned output tensors (:class:`Planned`, data
loaded only when written) and GGUF metadata. The default maps names with
gguf-py's ``TensorNameMap`` and copies data; an architecture overrides only
what is special about it (packed weights, permutations, extra keys).

Architecture modules import this module (and ``source``, ``tokenizer``) only;
:mod:`ember.convert.architectures` finds them by name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import gguf
import numpy as np

from ember.convert.source import Checkpoint, TensorRef
from ember.convert.tokenizer import write_vocab
from ember.errors import ConversionError

Q = gguf.GGMLQuantizationType

#: GGML type of the weight matrices for each directly written --outtype
OUTTYPE_QTYPE = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}


@dataclass
class Planned:
    """One output tensor: its GGUF name, logical shape and how to produce it."""

    name: str
    shape: tuple[int, ...]
    src_dtype: np.dtype[Any]
    load: Callable[[], np.ndarray[Any, Any]]
    qtype: Q | None = None  # forced type (None: by the usual rules)
    source: TensorRef | None = None  # set when the data is the source tensor unchanged
    out_qtype: Q = field(default=Q.F32, init=False)


class Model:
    """One GGUF output made from a checkpoint. Default behaviour: map names
    with gguf-py's TensorNameMap, copy data, write a language model's keys."""

    gguf_arch: ClassVar[gguf.MODEL_ARCH]
    #: general.type of the output; a companion output's file name starts with it ("mmproj-...")
    gguf_type: ClassVar[str] = gguf.GGUFType.MODEL

    def __init__(self, model_dir: Path, hparams: dict[str, Any], config_file: Path) -> None:
        self.model_dir = model_dir
        self.hparams = hparams
        self.config_file = config_file
        self.block_count = int(self.hp("num_hidden_layers", "n_layer", "num_layers"))
        self.tensor_map = gguf.get_tensor_name_map(self.gguf_arch, self.block_count)

    @classmethod
    def from_config(cls, model_dir: Path, hparams: dict[str, Any], config_file: Path) -> Model:
        """The converter for a config of this architecture (wrappers such as
        InternVL return the converter of the model they contain)."""
        return cls(model_dir, hparams, config_file)

    def companions(self) -> list[Model]:
        """More GGUF files made from the same checkpoint, e.g. a vision
        projector (``gguf_type`` "mmproj", architecture ``clip``). Each is
        planned and written like the main output, beside it."""
        return []

    def output_type(self, outtype: str) -> str:
        """The type this output is written in when the model's is ``outtype``
        (f32, f16, bf16 or q8_0); a companion may keep its own."""
        return outtype

    # -- config helpers -------------------------------------------------
    def hp(self, *keys: str, default: Any = ...) -> Any:
        for k in keys:
            if k in self.hparams and self.hparams[k] is not None:
                return self.hparams[k]
        if default is ...:
            raise ConversionError(f"{self.config_file}: missing {' or '.join(repr(k) for k in keys)}; the config does not match its architecture {self.hf_arch!r}")
        return default

    @property
    def hf_arch(self) -> str:
        archs = self.hparams.get("architectures") or ["?"]
        return str(archs[0])

    @property
    def n_head(self) -> int:
        return int(self.hp("num_attention_heads", "n_heads"))

    @property
    def n_head_kv(self) -> int:
        return int(self.hp("num_key_value_heads", "n_kv_heads", default=self.n_head))

    @property
    def head_dim(self) -> int:
        hd = self.hparams.get("head_dim")
        return int(hd) if hd else int(self.hp("hidden_size")) // self.n_head

    def rope_params(self) -> dict[str, Any]:
        """rope settings from transformers 5 ``rope_parameters`` or older ``rope_scaling``/``rope_theta``."""
        rp = dict(self.hparams.get("rope_parameters") or self.hparams.get("rope_scaling") or {})
        if "full_attention" in rp and isinstance(rp["full_attention"], dict):
            rp = dict(rp["full_attention"])
        if "rope_type" not in rp and "type" in rp:
            rp["rope_type"] = rp["type"]
        if "rope_theta" not in rp and self.hparams.get("rope_theta") is not None:
            rp["rope_theta"] = self.hparams["rope_theta"]
        return rp

    # -- tensors --------------------------------------------------------
    def skip(self, name: str) -> bool:
        return name.endswith((".rotary_emb.inv_freq", ".attention.masked_bias", ".attention.bias"))

    def rename(self, name: str) -> str:
        return name

    def map_name(self, name: str) -> str:
        new = self.tensor_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            bid = next((int(x) for x in name.split(".") if x.isdecimal()), None)
            if bid is not None and bid >= self.block_count:
                raise ConversionError(f"{self.config_file}: num_hidden_layers is {self.block_count} but the checkpoint has layer {bid}; the config does not match the weights")
            raise ConversionError(f"{self.model_dir}: tensor {name!r} is not known for architecture {self.hf_arch}; the checkpoint has extra weights this converter does not support")
        return new

    def modify(self, name: str, ref: TensorRef) -> Iterable[Planned]:
        """Output tensors for one source tensor; architectures override this."""
        yield Planned(self.map_name(name), ref.shape, ref.dtype, ref.load, source=ref)

    def extra_tensors(self) -> Iterable[Planned]:
        return ()

    def plan_tensors(self, checkpoint: Checkpoint) -> list[Planned]:
        """Every output tensor, in writing order, checked against the config."""
        out: list[Planned] = list(self.extra_tensors())
        for ref in checkpoint:
            if not self.skip(ref.name):
                out.extend(self.modify(self.rename(ref.name), ref))
        seen: set[str] = set()
        for p in out:
            if p.name in seen:
                raise ConversionError(f"{self.model_dir}: two source tensors map to {p.name!r}; the checkpoint has duplicate weights")
            seen.add(p.name)
        self.validate(out)
        return out

    def validate(self, plan: list[Planned]) -> None:
        """Catch a config that does not match the weights before writing anything."""
        by_name = {p.name: p for p in plan}
        hidden = self.hp("hidden_size", "n_embd", "dim", default=None)
        vocab = self.hparams.get("vocab_size")
        emb = by_name.get("token_embd.weight")
        if emb is None:
            raise ConversionError(f"{self.model_dir}: no token embedding tensor in the checkpoint; the weights are incomplete")
        if hidden is not None and emb.shape[-1] != int(hidden):
            raise ConversionError(f"{self.config_file}: hidden_size is {hidden} but the token embedding has width {emb.shape[-1]}; the config does not match the weights")
        if vocab is not None and emb.shape[0] != int(vocab):
            raise ConversionError(f"{self.config_file}: vocab_size is {vocab} but the token embedding has {emb.shape[0]} rows; the config does not match the weights")
        for p in plan:
            parts = p.name.split(".")
            if parts[0] == "blk" and int(parts[1]) >= self.block_count:
                raise ConversionError(f"{self.config_file}: num_hidden_layers is {self.block_count} but the checkpoint has layer {parts[1]}; the config does not match the weights")
        if hidden is not None and f"blk.{self.block_count - 1}.attn_norm.weight" not in by_name and "blk.0.attn_norm.weight" in by_name:
            raise ConversionError(f"{self.config_file}: num_hidden_layers is {self.block_count} but the checkpoint has fewer layers; the config does not match the weights")
        q = by_name.get("blk.0.attn_q.weight")
        if q is not None and q.shape[0] != self.n_head * self.head_dim:
            raise ConversionError(f"{self.config_file}: {self.n_head} heads of {self.head_dim} need {self.n_head * self.head_dim} query rows, the weights have {q.shape[0]}; the config does not match the weights")

    def tensor_type(self, p: Planned, outtype: str) -> Q:
        """GGML type of a planned tensor for ``outtype`` (f32, f16, bf16, q8_0):
        weight matrices get that type; norms, biases, vectors and integer
        tensors stay f32, as in llama.cpp's converter."""
        if p.qtype is not None:
            return p.qtype
        if len(p.shape) <= 1 or p.name.endswith("_norm.weight") or not p.name.endswith(".weight"):
            return Q.F32
        if p.src_dtype.kind in "iub":
            return Q.F32
        q = OUTTYPE_QTYPE[outtype]
        if q == Q.Q8_0 and p.shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0] != 0:
            return Q.F16  # llama.cpp's converter falls back the same way
        return q

    # -- metadata -------------------------------------------------------
    def set_parameters(self, w: gguf.GGUFWriter) -> None:
        w.add_block_count(self.block_count)
        if (n_ctx := self.hp("max_position_embeddings", "n_positions", "max_sequence_length", default=None)) is not None:
            w.add_context_length(int(n_ctx))
        w.add_embedding_length(int(self.hp("hidden_size", "n_embd", "dim")))
        if (n_ff := self.hp("intermediate_size", "n_inner", default=None)) is not None:
            w.add_feed_forward_length(int(n_ff))
        w.add_head_count(self.n_head)
        w.add_head_count_kv(self.n_head_kv)
        rp = self.rope_params()
        if (theta := rp.get("rope_theta")) is not None:
            w.add_rope_freq_base(float(theta))
        rtype = str(rp.get("rope_type") or "default").lower()
        factor = rp.get("factor")
        if rtype == "linear" and factor is not None:
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(factor))
        elif rtype == "yarn" and factor is not None:
            w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(float(factor))
            if (orig := rp.get("original_max_position_embeddings")) is not None:
                w.add_rope_scaling_orig_ctx_len(int(orig))
        elif rtype not in ("default", "llama3", "dynamic"):  # dynamic NTK: llama.cpp ignores it too
            raise ConversionError(f"{self.config_file}: rope type {rtype!r} is not supported; supported: default, linear, yarn, llama3")
        if (eps := self.hp("rms_norm_eps", "norm_eps", default=None)) is not None:
            w.add_layer_norm_rms_eps(float(eps))
        if self.hparams.get("head_dim"):
            w.add_key_length(int(self.hparams["head_dim"]))
            w.add_value_length(int(self.hparams["head_dim"]))

    def set_vocab(self, w: gguf.GGUFWriter) -> None:
        write_vocab(w, self.model_dir, self.hparams, **self.vocab_options())

    def vocab_options(self) -> dict[str, Any]:
        """Keyword overrides for :func:`ember.convert.tokenizer.write_vocab`."""
        return {}


def permute_qk(w: np.ndarray[Any, Any], n_head: int, n_head_kv: int | None = None) -> np.ndarray[Any, Any]:
    """HF rotary layout (halves) -> llama.cpp/GGML layout (interleaved pairs)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return np.ascontiguousarray(
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def lazy(fn: Callable[[np.ndarray[Any, Any]], np.ndarray[Any, Any]], ref: TensorRef) -> Callable[[], np.ndarray[Any, Any]]:
    return lambda: fn(ref.load())


def check_divisible(model: Model, what: str, a: int, b: int) -> None:
    if b == 0 or a % b:
        raise ConversionError(f"{model.config_file}: {what}: {a} is not divisible by {b}; the config is inconsistent")
