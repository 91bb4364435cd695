"""Hyperparameter checks: the values llama.cpp trusts.

A GGUF whose tables are sound (:mod:`ember.gguf.validate`) can still kill the
process that loads it: llama.cpp checks many hyperparameters with
``GGML_ASSERT``, which aborts, not with an error it returns. ``block_count = 0``
aborts while loading, a NaN ``layer_norm_rms_epsilon`` aborts in the first
decode, a head count that does not divide the embedding aborts when the graph
reshapes a tensor, two equal vocabulary entries abort while building the
tokenizer. This module checks what llama.cpp 0.3.36's loader (``llama-model``,
``llama-hparams``, ``llama-vocab``, ``llama-model-loader``) and its graphs
rely on, so that a model either fails here with one line naming the key and
its value, or loads.

What is checked:

- for every architecture, the keys every architecture shares (layer count,
  context, embedding, head counts and sizes, rope, experts, epsilons,
  pooling) and the tokenizer, each with the exact type llama.cpp reads;
- for the architectures Ember converts (llama, qwen2, qwen3, gemma3,
  internlm2, baichuan), also the rules of their graphs and the shape of
  every tensor they load, against the hyperparameters.

Keys and tensors that are absent are llama.cpp's to report (it does so with
an error, not an abort); everything present is checked.
"""

from __future__ import annotations

import hashlib
import math
import re
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from gguf import GGUFValueType

from ember.errors import InvalidFileError
from ember.gguf.validate import GGUFHeader, KeyValue, TensorRecord, read_array, read_raw

MAX_LAYERS = 512  # llama.cpp: LLAMA_MAX_LAYERS
MAX_EXPERTS = 1024  # llama.cpp: LLAMA_MAX_EXPERTS
INT32_MAX = 2**31 - 1  # llama.cpp's API returns these sizes as int32
# llama.cpp sizes the sliding-window cache as n_swa * sequences + batch in
# uint32 arithmetic; a window past this overflows it (no model comes near).
MAX_SLIDING_WINDOW = 1 << 24
ROPE_SCALING_TYPES = ("none", "linear", "yarn", "longrope")
POOLING_TYPES = {0: "none", 1: "mean", 2: "cls", 3: "last", 4: "rank"}

# Architectures whose graphs and tensor shapes are checked in full (the ones
# Ember converts; mistral and InternVL's language models convert to these).
CHECKED_ARCHS = ("llama", "qwen2", "qwen3", "gemma3", "internlm2", "baichuan")

_T = GGUFValueType
_BLOCK = re.compile(r"blk\.(\d+)\.")

# Tokenizer models llama.cpp knows, with the special tokens it assumes when
# the file names none: (bos, eos, sep), None meaning no such token.
_TOKENIZER_DEFAULTS: dict[str, tuple[int | None, int | None, int | None]] = {
    "llama": (1, 2, None),
    "bert": (101, None, 102),
    "gpt2": (11, 11, None),
    "hybriddna": (11, 11, None),
    "whitespace": (11, 11, None),
    "gemma4": (None, None, None),
    "t5": (None, 1, None),
    "rwkv": (None, None, None),
    "plamo2": (1, 2, None),
    "test": (None, None, None),
    "no_vocab": (None, None, None),
    "none": (None, None, None),
}
# Whether llama.cpp adds BOS / EOS unless the file says otherwise, for the
# tokenizers whose add_bos_token / add_eos_token it honours (WordPiece always
# adds BOS and separator). True means "maybe" for BPE: its default depends on
# the pre-tokenizer.
_TOKENIZER_ADDS: dict[str, tuple[bool, bool]] = {
    "llama": (True, False),
    "gpt2": (True, False),
    "hybriddna": (True, False),
    "whitespace": (True, False),
    "gemma4": (True, False),
    "t5": (False, True),
}
# Special-token ids llama.cpp reads (as uint32; "seperator" is its spelling).
_SPECIAL_IDS = (
    "bos", "eos", "eot", "eom", "unknown", "seperator", "padding", "mask", "fim_pre", "fim_suf", "fim_mid",
    "fim_pad", "fim_rep", "fim_sep", "prefix", "suffix", "middle",
)
_NEEDS_MERGES = ("gpt2", "hybriddna", "whitespace", "gemma4")

# Token-list digests already found free of duplicates (checking takes a walk
# over every entry; the same vocabulary is seen again with every copy).
_UNIQUE_VOCABS: set[bytes] = set()


