"""Vision-language models end to end below the scheduler: a tiny random
checkpoint of each architecture and layout (built by transformers here) is
converted by Ember into a language model GGUF and a projector GGUF, loaded
with libmtmd, and must reproduce transformers: the preprocessed pixels (read
at the vision encoder's input), the image embeddings, the logits of a prompt
with an image and its greedy continuation."""

from __future__ import annotations

import ctypes
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from image_fixtures import png_header_only
from vision_fixtures import BUILDERS, VisionFixture, hf_greedy, hf_image_features, hf_logits, hf_pixels, sample_image  # noqa: E402

from ember.convert import plan, write  # noqa: E402
from ember.engine.model import LoadedModel  # noqa: E402
from ember.engine.vision import ImageChunk, VisionProjector, VisionPrompt, decode_image  # noqa: E402

ARCHS = ["internvl", "internvl-original", "gemma3", "qwen25vl"]
#: a test image per architecture, sized so that each preprocessing path runs:
#: InternVL tiles 2x1 plus a resized thumbnail, Gemma 3 one bilinear resize,
#: Qwen2.5-VL a bicubic resize to multiples of 28 (112 x 56)
IMAGE_SIZE = {"internvl": (112, 56), "internvl-original": (112, 56), "gemma3": (80, 60), "qwen25vl": (100, 70)}


@pytest.fixture(scope="module", params=ARCHS)
def vlm(request: Any, tmp_path_factory: Any) -> Any:
    d = tmp_path_factory.mktemp(request.param)
    fx = BUILDERS[request.param](d / "hf")
    lm, proj = write(plan(fx.path, outtype="f32"), d / "model.gguf")
    assert proj == d / "mmproj-model.gguf"
    model = LoadedModel(lm, {"num_thread": 2})
    projector = VisionProjector(model, proj, n_threads=2)
    image = sample_image(*IMAGE_SIZE[request.param])
    yield fx, model, projector, image
    projector.close()
    model.close()


def png(image: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / (b.max() - b.min()))


# ---------------------------------------------------------------------------
# 1. pixels: what libmtmd feeds the encoder equals the image processor's output


def capture_encoder_inputs(model: LoadedModel, proj_path: Path) -> tuple[VisionProjector, list[np.ndarray], Any]:
    """A projector whose encoder input (N, C, H, W per encode) is recorded."""
    import llama_cpp

    from ember.quantize.imatrix_compute import _ggml_lib, _GGMLTensor  # ggml_tensor's layout, as ember imatrix reads it

    lib = _ggml_lib()
    seen: list[np.ndarray] = []
    done: set[int] = set()  # the sources already read (two convolutions read Qwen's input)

    def raw_src(t: _GGMLTensor) -> _GGMLTensor | None:
        for p in t.src:
            if p:
                s = _GGMLTensor.from_address(p)
                if s.name == b"inp_raw":
                    return s
        return None

    def on_tensor(ptr: int, ask: bool, _user: int) -> bool:
        src = raw_src(_GGMLTensor.from_address(ptr))
        if ask:
            return src is not None
        if src is not None and src.data not in done:
            done.add(src.data)
            nx, ny, nc, nb = src.ne
            out = np.empty((nb, nc, ny, nx), dtype=np.float32)
            lib.ggml_backend_tensor_get(ctypes.addressof(src), out.ctypes.data, 0, out.nbytes)
            seen.append(out)
        return True

    cb = llama_cpp.ggml_backend_sched_eval_callback(on_tensor)
    return VisionProjector(model, proj_path, n_threads=2, eval_callback=cb), seen, (cb, done)


