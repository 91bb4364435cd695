"""Images into a language model's sequence through libmtmd (llama.cpp's
multimodal library, bound in ``llama_cpp.mtmd_cpp``).

Three separable steps, so a scheduler can interleave them with other streams:

1. :meth:`VisionProjector.tokenize`: a prompt with :attr:`~VisionProjector.marker`
   where each image goes, plus validated images -> a :class:`VisionPrompt`:
   text token runs and :class:`ImageChunk` s (libmtmd preprocesses here:
   resizing, tiling). Each chunk knows its cache key (the image's hash), how
   many embeddings it yields and how many positions it takes.
2. :meth:`VisionProjector.encode`: image chunks -> embeddings (the vision
   tower; the expensive part, done once per image and cacheable by key).
3. :func:`decode_image`: embeddings -> one sequence of a llama.cpp context at a
   given position (a ``llama_batch`` of embeddings, with M-RoPE positions for
   Qwen2.5-VL and bidirectional attention inside the image where the model
   wants it, Gemma 3).

Text tokens go through the usual token batches (``Context.decode``); after an
image the next text position is ``pos + chunk.n_pos``, which differs from the
number of embeddings for M-RoPE models.
"""

from __future__ import annotations

import ctypes
import math
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import llama_cpp as lc
import numpy as np
from PIL import Image as PILImage

from ember.engine import llama
from ember.engine.model import Context, LoadedModel
from ember.errors import EngineError, ImageError, InvalidFileError
from ember.gguf.clip import check_projector
from ember.images import Image, ImageInput, load_image

_mtmd: Any = None


def _lib() -> Any:
    """``llama_cpp.mtmd_cpp``, imported on first use (it loads libmtmd) with its
    log routed through Ember's llama.cpp log handling."""
    global _mtmd
    if _mtmd is None:
        # lazy: importing mtmd_cpp loads libmtmd, which only vision models use.
        from llama_cpp import mtmd_cpp

        llama.ensure_backend()
        mtmd_cpp.mtmd_log_set(llama.c_log_callback(), ctypes.c_void_p(0))
        _mtmd = mtmd_cpp
    return _mtmd


# ---------------------------------------------------------------------------
# the pieces of a prompt


class ImageChunk:
    """One image (or one tile of it: InternVL gives each tile its own chunk)
    ready to encode. Owns its libmtmd chunk; :meth:`close` frees it."""

    def __init__(self, ptr: Any, image_key: str, index: int, tile: int) -> None:
        m = _lib()
        self._ptr = ptr
        self.image_index = index  # which of the prompt's images it comes from
        self.tile = tile  # its position among that image's chunks
        self.key = f"{image_key}:{tile}"  # the cache key of its embeddings
        self.n_tokens = int(m.mtmd_input_chunk_get_n_tokens(ptr))  # embeddings it yields
        self.n_pos = int(m.mtmd_input_chunk_get_n_pos(ptr))  # positions it takes in the sequence

    @property
    def ptr(self) -> Any:
        if self._ptr is None:
            raise EngineError("image chunk used after close()")
        return self._ptr

    def decoder_positions(self, pos0: int) -> np.ndarray[Any, Any]:
        """M-RoPE positions, section-major (4 x n_tokens): time, row, column, 0."""
        m = _lib()
        tokens = m.mtmd_input_chunk_get_tokens_image(self.ptr)
        out = np.zeros((4, self.n_tokens), dtype=np.int32)
        for i in range(self.n_tokens):
            p = m.mtmd_image_tokens_get_decoder_pos(tokens, pos0, i)
            out[0, i], out[1, i], out[2, i], out[3, i] = p.t, p.y, p.x, p.z
        return out

    def close(self) -> None:
        if self._ptr is not None:
            _lib().mtmd_input_chunk_free(self._ptr)
            self._ptr = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def __repr__(self) -> str:
        return f"ImageChunk(image={self.image_index}, tile={self.tile}, n_tokens={self.n_tokens}, n_pos={self.n_pos})"


Piece = list[int] | ImageChunk