def _show(kv: KeyValue) -> str:
    if kv.is_array:
        if kv.value is not None and kv.count <= 8:
            return repr(list(kv.value))
        return f"[{kv.count} values]"
    if isinstance(kv.value, str):
        text = kv.value if len(kv.value) <= 40 else kv.value[:37] + "..."
        return repr(text)
    return repr(kv.value)


def _a(type_: GGUFValueType) -> str:
    name = type_.name.lower()
    return f"an {name}" if name.startswith(("int", "array")) else f"a {name}"


def _kind(kv: KeyValue) -> str:
    if kv.is_array and kv.sub_type is not None:
        return f"an array of {kv.sub_type.name.lower()}"
    return _a(kv.type)


class _Keys:
    """Typed reads of one model's metadata; every failure names key and value."""

    def __init__(self, header: GGUFHeader, arch: str) -> None:
        self.header = header
        self.arch = arch

    def key(self, name: str) -> str:
        return name if name.startswith(("general.", "tokenizer.")) else f"{self.arch}.{name}"

    def fail(self, name: str, why: str) -> InvalidFileError:
        key = self.key(name)
        kv = self.header.kv.get(key)
        shown = f" = {_show(kv)}" if kv is not None else ""
        return InvalidFileError(f"{self.header.path}: {key}{shown}: {why}")

    def typed(self, name: str, *types: GGUFValueType) -> KeyValue | None:
        kv = self.header.kv.get(self.key(name))
        if kv is None:
            return None
        if kv.type not in types:
            want = " or ".join(_a(t) for t in types)
            raise self.fail(name, f"must be {want} (llama.cpp reads it so), not {_kind(kv)}")
        return kv

    def u32(self, name: str, low: int = 0, high: int = 2**32 - 1, why: str = "") -> int | None:
        kv = self.typed(name, _T.UINT32)
        if kv is None:
            return None
        value = int(kv.value)
        if not low <= value <= high:
            raise self.fail(name, why or f"must be {low} to {high}")
        return value

    def f32(self, name: str, check: Callable[[float], bool] = math.isfinite, why: str = "must be a finite number") -> float | None:
        kv = self.typed(name, _T.FLOAT32)
        if kv is None:
            return None
        value = float(kv.value)
        if not check(value):
            raise self.fail(name, why)
        return value

    def flag(self, name: str) -> bool | None:
        kv = self.typed(name, _T.BOOL)
        return None if kv is None else bool(kv.value)

    def text(self, name: str) -> str | None:
        kv = self.typed(name, _T.STRING)
        return None if kv is None else str(kv.value)

    def per_layer(self, name: str, n_layer: int, low: int = 0, high: int = INT32_MAX, why: str = "") -> list[int] | None:
        """A uint32 for every layer, or an array of one value per layer
        (llama.cpp's get_key_or_arr)."""
        kv = self.header.kv.get(self.key(name))
        if kv is None:
            return None
        if not kv.is_array:
            value = self.u32(name, low, high, why)
            assert value is not None
            return [value] * n_layer
        if kv.sub_type not in (_T.UINT32, _T.INT32, _T.BOOL):
            raise self.fail(name, f"must be a uint32 or an array of uint32, not {_kind(kv)}")
        if kv.count != n_layer:
            raise self.fail(name, f"has {kv.count} values but the model has {n_layer} layers (block_count)")
        values = [int(v) & 0xFFFFFFFF for v in read_array(self.header, self.key(name))]
        for il, value in enumerate(values):
            if not low <= value <= high:
                raise InvalidFileError(
                    f"{self.header.path}: {self.key(name)}[{il}] = {value}: {why or f'must be {low} to {high}'}"
                )
        return values


@dataclass
class Dims:
    """What llama.cpp derives from the hyperparameters (per layer where it can vary)."""

    n_layer: int
    n_embd: int
    n_head: list[int]
    n_head_kv: list[int]
    n_ff: list[int]
    head_k: int
    head_v: int
    n_rot: int
    n_expert: int
    n_expert_used: list[int]
    n_vocab: int | None
    swa: bool = False