def hf_pixel_images(fx: VisionFixture, inputs: dict[str, Any]) -> np.ndarray:
    """transformers' pixel values as images (N, C, H, W)."""
    pv = inputs["pixel_values"].float().numpy()
    if fx.arch != "qwen25vl":
        return pv
    # Qwen2-VL flattens merge-ordered patches, two (identical) frames each: undo it
    t, gh, gw = (int(x) for x in inputs["image_grid_thw"][0])
    m, p = 2, 14
    a = pv.reshape(t, gh // m, gw // m, m, m, 3, 2, p, p)[0, :, :, :, :, :, 0]
    return a.transpose(4, 0, 2, 5, 1, 3, 6).reshape(1, 3, gh * p, gw * p)


def test_pixel_values_match_image_processor(vlm: Any) -> None:
    fx, model, projector, image = vlm
    spy, seen, (_cb, done) = capture_encoder_inputs(model, projector.path)
    try:
        vp = spy.tokenize(f"look: {spy.marker}", [png(image)])
        for chunk in vp.chunks:
            done.clear()
            spy.encode(chunk)
        vp.close()
    finally:
        spy.close()
    ours = np.concatenate(seen)
    ref = hf_pixel_images(fx, hf_pixels(fx, image))
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    # libmtmd resizes with Pillow's own fixed-point algorithm: the same bytes;
    # only the float normalisation order differs (a few ulp)
    assert np.abs(ours - ref).max() < 1e-5


# ---------------------------------------------------------------------------
# 2. embeddings and 3. logits


def encode_all(projector: VisionProjector, vp: VisionPrompt) -> list[np.ndarray]:
    return [projector.encode(c) for c in vp.chunks]


def test_image_embeddings_match_transformers(vlm: Any) -> None:
    fx, model, projector, image = vlm
    vp = projector.tokenize(f"look: {projector.marker}", [png(image)])
    ours = np.concatenate(encode_all(projector, vp))
    batched = np.concatenate(projector.encode_many(vp.chunks))
    vp.close()
    ref = hf_image_features(fx, hf_pixels(fx, image))
    assert ours.shape == ref.shape
    assert rel_diff(ours, ref) < 1e-3
    assert rel_diff(batched, ref) < 1e-3


def ember_logits(model: LoadedModel, projector: VisionProjector, vp: VisionPrompt, n_new: int) -> tuple[list[int], np.ndarray, list[int]]:
    """(transformers-style ids with the image token at image positions, logits
    at every text position, greedy continuation)."""
    ctx = model.new_context(256, options={"kv_cache_type": "f32"})
    try:
        ids: list[int] = []
        rows: list[np.ndarray] = []
        pos = 0
        for piece in vp.pieces:
            if isinstance(piece, ImageChunk):
                pos = decode_image(ctx, projector, piece, projector.encode(piece), 0, pos)
                ids.extend([-1] * piece.n_tokens)
            else:
                ctx.decode([(t, pos + i, 0, True) for i, t in enumerate(piece)])
                rows.extend(ctx.logits_row(i) for i in range(len(piece)))
                ids.extend(piece)
                pos += len(piece)
        out: list[int] = []
        last = rows[-1]
        for _ in range(n_new):
            tok = int(last.argmax())
            out.append(tok)
            ctx.decode([(tok, pos, 0, True)])
            pos += 1
            last = ctx.logits_row(0)
        return ids, np.stack(rows), out
    finally:
        ctx.close()


def test_logits_and_greedy_match_transformers(vlm: Any) -> None:
    fx, model, projector, image = vlm
    vp = projector.tokenize(f"The fox: {projector.marker} is quick and brown, isn't it?", [png(image)])
    ids, ours, greedy = ember_logits(model, projector, vp, 6)
    vp.close()
    hf_ids = [fx.image_token_id if t == -1 else t for t in ids]
    inputs = hf_pixels(fx, image)
    ref = hf_logits(fx, hf_ids, inputs)[[i for i, t in enumerate(ids) if t != -1]]
    assert rel_diff(ours[:, : fx.n_vocab_real], ref[:, : fx.n_vocab_real]) < 1e-3
    assert greedy == hf_greedy(fx, hf_ids, inputs, 6)


# ---------------------------------------------------------------------------
# bad input: one clear error each, the process survives


def test_one_pixel_and_extreme_images_run(vlm: Any) -> None:
    """libmtmd asserts (aborts the process) on sizes its preprocessing cannot
    handle; these reach it only resized or accepted, and decode."""
    fx, model, projector, _ = vlm
    from PIL import Image as PILImage

    for size in ((1, 1), (1, 300), (300, 1), (997, 2)):
        img = PILImage.new("RGB", size, (200, 30, 30))
        vp = projector.tokenize(f"a {projector.marker} b", [png(img)])
        ids, logits, _ = ember_logits(model, projector, vp, 1)
        vp.close()
        assert np.isfinite(logits).all() and ids.count(-1) > 0


def test_bad_images_are_clear_errors(vlm: Any) -> None:
    from ember.errors import ImageError

    fx, model, projector, image = vlm
    cases = {
        b"\x89PNG\r\n\x1a\nnot really": "image 2: corrupt PNG",
        png_header_only(50_000, 50_000): "image 2: its header claims more pixels",
        b"just text": "image 2: not an image",
    }
    for data, expect in cases.items():
        with pytest.raises(ImageError) as e:
            projector.tokenize(f"{projector.marker} and {projector.marker}", [png(image), data])
        assert str(e.value).startswith(expect), str(e.value)
    with pytest.raises(ImageError, match=r"1 image marker\(s\) .* for 2 image\(s\)"):
        projector.tokenize(f"only {projector.marker}", [png(image), png(image)])


def test_image_sent_to_a_text_only_model_is_refused(vlm: Any) -> None:
    from ember.engine.vision import require_projector
    from ember.errors import ImageError

    _, _, projector, _ = vlm
    with pytest.raises(ImageError, match="model 'tiny' cannot see images"):
        require_projector(None, "tiny")
    assert require_projector(projector, "tiny") is projector


def copy_gguf(src: Path, dst: Path, drop: str | None = None, kv: dict[str, Any] | None = None) -> None:
    """A copy of a GGUF without tensor ``drop`` and with keys replaced."""
    import gguf

    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, str(r.fields["general.architecture"].contents()))
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue
        vtype = f.types[0]
        value = (kv or {}).get(f.name, f.contents())
        w.add_key_value(f.name, value, vtype, sub_type=f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None)
    for t in r.tensors:
        if t.name != drop:
            w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_broken_or_mismatched_projectors_are_refused(vlm: Any, tmp_path: Path) -> None:
    """The projector file is checked before libmtmd opens it: its graph
    builders assert (abort the process) on a missing tensor."""
    from ember.errors import InvalidFileError

    fx, model, projector, _ = vlm
    src = projector.path
    with pytest.raises(InvalidFileError, match="not a vision projector"):
        VisionProjector(model, model.paths[0])
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    with pytest.raises(InvalidFileError, match="truncated.gguf"):
        VisionProjector(model, truncated)
    missing = tmp_path / "missing.gguf"
    copy_gguf(src, missing, drop="v.blk.0.attn_q.weight")
    with pytest.raises(InvalidFileError, match="'v.blk.0.attn_q.weight' is missing"):
        VisionProjector(model, missing)
    wrong = tmp_path / "wrong.gguf"
    copy_gguf(src, wrong, kv={"clip.vision.projection_dim": 48})
    with pytest.raises(InvalidFileError, match="48-wide embeddings"):
        VisionProjector(model, wrong)
    shapes = tmp_path / "shapes.gguf"
    copy_gguf(src, shapes, kv={"clip.vision.feed_forward_length": 96})
    with pytest.raises(InvalidFileError, match="ffn_up.weight' has shape"):
        VisionProjector(model, shapes)
    same = tmp_path / "same.gguf"
    copy_gguf(src, same)  # the copy itself is fine
    VisionProjector(model, same).close()


