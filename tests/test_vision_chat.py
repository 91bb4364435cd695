"""Images through the library: ``ember.load(..., projector=...)`` and
``Model.chat`` / ``Model.generate`` with images, scheduled by the engine's
scheduler beside other sequences. Tiny random vision-language checkpoints
built by transformers (vision_fixtures), converted by Ember: the greedy output
of a chat with an image equals transformers' greedy continuation of the same
ids and pixels (and ``llama-mtmd-cli``'s on the same files, where it is
built); requests with different images running together each give their solo
output; the prefix cache reuses an image only when it is the same image."""

from __future__ import annotations

import base64
import io
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
from image_fixtures import png_header_only
from vision_fixtures import BUILDERS, hf_logits, hf_pixels, sample_image

import ember
from ember.convert import plan, write
from ember.engine.vision import ImageChunk
from ember.errors import ContextOverflowError, ImageError
from ember.request import GenerationRequest

#: InternVL (several tiles: several image chunks per image), Gemma 3 (image
#: tokens attend to each other) and Qwen2.5-VL (M-RoPE: an image takes fewer
#: positions than KV cells)
ARCHS = ["internvl", "gemma3", "qwen25vl"]
#: sizes llama-mtmd-cli preprocesses as transformers does (test_vision.py)
SIZE = {"internvl": (112, 56), "gemma3": (56, 56), "qwen25vl": (112, 56)}
GREEDY = {"temperature": 0, "repeat_penalty": 1.0, "num_predict": 6, "num_thread": 2}
QUESTION = "What is in the picture?"


@pytest.fixture(scope="module", params=ARCHS)
def vlm(request: Any, tmp_path_factory: Any) -> Any:
    d = tmp_path_factory.mktemp(request.param)
    fx = BUILDERS[request.param](d / "hf")
    lm, proj = write(plan(fx.path, outtype="f32"), d / "model.gguf")
    images = []
    for seed in (3, 4):
        path = d / f"image{seed}.png"
        sample_image(*SIZE[fx.arch], seed=seed).save(path)
        images.append(path)
    yield fx, lm, proj, images


def load(vlm: Any, **kw: Any) -> ember.Model:
    """The converted model with its projector; an F32 KV cache (as transformers
    computes) unless ``kw`` says otherwise."""
    _, lm, proj, _ = vlm
    return ember.load(lm, projector=proj, num_ctx=512, **{"num_thread": 2, "kv_cache_type": "f32", **kw})


def hf_ids(fx: Any, model: ember.Model, request: GenerationRequest) -> list[int]:
    """The ids Ember evaluates for ``request``, with transformers' image token
    at every image cell."""
    assert model.projector is not None
    vp = model.projector.tokenize(model.render(request), model.images(request))
    assert any(isinstance(p, ImageChunk) for p in vp.pieces)
    ids = [t for p in vp.pieces for t in (p if isinstance(p, list) else [fx.image_token_id] * p.n_tokens)]
    vp.close()
    return ids


def generated(result: ember.Result) -> list[int]:
    return result.context[len(result.context) - result.eval_count :]


def check_greedy(fx: Any, model: ember.Model, result: ember.Result, request: GenerationRequest, image: Path) -> None:
    """Each token Ember chose is transformers' argmax after the same ids and
    pixels (a tie within 1e-3 of the logits' range, which float rounding may
    break either way, accepts both); an early stop is transformers' choice too."""
    from PIL import Image

    ids, ours = hf_ids(fx, model, request), generated(result)
    ends = result.done_reason == "stop" and len(ours) < GREEDY["num_predict"]
    logits = hf_logits(fx, ids + ours, hf_pixels(fx, Image.open(image).convert("RGB")))[:, : fx.n_vocab_real]
    for k in range(len(ours) + int(ends)):
        row = logits[len(ids) - 1 + k]
        best = int(row.argmax())
        if k == len(ours):
            assert model.engine.is_eog(best)
        elif ours[k] != best:
            assert row[best] - row[ours[k]] < 1e-3 * (row.max() - row.min()), (k, ours, best)


def test_chat_with_an_image_equals_transformers_greedy(vlm: Any) -> None:
    fx, _, _, images = vlm
    with load(vlm) as model:
        assert model.vision
        messages = [{"role": "user", "content": QUESTION, "images": [images[0]]}]
        result = model.chat(messages, **GREEDY)
        check_greedy(fx, model, result, GenerationRequest(messages=messages), images[0])
        # every way of giving the image is the same image
        data = images[0].read_bytes()
        from PIL import Image

        for given in (str(images[0]), data, base64.b64encode(data).decode(), Image.open(images[0])):
            again = model.chat([{"role": "user", "content": QUESTION}], images=[given], **GREEDY)
            assert generated(again) == generated(result)
        # generate puts the image in front of the prompt, as Ollama does
        gen = model.generate(QUESTION, images=[data], **GREEDY)
        check_greedy(fx, model, gen, GenerationRequest(prompt=QUESTION, images=[data]), images[0])


def test_same_image_reuses_the_cache_a_different_one_does_not(vlm: Any) -> None:
    fx, _, _, images = vlm
    with load(vlm) as model:
        def ask(image: Path) -> ember.Result:
            return model.chat([{"role": "user", "content": QUESTION, "images": [image]}], **GREEDY)

        first = ask(images[0])
        again = ask(images[0])
        assert again.prompt_tokens == first.prompt_tokens
        assert again.prompt_eval_count == 1  # all but the last token came from the cache
        assert generated(again) == generated(first)
        other = ask(images[1])
        # the text before the image is reused, the image and all after it evaluated
        assert model.projector is not None
        vp = model.projector.tokenize(model.render(GenerationRequest(messages=[{"role": "user", "content": QUESTION, "images": [images[1]]}])), [images[1]])
        before = 0
        for p in vp.pieces:
            if not isinstance(p, list):
                break
            before += len(p)
        vp.close()
        assert other.prompt_eval_count == other.prompt_tokens - before
        check_greedy(fx, model, other, GenerationRequest(messages=[{"role": "user", "content": QUESTION, "images": [images[1]]}]), images[1])