def check_hparams(headers: Sequence[GGUFHeader]) -> None:
    """Raise :class:`InvalidFileError` when a model's hyperparameters would make
    llama.cpp abort or refuse it (see the module docstring). Files that are not
    models (LoRA adapters, vision projectors, imatrix data) are not checked."""
    first = headers[0]
    kind = first.get("general.type", "model")
    arch_kv = first.kv.get("general.architecture")
    if arch_kv is not None and arch_kv.type != GGUFValueType.STRING:
        raise InvalidFileError(f"{first.path}: general.architecture = {_show(arch_kv)}: must be a string, not {_kind(arch_kv)}")
    arch = first.get("general.architecture")
    if not arch or arch == "clip" or kind != "model":
        return
    keys = _Keys(first, arch)
    keys.text("general.name")
    keys.u32("general.file_type")
    n_vocab = _check_vocab(keys)
    tensors = [t for h in headers for t in h.tensors]
    dims = _check_shared(keys, n_vocab, tensors)
    # Without head counts llama.cpp fails cleanly on the first tensor.
    if dims is not None and arch in CHECKED_ARCHS and keys.key("attention.head_count") in first.kv:
        _check_graph(keys, dims)
        _check_tensors(keys, dims, tensors)


def _check_shared(keys: _Keys, n_vocab: int | None, tensors: list[TensorRecord]) -> Dims | None:
    """The keys llama.cpp's load_hparams reads for every architecture."""
    limit = f"must be 1 to {INT32_MAX}"
    keys.u32("context_length", 1, INT32_MAX, limit)
    keys.u32("rope.scaling.original_context_length", 1, INT32_MAX, limit)
    n_embd = keys.u32("embedding_length", 1, INT32_MAX, limit)
    keys.u32("embedding_length_out", 0, INT32_MAX)
    keys.flag("attention.causal")
    keys.flag("rope.scaling.finetuned")
    pooling = keys.u32("pooling_type")
    if pooling is not None and pooling not in POOLING_TYPES:
        raise keys.fail("pooling_type", f"is not a pooling type llama.cpp knows ({', '.join(f'{k} {v}' for k, v in POOLING_TYPES.items())})")
    n_layer = keys.u32("block_count", 1, MAX_LAYERS, f"must be 1 to {MAX_LAYERS} (llama.cpp's LLAMA_MAX_LAYERS)")
    for name in ("attention.layer_norm_epsilon", "attention.layer_norm_rms_epsilon", "attention.group_norm_epsilon"):
        keys.f32(name, lambda v: math.isfinite(v) and v >= 0, "must be a finite number >= 0")
    for name in ("rope.freq_base", "rope.freq_base_swa"):
        keys.f32(name, lambda v: math.isfinite(v) and v > 0, "must be a finite number > 0")
    for name in ("rope.scaling.factor", "rope.scale_linear"):
        keys.f32(name, lambda v: math.isfinite(v) and v >= 0, "must be a finite number >= 0 (0 means no scaling)")
    for name in (
        "rope.scaling.attn_factor", "rope.scaling.alpha", "rope.scaling.yarn_log_multiplier",
        "rope.scaling.yarn_ext_factor", "rope.scaling.yarn_attn_factor", "rope.scaling.yarn_beta_fast",
        "rope.scaling.yarn_beta_slow", "attention.max_alibi_bias", "attention.clamp_kqv", "attention.scale",
        "final_logit_softcapping", "attn_logit_softcapping", "logit_scale", "embedding_scale", "residual_scale",
    ):
        keys.f32(name)
    scaling = keys.text("rope.scaling.type")
    if scaling is not None and scaling not in ROPE_SCALING_TYPES:
        raise keys.fail("rope.scaling.type", f"is not one of {', '.join(ROPE_SCALING_TYPES)} (llama.cpp aborts on others)")
    window = keys.u32("attention.sliding_window", 0, MAX_SLIDING_WINDOW, f"must be 0 to {MAX_SLIDING_WINDOW}")
    if n_layer is None:
        return None
    _check_layer_indices(keys, n_layer, tensors)
    if window is not None:
        _check_swa_pattern(keys, n_layer)
    nextn = keys.u32("nextn_predict_layers")
    if nextn is not None and nextn > n_layer:
        raise keys.fail("nextn_predict_layers", f"is more than the {n_layer} layers (block_count)")
    n_expert, n_expert_used = _check_experts(keys, n_layer)
    n_ff = keys.per_layer("feed_forward_length", n_layer) or [0] * n_layer
    n_head = keys.per_layer("attention.head_count", n_layer) or [0] * n_layer
    n_head_kv = keys.per_layer("attention.head_count_kv", n_layer) or list(n_head)
    for il, (h, hkv) in enumerate(zip(n_head, n_head_kv)):
        where = "" if len(set(n_head)) == 1 and len(set(n_head_kv)) == 1 else f" in layer {il}"
        if hkv and not h:
            raise keys.fail("attention.head_count", f"is 0{where} but attention.head_count_kv is {hkv}")
        if hkv and h % hkv:
            raise keys.fail(
                "attention.head_count_kv",
                f"{hkv} KV heads{where} do not divide the {h} attention heads (attention.head_count)",
            )
    head_k = head_v = n_rot = 0
    if n_head[0] > 0 and n_embd is not None:
        head_k = keys.u32("attention.key_length", 1, INT32_MAX, limit) or 0
        head_v = keys.u32("attention.value_length", 1, INT32_MAX, limit) or 0
        if not head_k or not head_v:
            if n_embd % n_head[0]:
                raise keys.fail(
                    "attention.head_count",
                    f"does not divide the embedding length {n_embd} (and attention.key_length/value_length are not given)",
                )
            head_k = head_k or n_embd // n_head[0]
            head_v = head_v or n_embd // n_head[0]
        n_rot = keys.u32("rope.dimension_count", 1, INT32_MAX, limit) or head_k
        if n_rot % 2 or n_rot > head_k:
            if keys.key("rope.dimension_count") in keys.header.kv:
                raise keys.fail("rope.dimension_count", f"must be even and at most the head size {head_k}")
            raise keys.fail("attention.key_length", "is the rotary dimension (rope.dimension_count is not given), which must be even")
        for name in ("attention.key_length_swa", "attention.value_length_swa"):
            keys.u32(name, 1, INT32_MAX, limit)
        swa_rot = keys.u32("rope.dimension_count_swa", 1, INT32_MAX, limit)
        swa_head = keys.header.get(keys.key("attention.key_length_swa"), head_k)
        if swa_rot is not None and (swa_rot % 2 or swa_rot > swa_head):
            raise keys.fail("rope.dimension_count_swa", f"must be even and at most the head size {swa_head}")
    if n_embd is None:
        return None
    return Dims(
        n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv, n_ff=n_ff,
        head_k=head_k, head_v=head_v, n_rot=n_rot, n_expert=n_expert, n_expert_used=n_expert_used,
        n_vocab=n_vocab, swa=bool(window),
    )