# ---------------------------------------------------------------------------
# 4. the same files through llama.cpp's own multimodal CLI

MTMD_CLI = Path(__file__).resolve().parents[1] / "bench" / ".tools" / "bin" / "llama-mtmd-cli"
#: images both sides preprocess alike: Ember resizes Gemma 3 by stretching
#: (as transformers) where llama.cpp pads, and rounds Qwen's halves to even
CLI_IMAGE = {"internvl": (112, 56), "internvl-original": (90, 60), "gemma3": (56, 56), "qwen25vl": (112, 56)}


def ember_greedy_bytes(model: LoadedModel, projector: VisionProjector, prompt: str, image: bytes, n: int) -> bytes:
    from ember.templates.jinja import JinjaChatTemplate

    assert model.chat_template
    text = JinjaChatTemplate(model.chat_template).render([{"role": "user", "content": projector.marker + prompt}])
    vp = projector.tokenize(text, [image])
    ctx = model.new_context(512)  # Ember's defaults, as the CLI's (f16 KV cache)
    try:
        pos, last = 0, None
        for piece in vp.pieces:
            if isinstance(piece, ImageChunk):
                pos = decode_image(ctx, projector, piece, projector.encode(piece), 0, pos)
            else:
                ctx.decode([(t, pos + i, 0, i == len(piece) - 1) for i, t in enumerate(piece)])
                pos += len(piece)
                last = ctx.logits_row(len(piece) - 1)
        out = b""
        for _ in range(n):
            assert last is not None
            tok = int(last.argmax())
            if model.is_eog(tok):
                break
            out += model.token_bytes(tok, special=True)
            ctx.decode([(tok, pos, 0, True)])
            pos += 1
            last = ctx.logits_row(0)
        return out
    finally:
        ctx.close()
        vp.close()