def test_concurrent_requests_with_different_images_give_their_solo_output(vlm: Any) -> None:
    _, _, _, images = vlm
    opts = {**GREEDY, "num_predict": 12}

    def ask(model: ember.Model, i: int) -> list[int]:
        msgs = [{"role": "user", "content": f"Picture {i}, what is it?", "images": [images[i]]}]
        return generated(model.chat(msgs, **opts))

    with load(vlm, num_parallel=2, batch_invariant=True) as model:
        solo = [ask(model, 0), ask(model, 1)]
    with load(vlm, num_parallel=2, batch_invariant=True) as model:  # a cold cache
        out: dict[int, list[int]] = {}
        threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, ask(model, i))) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
    assert out == {0: solo[0], 1: solo[1]}


def test_prompt_ending_with_an_image_and_several_images(vlm: Any) -> None:
    _, _, _, images = vlm
    with load(vlm) as model:
        assert model.projector is not None
        marker = model.projector.marker
        r = model.generate(f"two pictures: [img] and {marker}", images=images, raw=True, **GREEDY)
        assert r.eval_count > 0 or r.done_reason == "stop"
        r = model.generate(f"a picture: {marker}", images=[images[0]], raw=True, **GREEDY)
        assert r.prompt_tokens > 5 and r.done_reason in ("stop", "length")




def test_bad_images_are_one_line_errors(vlm: Any, demo_model: Path) -> None:
    _, _, _, images = vlm
    from PIL import Image

    one = io.BytesIO()
    Image.new("RGB", (1, 1), (9, 9, 9)).save(one, "PNG")
    with load(vlm) as model:
        cases = {
            b"\x89PNG\r\n\x1a\nnot really": "image 2: corrupt PNG",
            png_header_only(50_000, 50_000): "image 2: its header claims more pixels",
            "bm90IGFuIGltYWdl": "image 2: not an image",
            "./no-such-picture.png": "image 2 (./no-such-picture.png): no such file",
        }
        for bad, expect in cases.items():
            with pytest.raises(ImageError) as e:
                model.chat([{"role": "user", "content": "a", "images": [images[0]]}, {"role": "user", "content": "b", "images": [bad]}])
            assert str(e.value).startswith(expect) and "\n" not in str(e.value)
        with pytest.raises(ImageError, match="only base64 data: URLs"):
            model.generate("x", images=["data:image/png,rawbytes"])
        # a 1-pixel image is an image like any other
        assert model.generate("x", images=[one.getvalue()], **GREEDY).done_reason in ("stop", "length")
        with pytest.raises(ContextOverflowError, match="with its images takes"):
            model.generate("x", images=[images[0]] * 100, **GREEDY)
        assert model.chat([{"role": "user", "content": QUESTION, "images": [images[0]]}], **GREEDY).eval_count > 0
    with ember.load(demo_model, num_ctx=256, num_thread=2) as text_only:
        assert not text_only.vision
        with pytest.raises(ImageError, match="cannot see images: it has no vision projector"):
            text_only.chat([{"role": "user", "content": "hi", "images": [images[0]]}])
        with pytest.raises(ImageError, match="cannot see images"):
            text_only.generate("hi", images=[images[0]])


MTMD_CLI = Path(__file__).resolve().parents[1] / "bench" / ".tools" / "bin" / "llama-mtmd-cli"


@pytest.mark.skipif(not MTMD_CLI.exists(), reason="llama-mtmd-cli not built (bench/build_llama_tools.sh)")
def test_chat_greedy_equals_llama_mtmd_cli(vlm: Any) -> None:
    """llama-mtmd-cli renders the GGUF's template with the image marker before
    the prompt, as Ember places a message's images."""
    _, lm, proj, images = vlm
    cmd = [str(MTMD_CLI), "-m", str(lm), "--mmproj", str(proj), "--image", str(images[0]), "-p", QUESTION, "-n", "6", "--temp", "0", "-t", "2", "-c", "512"]
    for _ in range(5):  # its logger loses the end of the output now and then (see test_vision.py)
        r = subprocess.run(cmd, capture_output=True, timeout=300, check=False)
        assert r.returncode == 0, r.stderr.decode(errors="replace")[-2000:]
        if r.stdout.endswith(b"\n\n") and r.stdout.strip(b"\n"):  # complete, and not lost whole
            break
    with load(vlm, kv_cache_type="f16") as model:  # the CLI's default
        result = model.chat([{"role": "user", "content": QUESTION, "images": [images[0]]}], **GREEDY)
        ours = b"".join(model.engine.token_bytes(t, special=True) for t in generated(result))
    assert ours.replace(b"\x00", b"").strip(b"\n") == r.stdout.strip(b"\n")


def test_a_checkpoint_folder_loads_with_its_vision_tower(vlm: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``ember.load("./checkpoint")`` converts the folder once and loads the
    projector written beside the language model."""
    fx, _, _, images = vlm
    monkeypatch.setenv("EMBER_CACHE", str(tmp_path / "cache"))
    with ember.load(fx.path, num_ctx=512, num_thread=2) as model:
        assert model.vision and model.projector is not None
        assert model.projector.path.name.startswith("mmproj-")
        r = model.chat([{"role": "user", "content": QUESTION, "images": [images[0]]}], **GREEDY)
        assert r.prompt_tokens > len(model.tokenize(QUESTION)) + 8 and r.done_reason in ("stop", "length")