def _check_layer_indices(keys: _Keys, n_layer: int, tensors: list[TensorRecord]) -> None:
    """llama.cpp refuses a model with tensors it does not load: a layer
    index at or past block_count."""
    for t in tensors:
        m = _BLOCK.match(t.name)
        if m and int(m.group(1)) >= n_layer:
            raise keys.fail("block_count", f"is less than the layers in the file (tensor {t.name!r})")


def _check_swa_pattern(keys: _Keys, n_layer: int) -> None:
    """llama.cpp asserts that a model with a sliding window has at least one
    sliding-window layer. attention.sliding_window_pattern says which: a
    period whose last layer attends in full (1: every layer does), or one
    flag per layer."""
    name = "attention.sliding_window_pattern"
    kv = keys.header.kv.get(keys.key(name))
    if kv is None:
        return
    if not kv.is_array:
        if keys.u32(name) == 1:
            raise keys.fail(name, "makes every layer full attention, but the model has a sliding window (llama.cpp asserts on that)")
        return
    if kv.sub_type not in (_T.BOOL, _T.INT32, _T.UINT32):
        raise keys.fail(name, f"must be a uint32 or an array of bool, not {_kind(kv)}")
    if kv.count > MAX_LAYERS:
        raise keys.fail(name, f"has more than {MAX_LAYERS} values (llama.cpp's LLAMA_MAX_LAYERS)")
    if not any(read_array(keys.header, keys.key(name))[:n_layer]):
        raise keys.fail(name, "marks no layer as sliding-window, but the model has a sliding window (llama.cpp asserts on that)")


