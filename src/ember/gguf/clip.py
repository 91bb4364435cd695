"""Vision projector GGUFs (llama.cpp's ``clip`` format, ``mmproj-*.gguf``):
structural checks before libmtmd opens one. libmtmd's graph builders assert
(and so abort the whole process) on a missing tensor or a shape that does not
fit the hyperparameters; here each becomes an :class:`InvalidFileError`.

Only the projector types Ember converts and tests are accepted: InternVL,
Gemma 3 and Qwen2.5-VL.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ember.errors import InvalidFileError
from ember.gguf.validate import read_header


def check_projector(path: str | os.PathLike[str], model_n_embd: int | None = None, model_name: str = "the model") -> dict[str, Any]:
    """Check a projector file (header, keys, every tensor's shape) and, given
    the language model's input width, that it belongs to that model; return
    its scalar keys."""
    path = Path(path)
    header = read_header(path)
    meta = {k: kv.value for k, kv in header.kv.items() if not kv.is_array}
    if meta.get("general.architecture") != "clip":
        raise InvalidFileError(f"{path}: not a vision projector (general.architecture is {meta.get('general.architecture')!r}, expected 'clip')")
    if not meta.get("clip.has_vision_encoder"):
        raise InvalidFileError(f"{path}: the projector has no vision encoder")
    dim = meta.get("clip.vision.projection_dim")
    if model_n_embd is not None and dim != model_n_embd:
        raise InvalidFileError(f"{path}: the projector makes {dim}-wide embeddings but {model_name} takes {model_n_embd}; they are not from the same model")
    try:
        check_clip(meta, {t.name: (t.shape, t.type.name) for t in header.tensors})
    except InvalidFileError as e:
        raise InvalidFileError(f"{path}: {e}") from None
    return meta


def check_clip(meta: dict[str, Any], tensors: dict[str, tuple[tuple[int, ...], str]]) -> None:
    """Every tensor libmtmd's graph for this projector type uses, with the
    shape the hyperparameters imply: its graph builders assert (and abort the
    process) where a Python check can refuse the file instead. ``meta`` holds
    the scalar keys, ``tensors`` each tensor's shape (ggml order, ne[0] first)
    and type name; the converter checks what it is about to write the same way."""
    ptype = str(meta.get("clip.projector_type") or meta.get("clip.vision.projector_type") or "")
    if ptype not in _SUPPORTED:
        raise InvalidFileError(f"projector type {ptype!r} is not supported; Ember runs {', '.join(sorted(_SUPPORTED))} projectors")

    def u(key: str) -> int:
        v = meta.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or not 0 < v < 1 << 20:
            raise InvalidFileError(f"{key} is {v!r}; the projector's hyperparameters are missing or out of range")
        return v

    e, f, n_layer, n_head = u("clip.vision.embedding_length"), u("clip.vision.feed_forward_length"), u("clip.vision.block_count"), u("clip.vision.attention.head_count")
    p, size, d = u("clip.vision.patch_size"), u("clip.vision.image_size"), u("clip.vision.projection_dim")
    if e % n_head or (e // n_head) % 4:
        raise InvalidFileError(f"embedding_length {e} does not split into {n_head} heads of a size divisible by 4")
    need: dict[str, tuple[int, ...]] = {"v.patch_embd.weight": (p, p, 3, e)}
    maybe: dict[str, tuple[int, ...]] = {"v.patch_embd.bias": (e,), "v.post_ln.weight": (e,), "v.post_ln.bias": (e,)}
    for i in range(n_layer):
        b = f"v.blk.{i}."
        for w in ("attn_q", "attn_k", "attn_v", "attn_out"):
            need[b + w + ".weight"] = (e, e)
            maybe[b + w + ".bias"] = (e,)
        for w in ("ln1", "ln2"):
            need[b + w + ".weight"] = (e,)
            maybe[b + w + ".bias"] = (e,)
        need[b + "ffn_up.weight"], need[b + "ffn_down.weight"] = (e, f), (f, e)
        maybe[b + "ffn_up.bias"], maybe[b + "ffn_down.bias"] = (f,), (e,)
        maybe[b + "ls1.weight"] = maybe[b + "ls2.weight"] = (e,)
        if ptype == "qwen2.5vl_merger":
            need[b + "ffn_gate.weight"], maybe[b + "ffn_gate.bias"] = (e, f), (f,)
    if ptype == "internvl":
        k = int(meta.get("clip.vision.projector.scale_factor") or 0)
        grid = size // p
        if size % p or k <= 0 or grid % k:
            raise InvalidFileError(f"image_size {size}, patch_size {p} and scale_factor {k} do not tile evenly")
        need |= {"v.class_embd": (e,), "v.position_embd.weight": (e, grid * grid + 1), "mm.model.mlp.0.weight": (e * k * k,),
                 "mm.model.mlp.1.weight": (e * k * k, d), "mm.model.mlp.3.weight": (d, d)}
        maybe |= {"mm.model.mlp.0.bias": (e * k * k,), "mm.model.mlp.1.bias": (d,), "mm.model.mlp.3.bias": (d,)}
    elif ptype == "gemma3":
        k = int(meta.get("clip.vision.projector.scale_factor") or 4)
        grid = size // p
        if size % p or k <= 0 or grid % k:
            raise InvalidFileError(f"image_size {size}, patch_size {p} and scale_factor {k} do not pool evenly")
        need |= {"v.position_embd.weight": (e, grid * grid), "mm.input_projection.weight": (d, e), "mm.soft_emb_norm.weight": (e,)}
    else:  # qwen2.5vl_merger
        if not meta.get("clip.vision.n_wa_pattern"):
            raise InvalidFileError("clip.vision.n_wa_pattern is missing; a Qwen2.5-VL projector needs it")
        need |= {"v.patch_embd.weight.1": (p, p, 3, e), "v.post_ln.weight": (e,), "mm.0.weight": (4 * e, 4 * e), "mm.2.weight": (4 * e, d)}
        maybe |= {"mm.0.bias": (4 * e,), "mm.2.bias": (d,)}
        if "v.patch_embd.bias" in tensors or "v.class_embd" in tensors:
            raise InvalidFileError("a Qwen2.5-VL projector has no patch bias or class embedding")
    for name in need:
        if name not in tensors:
            raise InvalidFileError(f"tensor {name!r} is missing; the projector is incomplete")
    for name, shape in [*need.items(), *maybe.items()]:
        t = tensors.get(name)
        if t is not None and _squeeze(t[0]) != _squeeze(shape):
            raise InvalidFileError(f"tensor {name!r} has shape {list(t[0])}, expected {list(shape)} for these hyperparameters")
    for name in ("v.patch_embd.weight", "v.patch_embd.weight.1"):
        if name in tensors and tensors[name][1] not in ("F32", "F16"):
            raise InvalidFileError(f"tensor {name!r} is {tensors[name][1]}; the patch convolution needs F32 or F16")


_SUPPORTED = ("internvl", "gemma3", "qwen2.5vl_merger")


def _squeeze(shape: tuple[int, ...]) -> tuple[int, ...]:
    out = tuple(shape)
    while len(out) > 1 and out[-1] == 1:
        out = out[:-1]
    return out
