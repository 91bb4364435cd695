"""Images on the web chat page, in headless Chromium against a real server:
attach (file picker), paste and drop an image; it shows as a thumbnail in the
composer and in the sent message, goes to /api/chat as base64, and the reply
is the library's for the same image; the conversation keeps its images across
a reload and resends them; an image sent to a text-only model is an error in
the message, and a file that is not an image is refused with a banner."""

from __future__ import annotations

import base64
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Page, sync_playwright  # noqa: E402
from server_fixtures import Server, create  # noqa: E402
from vision_fixtures import BUILDERS, sample_image  # noqa: E402

import ember  # noqa: E402
from ember.convert import plan, write  # noqa: E402
from ember.demo import demo_model_path  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = Path(__file__).parent / "artifacts"
PARAMS = {"temperature": 0, "repeat_penalty": 1.0, "num_predict": 6, "num_ctx": 512}
QUESTION = "What is in the picture?"


@pytest.fixture(scope="module")
def setup(tmp_path_factory: Any) -> Iterator[Any]:
    if not os.path.exists(CHROMIUM):
        pytest.skip("chromium is not installed (scripts/test.sh installs Debian's chromium)")
    d = tmp_path_factory.mktemp("vision-web")
    fx = BUILDERS["internvl"](d / "hf")
    lm, proj = write(plan(fx.path, outtype="f32"), d / "model.gguf")
    images = []
    for seed in (3, 4):
        images.append(d / f"image{seed}.png")
        sample_image(112, 56, seed=seed).save(images[-1])
    with ember.load(lm, projector=proj, **PARAMS) as model:
        first = {"role": "user", "content": QUESTION, "images": [images[0]]}
        ref1 = model.chat([first]).text
        ref2 = model.chat([first, {"role": "assistant", "content": ref1}, {"role": "user", "content": "And this?", "images": [images[1]]}]).text
    (d / "models").mkdir()
    server = Server(d / "models")
    try:
        params = "".join(f"PARAMETER {k} {v}\n" for k, v in PARAMS.items())
        create(server.url, "tinyvl", f"FROM {lm}\nFROM {proj}\n{params}")
        create(server.url, "demo", f"FROM {demo_model_path()}\n")
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            yield server, browser, images, ref1, ref2
            browser.close()
    finally:
        server.stop()


def open_page(browser: Any, server: Server, errors: list[str], bodies: list[dict[str, Any]]) -> Any:
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if "Content Security Policy" in m.text else None)
    page.on("dialog", lambda dlg: (errors.append("dialog: " + dlg.message), dlg.dismiss()))
    page.on("request", lambda r: bodies.append(json.loads(r.post_data or "{}")) if r.url.endswith("/api/chat") and r.method == "POST" else None)
    page.goto(server.url + "/")
    page.wait_for_selector("#model option[value='tinyvl:latest']", state="attached", timeout=20_000)
    page.select_option("#model", "tinyvl:latest")
    return context, page


def dispatch_file(page: Page, selector: str, kind: str, path: Path, mime: str = "image/png") -> None:
    """A ``paste`` (ClipboardEvent) or ``drop`` (DragEvent) on ``selector``
    carrying ``path`` as a File, as the browser sends them."""
    page.evaluate(
        """([selector, kind, b64, name, mime]) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], name, {type: mime}));
            const init = {bubbles: true, cancelable: true};
            const event = kind === "paste" ? new ClipboardEvent("paste", {...init, clipboardData: dt})
                                           : new DragEvent(kind, {...init, dataTransfer: dt});
            document.querySelector(selector).dispatchEvent(event);
        }""",
        [selector, kind, base64.b64encode(path.read_bytes()).decode(), path.name, mime],
    )


def stored(page: Page) -> list[dict[str, Any]]:
    return list(json.loads(page.evaluate("localStorage.getItem('ember.chats.v1')") or "[]"))


def wait_done(page: Page) -> None:
    page.wait_for_selector("#stop", state="hidden", timeout=120_000)