@dataclass
class VisionPrompt:
    """A tokenized prompt: runs of text tokens and image chunks, in order."""

    pieces: list[Piece] = field(default_factory=list)

    @property
    def chunks(self) -> list[ImageChunk]:
        return [p for p in self.pieces if isinstance(p, ImageChunk)]

    @property
    def n_tokens(self) -> int:
        """Entries the context's KV cache will hold (tokens plus embeddings)."""
        return sum(len(p) if isinstance(p, list) else p.n_tokens for p in self.pieces)

    @property
    def n_pos(self) -> int:
        """Positions the prompt takes (the next token's position after it)."""
        return sum(len(p) if isinstance(p, list) else p.n_pos for p in self.pieces)

    def cache_keys(self) -> list[int | str]:
        """One entry per KV cell, for prefix matching: token ids, and
        ``"<image key>#<i>"`` for image embeddings (an image is reusable only
        whole: compare all of its cells)."""
        out: list[int | str] = []
        for p in self.pieces:
            if isinstance(p, list):
                out.extend(p)
            else:
                out.extend(f"{p.key}#{i}" for i in range(p.n_tokens))
        return out

    def close(self) -> None:
        for c in self.chunks:
            c.close()


# ---------------------------------------------------------------------------
# the projector


class VisionProjector:
    """A vision projector (a ``clip`` GGUF, ``mmproj-*.gguf``) loaded with
    libmtmd beside a loaded language model.

    ``eval_callback`` (a ``llama_cpp.ggml_backend_sched_eval_callback``) sees
    every tensor the vision encoder computes: for debugging and for tests that
    read the encoder's input pixels.
    """

    def __init__(self, model: LoadedModel, path: str | os.PathLike[str], *, n_threads: int | None = None, use_gpu: bool | None = None, eval_callback: Any = None) -> None:
        m = _lib()
        self.model = model
        self.path = Path(path)
        self.meta = _check_projector(self.path, model)
        params = m.mtmd_context_params_default()
        params.n_threads = n_threads or model.options.get("num_thread") or llama.physical_cores()
        params.use_gpu = (model.options.get("num_gpu", -1) != 0) if use_gpu is None else use_gpu
        params.print_timings = False
        params.warmup = False  # buffers are sized on the first image; loading stays fast
        min_tokens, max_tokens = _token_limits(self.meta)
        self._min_tokens, self._max_tokens = min_tokens, max_tokens
        if min_tokens:
            params.image_min_tokens = min_tokens
        if max_tokens:
            params.image_max_tokens = max_tokens
        self._eval_callback = eval_callback  # keep a reference: llama.cpp calls it from C
        if eval_callback is not None:
            params.cb_eval = eval_callback
        with llama.capture_log() as lines:
            ptr = m.mtmd_init_from_file(str(self.path).encode(), model.ptr, params)
        if not ptr:
            raise InvalidFileError(f"{self.path}: libmtmd could not load the projector: {llama.last_error(lines)}")
        self.ptr = ptr
        self._lock = threading.Lock()  # one encode at a time per projector
        if not m.mtmd_support_vision(ptr):
            self.close()
            raise InvalidFileError(f"{self.path}: the projector has no vision encoder")
        self.marker: str = (m.mtmd_get_marker(ptr) or m.mtmd_default_marker()).decode()
        self.use_mrope = bool(m.mtmd_decode_use_mrope(ptr))
        self.non_causal = bool(m.mtmd_decode_use_non_causal(ptr, None))
        self.n_embd = int(lc.llama_model_n_embd_inp(model.ptr))

    @property
    def projector_type(self) -> str:
        return str(self.meta.get("clip.projector_type") or self.meta.get("clip.vision.projector_type") or "")

    def close(self) -> None:
        if getattr(self, "ptr", None):
            _lib().mtmd_free(self.ptr)
            self.ptr = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass

    # --- step 1: text + images -> pieces ----------------------------------
    def prepare(self, img: Image) -> Image:
        """Resize where libmtmd's geometry differs from the model's own image
        processor, so libmtmd then sees an image it keeps as is: Gemma 3's
        processor stretches to a square (libmtmd pads, keeping the aspect),
        Qwen2.5-VL's rounds halves to even (libmtmd rounds them up). Pillow
        resamples as transformers does (bilinear, bicubic); the cache key stays
        the original image's."""
        size = target_size(self.meta, img.width, img.height, self._min_tokens, self._max_tokens)
        if size is None or size == (img.width, img.height):
            return img

        resample = PILImage.Resampling.BILINEAR if self.projector_type == "gemma3" else PILImage.Resampling.BICUBIC
        resized = PILImage.fromarray(img.array(), "RGB").resize(size, resample)
        return Image(size[0], size[1], resized.tobytes(), img.key)

    def tokenize(self, prompt: str, images: Sequence[ImageInput | Image] = (), *, add_special: bool = True, parse_special: bool = True) -> VisionPrompt:
        """Split ``prompt`` at each :attr:`marker` and put the matching image
        there (libmtmd adds the model's image delimiters and tiles)."""
        m = _lib()
        imgs = [self.prepare(x if isinstance(x, Image) else load_image(x, i)) for i, x in enumerate(images)]
        n_markers = prompt.count(self.marker)
        if n_markers != len(imgs):
            raise ImageError(f"the prompt has {n_markers} image marker(s) ({self.marker}) for {len(imgs)} image(s)")
        bitmaps = []
        try:
            for img in imgs:
                buf = (ctypes.c_uint8 * len(img.rgb)).from_buffer_copy(img.rgb)  # libmtmd copies it
                bmp = m.mtmd_bitmap_init(img.width, img.height, buf)
                if not bmp:
                    raise ImageError(f"libmtmd refused a {img.width}x{img.height} image")
                m.mtmd_bitmap_set_id(bmp, img.key.encode())
                bitmaps.append(bmp)
            data = prompt.encode("utf-8")
            text = m.mtmd_input_text(data, len(data), add_special, parse_special)
            arr = (m.mtmd_bitmap_p_ctypes * max(1, len(bitmaps)))(*bitmaps)
            chunks = m.mtmd_input_chunks_init()
            try:
                with llama.capture_log() as lines:  # thread-safe in libmtmd: no lock, encoding may run meanwhile
                    rc = m.mtmd_tokenize(self.ptr, chunks, ctypes.byref(text), arr, len(bitmaps))
                if rc != 0:
                    raise ImageError(f"libmtmd could not prepare the image(s) ({llama.last_error(lines)})")
                return self._pieces(chunks)
            finally:
                m.mtmd_input_chunks_free(chunks)
        finally:
            for bmp in bitmaps:
                m.mtmd_bitmap_free(bmp)

    def _pieces(self, chunks: Any) -> VisionPrompt:
        m = _lib()
        out = VisionPrompt()
        index, tile, prev_id = -1, 0, None
        for i in range(m.mtmd_input_chunks_size(chunks)):
            c = m.mtmd_input_chunks_get(chunks, i)
            if m.mtmd_input_chunk_get_type(c) == m.MTMD_INPUT_CHUNK_TYPE_TEXT:
                n = ctypes.c_size_t(0)
                toks = m.mtmd_input_chunk_get_tokens_text(c, ctypes.byref(n))
                if n.value:
                    out.pieces.append([int(toks[j]) for j in range(n.value)])
                prev_id = None
                continue
            cid = (m.mtmd_input_chunk_get_id(c) or b"").decode()
            if cid != prev_id:  # a new image (tiles of one image follow each other, same id)
                index, tile, prev_id = index + 1, 0, cid
            out.pieces.append(ImageChunk(m.mtmd_input_chunk_copy(c), cid, index, tile))
            tile += 1
        return out

    # --- step 2: image chunks -> embeddings --------------------------------
    def encode(self, chunk: ImageChunk) -> np.ndarray[Any, Any]:
        """The chunk's embeddings, float32 (n_tokens, n_embd)."""
        m = _lib()
        with self._lock, llama.capture_log() as lines:
            rc = m.mtmd_encode_chunk(self.ptr, chunk.ptr)
            if rc != 0:
                raise EngineError(f"libmtmd could not encode the image ({llama.last_error(lines)})")
            ptr = m.mtmd_get_output_embd(self.ptr)
            return np.ctypeslib.as_array(ptr, shape=(chunk.n_tokens, self.n_embd)).copy()

    def encode_many(self, chunks: Sequence[ImageChunk]) -> list[np.ndarray[Any, Any]]:
        """Several chunks, batched through the vision tower where libmtmd can
        (same-size tiles of one image, or several images of the same size)."""
        m = _lib()
        out: list[np.ndarray[Any, Any]] = []
        pending = list(chunks)
        with self._lock:
            while pending:
                batch = m.mtmd_batch_init(self.ptr)
                try:
                    group: list[ImageChunk] = []
                    for c in pending:
                        if m.mtmd_batch_add_chunk(batch, c.ptr) != 0:
                            break
                        group.append(c)
                    if not group:
                        raise EngineError("libmtmd could not batch the image")
                    with llama.capture_log() as lines:
                        rc = m.mtmd_batch_encode(batch)
                    if rc != 0:
                        raise EngineError(f"libmtmd could not encode the images ({llama.last_error(lines)})")
                    for c in group:
                        ptr = m.mtmd_batch_get_output_embd(batch, c.ptr)
                        out.append(np.ctypeslib.as_array(ptr, shape=(c.n_tokens, self.n_embd)).copy())
                    pending = pending[len(group) :]
                finally:
                    m.mtmd_batch_free(batch)
        return out