def _check_experts(keys: _Keys, n_layer: int) -> tuple[int, list[int]]:
    """llama.cpp's expert asserts: counts within LLAMA_MAX_EXPERTS, used <=
    total, groups dividing the experts."""
    n_expert = keys.u32("expert_count", 0, MAX_EXPERTS, f"must be 0 to {MAX_EXPERTS} (llama.cpp's LLAMA_MAX_EXPERTS)") or 0
    used = keys.per_layer("expert_used_count", n_layer) or [0] * n_layer
    groups = keys.u32("expert_group_count") or 0
    group_used = keys.u32("expert_group_used_count") or 0
    if max(used) > n_expert:
        raise keys.fail("expert_used_count", f"is more than the {n_expert} experts (expert_count)")
    if n_expert:
        if max(used) == 0:
            raise keys.fail("expert_used_count", f"must be at least 1 when the model has {n_expert} experts (expert_count)")
        if groups >= n_expert:
            raise keys.fail("expert_group_count", f"must be less than the {n_expert} experts (expert_count)")
        if groups > 1:
            if n_expert % groups:
                raise keys.fail("expert_group_count", f"does not divide the {n_expert} experts (expert_count)")
            if not 0 < group_used < groups:
                raise keys.fail("expert_group_used_count", f"must be 1 to {groups - 1} (expert_group_count - 1)")
    elif groups:
        raise keys.fail("expert_group_count", "must be 0 when the model has no experts (expert_count)")
    return n_expert, used


def _check_vocab(keys: _Keys) -> int | None:
    """The tokenizer as llama.cpp's llama_vocab::load reads it; returns the vocabulary size."""
    model = keys.text("tokenizer.ggml.model")
    keys.text("tokenizer.ggml.pre")
    keys.u32("tokenizer.ggml.token_type_count")
    for name in (
        "add_bos_token", "add_eos_token", "add_sep_token", "add_space_prefix", "remove_extra_whitespaces",
        "normalizer.lowercase", "normalizer.strip_accents",
    ):
        keys.flag(f"tokenizer.ggml.{name}")
    if model is None:
        return None
    if model not in _TOKENIZER_DEFAULTS:
        raise keys.fail("tokenizer.ggml.model", f"is not a tokenizer llama.cpp knows ({', '.join(_TOKENIZER_DEFAULTS)})")
    if model in ("no_vocab", "none"):
        return keys.u32("vocab_size", 0, INT32_MAX)
    tokens = keys.typed("tokenizer.ggml.tokens", _T.ARRAY)
    if tokens is None:
        return None
    if tokens.sub_type != _T.STRING:
        raise keys.fail("tokenizer.ggml.tokens", f"must be an array of strings, not {_kind(tokens)}")
    n_vocab = tokens.count
    if not 0 < n_vocab <= INT32_MAX:
        raise keys.fail("tokenizer.ggml.tokens", f"must hold 1 to {INT32_MAX} tokens")
    for name, types in (("scores", (_T.FLOAT32, _T.INT32)), ("token_type", (_T.INT32,))):
        kv = keys.typed(f"tokenizer.ggml.{name}", _T.ARRAY)
        if kv is None:
            continue
        if kv.sub_type not in types:
            want = " or ".join(t.name.lower() for t in types)
            raise keys.fail(f"tokenizer.ggml.{name}", f"must be an array of {want}, not {_kind(kv)}")
        if kv.count < n_vocab:
            raise keys.fail(f"tokenizer.ggml.{name}", f"has fewer entries than the {n_vocab} tokens")
    if model in _NEEDS_MERGES and keys.header.get("tokenizer.ggml.pre") != "kimi-k2":
        merges = keys.typed("tokenizer.ggml.merges", _T.ARRAY)
        if merges is not None and merges.sub_type != _T.STRING:
            raise keys.fail("tokenizer.ggml.merges", f"must be an array of strings, not {_kind(merges)}")
    _check_unique_tokens(keys, tokens, n_vocab)
    _check_special_tokens(keys, model, n_vocab)
    return n_vocab