def test_attach_paste_and_drop_images(setup: Any) -> None:
    server, browser, images, ref1, ref2 = setup
    errors: list[str] = []
    bodies: list[dict[str, Any]] = []
    context, page = open_page(browser, server, errors, bodies)
    try:
        b64 = [base64.b64encode(p.read_bytes()).decode() for p in images]
        # attach with the file picker; a thumbnail shows, and can be removed
        page.set_input_files("#file", str(images[0]))
        page.wait_for_selector("#attachments .thumb")
        page.set_input_files("#file", str(images[1]))
        # A function, not an expression: Playwright evals an expression on each poll, which
        # the page's CSP refuses once the first check (run where CSP does not apply) fails.
        page.wait_for_function("() => document.querySelectorAll('#attachments .thumb').length === 2")
        page.click("#attachments .attachment-remove >> nth=1")
        assert page.locator("#attachments .thumb").count() == 1
        page.fill("#prompt", QUESTION)
        page.keyboard.press("Enter")
        wait_done(page)
        assert page.is_hidden("#attachments")
        assert bodies[-1]["messages"] == [{"role": "user", "content": QUESTION, "images": [b64[0]]}]
        assert page.locator(".msg.user .msg-images img.thumb").count() == 1
        assert page.get_attribute(".msg.user .msg-images img.thumb", "src") == "data:image/png;base64," + b64[0]
        assert stored(page)[0]["messages"][1]["content"] == ref1
        # paste the second image into the message box
        dispatch_file(page, "#prompt", "paste", images[1])
        page.wait_for_selector("#attachments .thumb")
        page.fill("#prompt", "And this?")
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "web-vision-attached.png"))
        page.keyboard.press("Enter")
        wait_done(page)
        sent = bodies[-1]["messages"]
        assert sent[0]["images"] == [b64[0]] and sent[2] == {"role": "user", "content": "And this?", "images": [b64[1]]}
        assert stored(page)[0]["messages"][3]["content"] == ref2
        page.screenshot(path=str(ARTIFACTS / "web-vision-thread.png"))
        # after a reload the thread still shows both images, and Retry resends them
        page.reload()
        page.wait_for_selector(".msg.user .msg-images img.thumb >> nth=1")
        page.wait_for_selector("#model option[value='tinyvl:latest']", state="attached")
        page.click(".msg.assistant >> nth=-1 >> [data-action=retry]")
        wait_done(page)
        assert bodies[-1]["messages"] == sent
        assert stored(page)[0]["messages"][3]["content"] == ref2
        # drop an image on the chat: it goes with the next message only
        page.click("#new-chat")
        dispatch_file(page, ".main", "dragover", images[0])
        assert "dropping" in (page.get_attribute("#composer", "class") or "")
        dispatch_file(page, "#messages", "drop", images[0])
        page.wait_for_selector("#attachments .thumb")
        assert not page.is_disabled("#send")  # an image alone can be sent
        page.click("#send")
        wait_done(page)
        assert bodies[-1]["messages"] == [{"role": "user", "content": "", "images": [b64[0]]}]
        assert page.locator(".msg.assistant .msg-error").count() == 0
    finally:
        context.close()
    assert errors == []


def test_bad_images_and_a_text_only_model(setup: Any, tmp_path: Path) -> None:
    server, browser, images, *_ = setup
    errors: list[str] = []
    bodies: list[dict[str, Any]] = []
    context, page = open_page(browser, server, errors, bodies)
    try:
        svg = tmp_path / "drawing.svg"
        svg.write_text("<svg xmlns='http://www.w3.org/2000/svg'><script>alert(1)</script></svg>")
        page.set_input_files("#file", str(svg))
        page.wait_for_selector("#banner:not([hidden])")
        assert "is not an image the models read" in page.inner_text("#banner-text")
        assert page.is_hidden("#attachments")
        page.wait_for_selector("#model option[value='demo:latest']", state="attached")
        page.select_option("#model", "demo:latest")
        page.set_input_files("#file", str(images[0]))
        page.wait_for_selector("#attachments .thumb")
        page.fill("#prompt", "hi")
        page.keyboard.press("Enter")
        wait_done(page)
        error = page.inner_text(".msg.assistant .msg-error")
        assert "cannot see images" in error
    finally:
        context.close()
    assert errors == []