# ---------------------------------------------------------------------------
# step 3: embeddings -> a sequence of a context


def decode_image(ctx: Context, projector: VisionProjector, chunk: ImageChunk, embd: np.ndarray[Any, Any], seq: int, pos0: int, *, logits_last: bool = False) -> int:
    """Put an image's embeddings into sequence ``seq`` of ``ctx`` from position
    ``pos0``; returns the position after it (``pos0 + chunk.n_pos``).

    The embeddings go in ``n_batch``-sized llama_decode calls of this sequence
    alone; for models whose image tokens attend to each other (Gemma 3) the
    whole image must fit in one micro-batch, and causal attention is switched
    off only for that call.
    """
    n, d = embd.shape
    if n != chunk.n_tokens or d != projector.n_embd:
        raise EngineError(f"image embeddings of shape {embd.shape} for a chunk of {chunk.n_tokens} x {projector.n_embd}")
    embd = np.ascontiguousarray(embd, dtype=np.float32)
    n_pos_per = 4 if projector.use_mrope else 1
    if projector.use_mrope:
        pos = chunk.decoder_positions(pos0)
    else:
        pos = (pos0 + np.arange(n, dtype=np.int32))[None, :]
    non_causal = projector.non_causal
    n_ubatch = min(ctx.n_batch, 512)
    if non_causal and n > n_ubatch:
        raise EngineError(f"an image of {n} embeddings needs num_batch of at least {n} for this model (its image tokens attend to each other)")
    step = n if non_causal else ctx.n_batch
    if non_causal:
        lc.llama_set_causal_attn(ctx.ptr, False)
    try:
        for start in range(0, n, step):
            k = min(step, n - start)
            _decode_embd(ctx, embd[start : start + k], np.ascontiguousarray(pos[:, start : start + k]), n_pos_per, seq, logits_last and start + k == n)
    finally:
        if non_causal:
            lc.llama_set_causal_attn(ctx.ptr, True)
    return pos0 + chunk.n_pos