def _check_special_tokens(keys: _Keys, model: str, n_vocab: int) -> None:
    """llama.cpp asserts while tokenizing that the BOS / EOS / separator token
    it adds exists. Resolve each as it does: the file's id when in range, else
    the tokenizer's default when in range, else none."""
    for name in _SPECIAL_IDS:
        keys.u32(f"tokenizer.ggml.{name}_token_id")

    def resolve(name: str, default: int | None) -> int | None:
        given = keys.header.get(f"tokenizer.ggml.{name}_token_id")
        if given is not None and given < n_vocab:
            return int(given)
        return default if default is not None and default < n_vocab else None

    def missing(name: str) -> str:
        given = keys.header.get(f"tokenizer.ggml.{name}_token_id")
        where = "is missing" if given is None else f"= {given} is past the {n_vocab} tokens"
        return f"tokenizer.ggml.{name}_token_id {where}"

    bos_default, eos_default, sep_default = _TOKENIZER_DEFAULTS[model]
    bos, eos, sep = resolve("bos", bos_default), resolve("eos", eos_default), resolve("seperator", sep_default)
    path = keys.header.path
    if model == "bert":
        for name, token in (("bos", bos), ("seperator", sep)):
            if token is None:
                raise InvalidFileError(f"{path}: a WordPiece (bert) tokenizer always adds BOS and separator tokens but {missing(name)}")
        return
    if model not in _TOKENIZER_ADDS:
        return
    add_bos, add_eos = _TOKENIZER_ADDS[model]
    for name, token, adds in (("bos", bos, add_bos), ("eos", eos, add_eos)):
        add_key = f"tokenizer.ggml.add_{name}_token"
        if keys.header.get(add_key, adds) and token is None:
            said = "is true" if add_key in keys.header.kv else f"is not given (true for {model} tokenizers)"
            raise InvalidFileError(f"{path}: {add_key} {said} but there is no {name.upper()} token: {missing(name)}")


def _check_unique_tokens(keys: _Keys, tokens: KeyValue, n_vocab: int) -> None:
    """llama.cpp asserts that no two vocabulary entries are equal (it renames
    empty ones to "[EMPTY_<id>]" first)."""
    raw = read_raw(keys.header, tokens)
    digest = hashlib.blake2b(raw, digest_size=16).digest()
    if digest in _UNIQUE_VOCABS:
        return
    seen: dict[bytes, int] = {}
    pos = 0
    unpack = struct.Struct("<Q").unpack_from
    for i in range(n_vocab):
        (n,) = unpack(raw, pos)
        text = raw[pos + 8 : pos + 8 + n] or f"[EMPTY_{i}]".encode()
        pos += 8 + n
        first = seen.setdefault(text, i)
        if first != i:
            shown = text.decode("utf-8", "replace")
            raise keys.fail("tokenizer.ggml.tokens", f"tokens {first} and {i} are both {shown[:40]!r} (llama.cpp aborts on duplicates)")
    if len(_UNIQUE_VOCABS) > 64:
        _UNIQUE_VOCABS.clear()
    _UNIQUE_VOCABS.add(digest)


def _check_graph(keys: _Keys, d: Dims) -> None:
    """What the graphs of the checked architectures assume beyond the shared keys."""
    arch = keys.arch
    for name, values in (("attention.head_count", d.n_head), ("attention.head_count_kv", d.n_head_kv), ("feed_forward_length", d.n_ff)):
        if len(set(values)) > 1:
            raise keys.fail(name, f"must be the same for every layer in a {arch} model")
    if keys.header.get(keys.key("nextn_predict_layers"), 0):
        # llama.cpp would leave the last layers' tensors unused and refuse the file.
        raise keys.fail("nextn_predict_layers", f"must be 0 in a {arch} model (it has no next-token prediction layers)")
    if d.n_head[0] == 0:
        raise keys.fail("attention.head_count", f"must be at least 1 in a {arch} model")
    if d.n_head_kv[0] == 0:
        raise keys.fail("attention.head_count_kv", f"must be at least 1 in a {arch} model")
    for name in ("attention.key_length_swa", "attention.value_length_swa", "rope.dimension_count_swa"):
        full = {"attention.key_length_swa": d.head_k, "attention.value_length_swa": d.head_v}.get(name, d.n_rot)
        if keys.header.get(keys.key(name), full) != full:
            raise keys.fail(name, f"must equal the full-attention value {full} in a {arch} model")
    if arch != "gemma3":
        # build_qkv: one head size for Q, K and V, rotated in full.
        if d.head_k != d.head_v:
            raise keys.fail("attention.value_length", f"must equal attention.key_length ({d.head_k}) in a {arch} model")
        if d.n_rot != d.head_k:
            raise keys.fail("rope.dimension_count", f"must equal the head size {d.head_k} in a {arch} model")
    if arch in ("qwen2", "internlm2", "baichuan") and d.head_k * d.n_head[0] != d.n_embd:
        raise keys.fail(
            "attention.head_count",
            f"{d.n_head[0]} heads of {d.head_k} (attention.key_length) must make the embedding length {d.n_embd} in a {arch} model",
        )