@pytest.mark.skipif(not MTMD_CLI.exists(), reason="llama-mtmd-cli not built (bench/build_llama_tools.sh)")
def test_greedy_output_equals_llama_mtmd_cli(vlm: Any, tmp_path: Path) -> None:
    import subprocess

    fx, model, projector, _ = vlm
    img = tmp_path / "image.png"
    sample_image(*CLI_IMAGE[fx.arch], seed=3).save(img)
    prompt = "What is in the picture?"
    cmd = [str(MTMD_CLI), "-m", str(model.paths[0]), "--mmproj", str(projector.path), "--image", str(img), "-p", prompt, "-n", "8", "--temp", "0", "-t", "2", "-c", "512"]
    # The CLI prints through llama.cpp's asynchronous logger, which it leaves
    # unflushed at exit: now and then the end of its output is lost (seen here
    # about 1 run in 10). Complete output ends with the "\n\n" it logs last.
    for _ in range(5):
        r = subprocess.run(cmd, capture_output=True, timeout=300)
        assert r.returncode == 0, r.stderr.decode(errors="replace")[-2000:]
        if r.stdout.endswith(b"\n\n") and r.stdout.strip(b"\n"):  # complete, and not lost whole
            break
    ours = ember_greedy_bytes(model, projector, prompt, img.read_bytes(), 8)
    ours = ours.replace(b"\x00", b"").strip(b"\n")  # the CLI prints pieces with "%s": a NUL byte prints nothing
    assert ours and ours == r.stdout.strip(b"\n")


def test_image_into_one_sequence_of_a_shared_context(vlm: Any) -> None:
    """What the scheduler will do: an image prompt decoded into sequence 1 of a
    context whose sequence 0 holds another prompt gives the same logits as alone."""
    fx, model, projector, image = vlm
    vp = projector.tokenize(f"Look: {projector.marker} then", [png(image)])
    _, solo, _ = ember_logits(model, projector, vp, 0)
    ctx = model.new_context(512, n_seq_max=2, options={"kv_cache_type": "f32"})
    try:
        other = [t for p in vp.pieces if isinstance(p, list) for t in p][:5]
        ctx.decode([(t, i, 0, False) for i, t in enumerate(other)])
        pos, rows = 0, []
        embds = projector.encode_many(vp.chunks)  # encoding is separate from decoding, and batched
        chunks = iter(zip(vp.chunks, embds))
        for piece in vp.pieces:
            if isinstance(piece, ImageChunk):
                chunk, embd = next(chunks)
                pos = decode_image(ctx, projector, chunk, embd, 1, pos)
            else:
                ctx.decode([(t, pos + i, 1, True) for i, t in enumerate(piece)])
                rows.extend(ctx.logits_row(i) for i in range(len(piece)))
                pos += len(piece)
        assert pos == vp.n_pos
        assert np.abs(np.stack(rows) - solo).max() < 1e-4
    finally:
        ctx.close()
        vp.close()