def _decode_embd(ctx: Context, embd: np.ndarray[Any, Any], pos: np.ndarray[Any, Any], n_pos_per: int, seq: int, logits_last: bool) -> None:
    n = embd.shape[0]
    pos_flat = np.ascontiguousarray(pos.reshape(n_pos_per * n), dtype=np.int32)
    n_seq_id = np.ones(n, dtype=np.int32)
    one_seq = (lc.llama_seq_id * 1)(seq)
    seq_ptrs = (ctypes.POINTER(lc.llama_seq_id) * n)(*([ctypes.cast(one_seq, ctypes.POINTER(lc.llama_seq_id))] * n))
    logits = np.zeros(n, dtype=np.int8)
    logits[-1] = int(logits_last)
    batch = lc.llama_batch()
    batch.n_tokens = n
    batch.token = ctypes.POINTER(lc.llama_token)()  # type: ignore[assignment]
    batch.embd = embd.ctypes.data_as(ctypes.POINTER(ctypes.c_float))  # type: ignore[assignment]
    batch.pos = pos_flat.ctypes.data_as(ctypes.POINTER(lc.llama_pos))  # type: ignore[assignment]
    batch.n_seq_id = n_seq_id.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))  # type: ignore[assignment]
    batch.seq_id = seq_ptrs
    batch.logits = logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8))  # type: ignore[assignment]
    rc = lc.llama_decode(ctx.ptr, batch)
    if rc != 0:
        raise EngineError(f"llama_decode of image embeddings failed ({rc}): " + ("the context is full" if rc == 1 else "see EMBER_DEBUG=1"))