def _expected_shapes(arch: str, d: Dims) -> dict[str, tuple[int, ...]]:
    """The shape (ggml order) llama.cpp creates each tensor of ``arch`` with
    (load_arch_tensors; it sizes every layer by layer 0's values)."""
    E, H, KV, F = d.n_embd, d.n_head[0], d.n_head_kv[0], d.n_ff[0]
    if arch in ("qwen2", "internlm2", "baichuan"):
        q, k, v, o = E, d.head_v * KV, d.head_v * KV, E
    elif arch == "qwen3":
        q, k, v, o = d.head_k * H, d.head_v * KV, d.head_v * KV, d.head_k * H
    else:  # llama, gemma3
        q, k, v, o = d.head_k * H, d.head_k * KV, d.head_v * KV, d.head_k * H
    rope = (d.n_rot // 2,)
    shapes: dict[str, tuple[int, ...]] = {
        "output_norm.weight": (E,), "rope_freqs.weight": rope, "rope_factors_long.weight": rope, "rope_factors_short.weight": rope,
    }
    if d.n_vocab is not None:
        shapes.update({"token_embd.weight": (E, d.n_vocab), "output.weight": (E, d.n_vocab), "output.bias": (d.n_vocab,)})
    layer: dict[str, tuple[int, ...]] = {
        "attn_norm.weight": (E,), "ffn_norm.weight": (E,),
        "attn_q.weight": (E, q), "attn_k.weight": (E, k), "attn_v.weight": (E, v), "attn_qkv.weight": (E, q + k + v),
        "attn_q.bias": (q,), "attn_k.bias": (k,), "attn_v.bias": (v,), "attn_qkv.bias": (q + k + v,),
        "attn_output.weight": (o, E), "attn_output.bias": (E,),
    }
    if d.n_expert:
        X = d.n_expert
        layer.update({
            "ffn_gate_inp.weight": (E, X), "ffn_gate_exps.weight": (E, F, X),
            "ffn_up_exps.weight": (E, F, X), "ffn_down_exps.weight": (F, E, X),
        })
    else:
        layer.update({
            "ffn_gate.weight": (E, F), "ffn_up.weight": (E, F), "ffn_down.weight": (F, E),
            "ffn_gate.bias": (F,), "ffn_up.bias": (F,), "ffn_down.bias": (E,),
        })
    if arch in ("qwen3", "gemma3"):
        layer.update({"attn_q_norm.weight": (d.head_k,), "attn_k_norm.weight": (d.head_k,)})
    if arch == "gemma3":
        layer.update({"post_attention_norm.weight": (E,), "post_ffw_norm.weight": (E,)})
    for il in range(d.n_layer):
        shapes.update({f"blk.{il}.{name}": shape for name, shape in layer.items()})
    return shapes


def _check_tensors(keys: _Keys, d: Dims, tensors: list[TensorRecord]) -> None:
    """Every tensor llama.cpp loads must have the shape the hyperparameters
    give it, and every layer must be in the file."""
    expected = _expected_shapes(keys.arch, d)
    layers: set[int] = set()
    for t in tensors:
        m = _BLOCK.match(t.name)
        if m:
            layers.add(int(m.group(1)))
        want = expected.get(t.name)
        if want is None:
            continue
        got = t.shape + (1,) * (4 - len(t.shape))
        if got != want + (1,) * (4 - len(want)):
            raise InvalidFileError(
                f"{keys.header.path}: tensor {t.name!r} has shape {list(t.shape)} but the hyperparameters give "
                f"{list(want)} ({_describe(keys.arch, d)}): the metadata does not match the weights"
            )
    missing = sorted(set(range(d.n_layer)) - layers)
    if layers and missing:
        raise keys.fail("block_count", f"says {d.n_layer} layers but the file has no tensors for layer {missing[0]}")


def _describe(arch: str, d: Dims) -> str:
    parts = [f"embedding {d.n_embd}", f"{d.n_head[0]} heads of {d.head_k}", f"{d.n_head_kv[0]} KV heads", f"feed-forward {d.n_ff[0]}"]
    if d.n_vocab is not None:
        parts.append(f"{d.n_vocab} tokens")
    return f"{arch}: " + ", ".join(parts)
