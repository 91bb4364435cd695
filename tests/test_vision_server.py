"""Images through a real ``ember serve``: a tiny random InternVL checkpoint
(vision_fixtures) converted by Ember and created from a Modelfile with two
FROM lines (model, projector); the ``ollama`` client's ``images`` in chat and
generate and the ``openai`` client's ``image_url`` data: URLs give the same
greedy output as the library (itself checked against transformers in
test_vision_chat.py); bad images are 400s and the model keeps serving."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from image_fixtures import png_header_only
from server_fixtures import Server, create
from vision_fixtures import BUILDERS, sample_image

import ember
from ember.convert import plan, write

QUESTION = "What is in the picture?"
PARAMS = {"temperature": 0, "repeat_penalty": 1.0, "num_predict": 6, "num_ctx": 512}


@pytest.fixture(scope="module")
def served(tmp_path_factory: Any) -> Any:
    d = tmp_path_factory.mktemp("vision-server")
    fx = BUILDERS["internvl"](d / "hf")
    lm, proj = write(plan(fx.path, outtype="f32"), d / "model.gguf")
    image = d / "image.png"
    sample_image(112, 56, seed=3).save(image)
    (d / "models").mkdir()
    server = Server(d / "models")
    try:
        params = "".join(f"PARAMETER {k} {v}\n" for k, v in PARAMS.items())
        create(server.url, "tinyvl", f"FROM {lm}\nFROM {proj}\n{params}")
        with ember.load(lm, projector=proj, **PARAMS) as model:
            chat = model.chat([{"role": "user", "content": QUESTION, "images": [image]}]).text
            gen = model.generate(QUESTION, images=[image]).text
        yield server, image, chat, gen
    finally:
        server.stop()


def test_show_lists_vision(served: Any) -> None:
    server, *_ = served
    show = httpx.post(server.url + "/api/show", json={"model": "tinyvl"}, timeout=60).json()
    assert "vision" in show["capabilities"]


def test_ollama_client_images_in_chat_and_generate(served: Any) -> None:
    server, image, chat, gen = served
    client = server.ollama_client()
    r = client.chat(model="tinyvl", messages=[{"role": "user", "content": QUESTION, "images": [str(image)]}])
    assert r.message.content == chat
    parts = client.chat(model="tinyvl", messages=[{"role": "user", "content": QUESTION, "images": [image.read_bytes()]}], stream=True)
    assert "".join(p.message.content or "" for p in parts) == chat
    g = client.generate(model="tinyvl", prompt=QUESTION, images=[image.read_bytes()])
    assert g.response == gen
    # an image alone is a prompt, not a request to load the model
    alone = client.generate(model="tinyvl", prompt="", images=[image.read_bytes()])
    assert alone.done_reason in ("stop", "length") and alone.eval_count


def test_openai_client_image_url_data(served: Any) -> None:
    server, image, chat, _ = served
    client = server.openai_client()
    url = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    content = [{"type": "text", "text": QUESTION}, {"type": "image_url", "image_url": {"url": url}}]
    r = client.chat.completions.create(model="tinyvl", messages=[{"role": "user", "content": content}])  # type: ignore[list-item]
    assert r.choices[0].message.content == chat
    with pytest.raises(openai.BadRequestError, match="does not fetch https URLs"):
        client.chat.completions.create(model="tinyvl", messages=[{"role": "user", "content": [
            {"type": "text", "text": QUESTION}, {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}])  # type: ignore[list-item]




def test_bad_images_are_400s_and_the_model_keeps_serving(served: Any, demo_model: Path) -> None:
    server, image, chat, _ = served

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    cases = {
        b64(b"\x89PNG\r\n\x1a\nnot really"): "corrupt PNG",
        b64(png_header_only(50_000, 50_000)): "its header claims more pixels",
        "this is *not* base64!": "not valid base64",
        "/etc/hostname": "not valid base64",  # never a path on the server's machine
        b64(b"plain text"): "not an image",
    }
    for bad, expect in cases.items():
        for path, body in (
            ("/api/chat", {"messages": [{"role": "user", "content": "hi", "images": [bad]}]}),
            ("/api/generate", {"prompt": "hi", "images": [bad]}),
        ):
            r = httpx.post(server.url + path, json={"model": "tinyvl", "stream": False, **body}, timeout=120)
            assert r.status_code == 400, (path, bad[:40], r.text)
            assert expect in r.json()["error"] and "\n" not in r.json()["error"]
    huge = "A" * (40 << 20)
    r = httpx.post(server.url + "/api/generate", json={"model": "tinyvl", "prompt": "hi", "images": [huge], "stream": False}, timeout=120)
    assert r.status_code in (400, 413) and "error" in r.json()
    create(server.url, "textonly", f"FROM {demo_model}\n")
    r = httpx.post(server.url + "/api/chat", json={"model": "textonly", "stream": False, "messages": [
        {"role": "user", "content": "hi", "images": [b64(image.read_bytes())]}]}, timeout=120)
    assert r.status_code == 400 and "cannot see images" in r.json()["error"]
    r = httpx.post(server.url + "/api/chat", json={"model": "tinyvl", "stream": False, "messages": [
        {"role": "user", "content": QUESTION, "images": [b64(image.read_bytes())]}]}, timeout=120)
    assert r.status_code == 200 and r.json()["message"]["content"] == chat