def require_projector(projector: VisionProjector | None, model_name: str) -> VisionProjector:
    """The projector that images need, or the error a user sees when a model
    without one is sent an image."""
    if projector is None:
        raise ImageError(f"model {model_name!r} cannot see images: it has no vision projector (convert the model with its vision tower, or add the projector's GGUF as a second FROM in its Modelfile)")
    return projector


# ---------------------------------------------------------------------------
# projector files


def _check_projector(path: Path, model: LoadedModel) -> dict[str, Any]:
    """Validate the projector GGUF before libmtmd opens it and check it fits
    the language model; return its scalar keys."""
    if not path.is_file():
        raise InvalidFileError(f"{path}: no such projector file")
    return check_projector(path, int(lc.llama_model_n_embd_inp(model.ptr)), model.paths[0].name)


def _token_limits(meta: dict[str, Any]) -> tuple[int, int]:
    """libmtmd's image_min/max_tokens from the image processor's pixel limits
    that ``ember convert`` stored (Qwen-VL): images are then resized exactly as
    transformers resizes them. The maximum never exceeds libmtmd's own default
    (4096 tokens), which bounds memory for huge images."""
    ptype = str(meta.get("clip.projector_type") or meta.get("clip.vision.projector_type") or "")
    if ptype != "qwen2.5vl_merger":
        return 0, 0
    patch = int(meta.get("clip.vision.patch_size") or 14) * int(meta.get("clip.vision.spatial_merge_size") or 2)
    lo, hi = meta.get("clip.vision.image_min_pixels"), meta.get("clip.vision.image_max_pixels")
    min_tokens = max(1, int(lo) // (patch * patch)) if lo else 0
    max_tokens = min(4096, int(hi) // (patch * patch)) if hi else 0
    if max_tokens and min_tokens > max_tokens:
        min_tokens = max_tokens
    return min_tokens, max_tokens


def target_size(meta: dict[str, Any], width: int, height: int, min_tokens: int = 0, max_tokens: int = 0) -> tuple[int, int] | None:
    """(width, height) the model's image processor resizes to, where Ember
    resizes itself (None: libmtmd's own preprocessing already matches)."""
    ptype = str(meta.get("clip.projector_type") or meta.get("clip.vision.projector_type") or "")
    if ptype == "gemma3":
        side = int(meta.get("clip.vision.image_size") or 896)
        return side, side
    if ptype == "qwen2.5vl_merger":
        f = int(meta.get("clip.vision.patch_size") or 14) * int(meta.get("clip.vision.spatial_merge_size") or 2)
        lo, hi = (min_tokens or 8) * f * f, (max_tokens or 4096) * f * f
        h, w = max(f, round(height / f) * f), max(f, round(width / f) * f)  # round(): halves to even, as Python
        if h * w > hi:
            beta = math.sqrt(height * width / hi)
            h, w = max(f, math.floor(height / beta / f) * f), max(f, math.floor(width / beta / f) * f)
        elif h * w < lo:
            beta = math.sqrt(lo / (height * width))
            h, w = math.ceil(height * beta / f) * f, math.ceil(width * beta / f) * f
        return w, h
    return None


__all__ = ["ImageChunk", "VisionPrompt", "VisionProjector", "decode_image", "require_projector", "target_size"]
