"""The web chat page of `ember serve`, end to end in headless Chromium (Debian's
chromium driven by Playwright) against a real server subprocess with the demo
model: streamed replies, stop, model switching, edit and resend, conversations
kept across reloads, safe Markdown (model and stored text never become HTML),
error messages, and phone/desktop layouts (screenshots in tests/artifacts/)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import httpx
import pytest
from gguf_fixtures import write_tiny_gguf
from playwright.sync_api import Browser, Page, Request, ViewportSize, sync_playwright  # noqa: E402
from server_fixtures import Server, create

from ember.demo import demo_model_path

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]
ARTIFACTS = Path(__file__).parent / "artifacts"
DESKTOP: ViewportSize = {"width": 1280, "height": 800}
PHONE: ViewportSize = {"width": 390, "height": 844}
SMALL_PHONE: ViewportSize = {"width": 375, "height": 667}
Scheme = Literal["light", "dark"]
# A base model continues the pattern: greedy decoding echoes the tags back.
ECHO_SCRIPT = "<script>alert(1)</script>\n<script>alert(1)</script>\n<script>alert(1)</script>\n<script>"
STATS = re.compile(r"\d+ tokens · \d+(\.\d)? tok/s · TTFT \d+\.\d\d s")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    models = tmp_path_factory.mktemp("web-models")
    srv = Server(models, EMBER_NUM_PARALLEL="2")
    try:
        create(srv.url, "demo", f"FROM {demo_model_path()}\n")
        create(srv.url, "demo2", f"FROM {demo_model_path()}\n")
        # Registers fine, but llama.cpp cannot load it (hyperparameters missing).
        write_tiny_gguf(models / "tiny.gguf")
        create(srv.url, "broken", f"FROM {models / 'tiny.gguf'}\n")
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not os.path.exists(CHROMIUM):
        pytest.skip("chromium is not installed (scripts/test.sh installs Debian's chromium)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


class Tab:
    """One page in a fresh browser context (own localStorage) that records
    dialogs (an alert() would be an injection), page errors and /api/chat bodies."""

    def __init__(self, browser: Browser, url: str, viewport: ViewportSize, scheme: Scheme) -> None:
        self.context = browser.new_context(viewport=viewport, color_scheme=scheme)
        self.page: Page = self.context.new_page()
        self.url = url
        self.dialogs: list[str] = []
        self.errors: list[str] = []
        self.chat_bodies: list[dict[str, Any]] = []
        self.page.on("dialog", self._dialog)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("console", self._console)
        self.page.on("request", self._request)

    def _console(self, msg: Any) -> None:
        # Failed requests are expected in some tests; a blocked resource is a bug.
        if "Content Security Policy" in msg.text:
            self.errors.append(msg.text)

    def _dialog(self, dialog: Any) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def _request(self, req: Request) -> None:
        if req.url.endswith("/api/chat") and req.method == "POST":
            self.chat_bodies.append(json.loads(req.post_data or "{}"))

    def open(self, *, settings: dict[str, str] | None = None, chats: list[dict[str, Any]] | None = None) -> Page:
        page = self.page
        page.goto(self.url + "/")
        if settings is not None or chats is not None:
            page.evaluate(
                """([settings, chats]) => {
                    if (settings) localStorage.setItem('ember.settings.v1', JSON.stringify(settings));
                    if (chats) {
                        localStorage.setItem('ember.chats.v1', JSON.stringify(chats));
                        localStorage.setItem('ember.current', chats[0].id);
                    }
                }""",
                [settings, chats],
            )
            page.reload()
        return page

    def wait_models(self, name: str = "demo:latest") -> None:
        self.page.wait_for_selector(f"#model option[value='{name}']", state="attached", timeout=20_000)

    def send(self, text: str) -> None:
        self.page.fill("#prompt", text)
        self.page.keyboard.press("Enter")

    def last_reply(self) -> str:
        return self.page.inner_text(".msg.assistant >> nth=-1 >> .md")

    def wait_done(self, timeout: float = 90) -> None:
        self.page.wait_for_selector("#stop", state="hidden", timeout=timeout * 1000)

    def shot(self, name: str) -> None:
        ARTIFACTS.mkdir(exist_ok=True)
        self.page.screenshot(path=str(ARTIFACTS / name))

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def tabs(browser: Browser, server: Server) -> Iterator[Any]:
    opened: list[Tab] = []

    def make(viewport: ViewportSize = DESKTOP, scheme: Scheme = "light", url: str | None = None) -> Tab:
        tab = Tab(browser, url or server.url, viewport, scheme)
        opened.append(tab)
        return tab

    yield make
    for tab in opened:
        tab.close()
    for tab in opened:
        assert tab.dialogs == [], f"a dialog opened: injected script ran: {tab.dialogs}"
        assert tab.errors == [], f"JavaScript errors on the page: {tab.errors}"


def running(server: Server) -> int:
    return sum(int(m["running"]) for m in server.ps())


def stored_chats(page: Page) -> list[dict[str, Any]]:
    return list(json.loads(page.evaluate("localStorage.getItem('ember.chats.v1')") or "[]"))


# --------------------------------------------------------------------------- tests


def test_streamed_reply_settings_script_echo_and_reload(tabs: Any, server: Server) -> None:
    """Settings reach the request; the reply streams in (grows over time); a model
    reply made of <script> tags shows as text; reload finds the conversation."""
    tab = tabs()
    page = tab.open()
    tab.wait_models()
    page.select_option("#model", "demo:latest")
    page.click("#settings-toggle")
    page.fill("#opt-system", "Continue the text.")
    page.fill("#opt-temperature", "0")
    page.fill("#opt-num-ctx", "2048")
    page.fill("#opt-num-predict", "12")
    page.click("#settings-close")
    assert page.is_hidden("#settings")

    # Record the reply's length at every DOM update while it streams in.
    page.evaluate(
        """() => {
            window.__lengths = [];
            new MutationObserver(() => {
                const md = document.querySelector('.md.streaming');  // a reply with text, still streaming
                if (md) window.__lengths.push(md.textContent.length);
            }).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});
        }"""
    )
    tab.send(ECHO_SCRIPT)
    tab.wait_done()
    lengths = page.evaluate("window.__lengths")
    grown = sorted(set(n for n in lengths if n > 0))
    assert len(grown) >= 3, f"the reply did not stream in pieces: lengths seen {lengths}"
    assert lengths == sorted(lengths), f"the streamed reply shrank: {lengths}"

    body = tab.chat_bodies[-1]
    assert body["model"] == "demo:latest" and body["stream"] is True
    assert body["options"] == {"temperature": 0, "num_ctx": 2048, "num_predict": 12}
    assert body["messages"] == [
        {"role": "system", "content": "Continue the text."},
        {"role": "user", "content": ECHO_SCRIPT},
    ]

    reply = tab.last_reply()
    assert "</script>" in reply and "alert(1)" in reply, reply  # the model echoed the tags...
    assert page.locator("#messages script").count() == 0  # ...and they stayed text
    assert "&lt;/script&gt;" in page.inner_html(".msg.assistant .md")
    assert page.inner_text(".msg.user .md").startswith("<script>alert(1)</script>")
    meta = page.inner_text(".msg.assistant .meta")
    assert STATS.search(meta), meta
    assert "12 tokens" in meta and "max tokens reached" in meta
    tab.shot("web-desktop-stream.png")

    page.reload()
    tab.wait_models()
    assert page.inner_text(".conv-item.active .conv-title").startswith("<script>alert(1)</script>")
    assert tab.last_reply() == reply
    assert page.title().startswith("<script>alert(1)</script>") and page.title().endswith(" · Ember")
    assert STATS.search(page.inner_text(".msg.assistant .meta"))
    assert page.input_value("#opt-num-predict") == "12"  # settings survive too
    assert page.locator("#messages script").count() == 0

    page.click("#new-chat")
    page.wait_for_selector(".empty")
    assert page.locator(".conv-item").count() == 2
    page.click(".conv-item >> nth=1")
    assert tab.last_reply() == reply


def test_stop_mid_reply_frees_the_sequence(tabs: Any, server: Server) -> None:
    tab = tabs()
    page = tab.open(settings={"num_predict": "400", "temperature": "0"})
    tab.wait_models()
    page.select_option("#model", "demo:latest")
    tab.send("Write a long story about a lighthouse keeper.")
    page.wait_for_function(
        "() => { const m = document.querySelectorAll('.msg.assistant .md'); "
        "return m.length && m[m.length - 1].textContent.trim().length > 0; }",
        timeout=90_000,
    )
    assert running(server) == 1
    page.click("#stop")
    tab.wait_done(timeout=5)
    assert server.wait_running("demo:latest", 0, timeout=10) == 0
    after = tab.last_reply()
    page.wait_for_timeout(1500)
    assert tab.last_reply() == after, "the reply kept growing after Stop"
    assert page.inner_text(".msg.assistant .meta").split("\n")[0].startswith("demo")
    assert "Stopped" in page.inner_text(".msg.assistant .stats")
    saved = stored_chats(page)[0]["messages"][-1]
    assert saved["stopped"] is True and saved["content"].strip() == after.strip()
    assert page.is_enabled("#prompt")


def test_switch_model_then_edit_and_resend(tabs: Any, server: Server) -> None:
    tab = tabs()
    page = tab.open(settings={"num_predict": "6", "temperature": "0"})
    tab.wait_models("demo2:latest")
    page.select_option("#model", "demo2:latest")
    assert "loads on first message" in page.inner_text("#model-state") or "in memory" in page.inner_text("#model-state")
    page.evaluate(
        """() => {
            window.__labels = [];
            new MutationObserver(() => {
                const el = document.querySelector('.typing-label');
                if (el) window.__labels.push(el.textContent);
            }).observe(document.getElementById('messages'), {childList: true, subtree: true});
        }"""
    )
    loaded_before = any(m["name"] == "demo2:latest" for m in server.ps())
    tab.send("The capital of France is")
    tab.wait_done()
    if not loaded_before:
        assert "Loading demo2 into memory…" in page.evaluate("window.__labels")
    assert tab.chat_bodies[-1]["model"] == "demo2:latest"
    assert page.inner_text(".msg.assistant .meta-model") == "demo2"
    assert any(m["name"] == "demo2:latest" for m in server.ps())
    page.click("#refresh-models")
    page.wait_for_function("() => [...document.querySelectorAll('#model option')].some(o => o.value === 'demo2:latest' && o.textContent.startsWith('●'))")
    assert page.input_value("#model") == "demo2:latest"
    assert "in memory" in page.inner_text("#model-state")

    # Edit the user message: everything after it is replaced by a fresh reply.
    page.hover(".msg.user")
    page.click(".msg.user [data-action=edit]")
    page.fill(".edit-area", "The capital of Italy is")
    page.click("[data-action=save-edit]")
    page.wait_for_selector("#stop", state="visible", timeout=5000)
    tab.wait_done()
    assert tab.chat_bodies[-1]["messages"] == [{"role": "user", "content": "The capital of Italy is"}]
    assert page.locator(".msg").count() == 2
    assert page.inner_text(".msg.user .md") == "The capital of Italy is"
    assert STATS.search(page.inner_text(".msg.assistant .meta"))
    chats = stored_chats(page)
    assert len(chats) == 1 and chats[0]["model"] == "demo2:latest"
    assert [m["role"] for m in chats[0]["messages"]] == ["user", "assistant"]


def test_model_that_fails_to_load_shows_the_servers_error(tabs: Any, server: Server) -> None:
    tab = tabs()
    page = tab.open(settings={"num_predict": "4"})
    tab.wait_models("broken:latest")
    page.select_option("#model", "broken:latest")
    tab.send("Hello")
    page.wait_for_selector(".msg-error", timeout=60_000)
    tab.wait_done(timeout=5)
    error = page.inner_text(".msg-error")
    # The server's own message, as any client gets it.
    r = httpx.post(server.url + "/api/chat", json={"model": "broken", "messages": [{"role": "user", "content": "Hello"}]})
    assert r.status_code >= 400
    assert error == 'Error: Model "broken" failed: ' + r.json()["error"], error
    assert page.is_visible("#send") and page.is_hidden("#stop")
    tab.shot("web-desktop-error.png")


def test_api_key_then_server_down(tabs: Any, tmp_path: Path) -> None:
    """A server with EMBER_API_KEY: the page asks for the key, then works with it;
    when the server goes away, the page says so."""
    srv = Server(tmp_path, EMBER_NUM_PARALLEL="1", EMBER_API_KEY="s3cret")
    try:
        write_tiny_gguf(tmp_path / "tiny.gguf")
        create(srv.url, "tiny", f"FROM {tmp_path / 'tiny.gguf'}\n", headers={"Authorization": "Bearer s3cret"})
        tab = tabs(url=srv.url)
        page = tab.open()
        page.wait_for_selector("#banner:not([hidden])")
        assert "API key" in page.inner_text("#banner")
        page.click("#settings-toggle")
        page.fill("#opt-api-key", "s3cret")
        page.press("#opt-api-key", "Tab")
        page.click("#settings-close")
        tab.wait_models("tiny:latest")
        assert page.is_hidden("#banner")
        assert "connected" in page.inner_text("#server-status")
        tab.send("Hi")  # the chat request carries the key too: the error is tiny's own
        page.wait_for_selector(".msg-error", timeout=30_000)
        assert page.inner_text(".msg-error").startswith('Error: Model "tiny" failed: ')
        assert "unauthorized" not in page.inner_text(".msg-error")
        tab.wait_done(timeout=5)
    finally:
        srv.stop()
    with pytest.raises(httpx.HTTPError):
        httpx.get(srv.url + "/api/version", timeout=2)
    tab.send("Anyone there?")
    page.wait_for_selector(".msg[data-index='3'] .msg-error", timeout=10_000)
    assert "Can't reach the Ember server" in page.inner_text(".msg[data-index='3'] .msg-error")
    banner = page.inner_text("#banner")
    assert "Can't reach the Ember server" in banner and "ember serve" in banner
    assert "Server unreachable" in page.inner_text("#server-status")
    assert page.is_visible("#banner-retry")

    # The page keeps checking: a server back on the same address clears the banner.
    back = subprocess.Popen([sys.executable, "-m", "ember.cli.main", "serve", "--log-level", "warning"],
                            env=srv.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        page.wait_for_selector("#banner", state="hidden", timeout=30_000)
        assert "connected" in page.inner_text("#server-status")
        tab.wait_models("tiny:latest")
    finally:
        back.terminate()
        back.wait(15)


# Stored conversations are untrusted too: a crafted one must render as text.
NASTY = [
    "<script>alert(1)</script>",
    "<img src=x onerror=alert(2)>",
    '<a href="javascript:alert(3)">x</a>',
    "[click me](javascript:alert(4))",
    '[x](https://example.com/"onmouseover="alert(5))',
    "**<b>bold</b>** _<i>it</i>_ `<code>`",
    "```html\n<script>alert(6)</script>\n```",
    "- <svg onload=alert(7)>\n- two",
    "https://example.com/?q=<script>&x='y'",
    "&lt;script&gt; stays &amp; escaped",
    "> <iframe src=javascript:alert(8)>",
    "\u0000<script>0</script>\u0000",
]
ALLOWED = {
    "p": set(), "br": set(), "strong": set(), "em": set(), "del": set(), "code": set(), "pre": set(),
    "ul": set(), "ol": {"start"}, "li": set(), "h3": set(), "h4": set(), "h5": set(), "h6": set(),
    "blockquote": set(), "hr": set(), "a": {"href", "target", "rel"},
    "table": set(), "thead": set(), "tbody": set(), "tr": set(), "th": {"class"}, "td": {"class"},
    "div": {"class"}, "span": {"class"}, "button": {"type", "class", "data-copy"},
}

MARKDOWN = """Here is **bold**, *italic*, ~~gone~~ and `inline <code>`.

### A heading

1. first
2. second
   - nested [link](https://example.com/a_b_c)

```python
def greet(name):
    return f"<b>{name}</b>"
```

| Quant | Size | Speed |
|:------|-----:|:-----:|
| Q4_K_M | 253 MB | **fast** |
| Q8_0 | 292 MB | `ok` |

> a quote with https://example.com/path.

Long words wrap: https://example.com/a/very/long/path/that/keeps/going/and/going/without/any/spaces/at/all
"""


def crafted_chat() -> dict[str, Any]:
    now = int(time.time() * 1000)
    messages: list[dict[str, Any]] = []
    for i, text in enumerate(NASTY):
        messages.append({"role": "user", "content": f"user {i}: {text}"})
        messages.append({"role": "assistant", "content": f"assistant {i}: {text}", "model": "demo:latest",
                         "stats": {"eval_count": 10, "eval_duration": 250_000_000, "ttft_ms": 120}})
    messages[-1]["pending"] = True  # was streaming when the page went away
    return {"id": "nasty", "title": "<img src=x onerror=alert(9)>", "model": "<b>demo</b>",
            "created": now, "updated": now, "messages": messages}


def nice_chat() -> dict[str, Any]:
    now = int(time.time() * 1000)
    return {
        "id": "nice", "title": "Markdown tour", "model": "demo:latest", "created": now, "updated": now,
        "messages": [
            {"role": "user", "content": "Show me what you can render, with a `code` sample."},
            {"role": "assistant", "content": MARKDOWN, "model": "demo:latest",
             "stats": {"eval_count": 128, "eval_duration": 2_900_000_000, "ttft_ms": 184, "done_reason": "stop"}},
            {"role": "user", "content": "And an error?"},
            {"role": "assistant", "content": "", "model": "demo:latest",
             "error": 'Model "demo" failed: llama.cpp could not load the model'},
        ],
    }


def test_stored_html_renders_as_text(tabs: Any) -> None:
    tab = tabs()
    page = tab.open(chats=[crafted_chat(), nice_chat()])
    page.wait_for_selector(".msg.assistant")
    assert page.locator("#messages script, .md img, .md iframe, .md svg").count() == 0
    assert page.locator("#conversations img").count() == 0
    assert page.inner_text(".conv-item.active .conv-title") == "<img src=x onerror=alert(9)>"
    assert page.inner_text(".msg.assistant >> nth=-1 >> .stats").startswith("Stopped")
    for i, text in enumerate(NASTY):
        shown = text.replace("\u0000", "")
        for role in ("user", "assistant"):
            visible = page.inner_text(f".msg[data-index='{2 * i + (role == 'assistant')}'] .md")
            for token in ("<script>", "<img", "<svg", "<iframe", "javascript:"):
                if token in shown and "```" not in shown:
                    assert token in visible, (role, text, visible)
    html = page.inner_html("#messages")
    # Every element inside rendered messages is from the whitelist, with whitelisted attributes.
    bad = page.evaluate(
        """(allowed) => {
            const out = [];
            for (const md of document.querySelectorAll('#messages .md')) {
                for (const el of md.querySelectorAll('*')) {
                    const tag = el.tagName.toLowerCase();
                    if (!(tag in allowed)) { out.push(tag); continue; }
                    for (const a of el.attributes) {
                        if (!allowed[tag].includes(a.name)) out.push(tag + '@' + a.name);
                        if (a.name === 'href' && !/^https?:\\/\\//.test(a.value)) out.push('href=' + a.value);
                    }
                    if (tag === 'a' && el.rel !== 'noopener noreferrer') out.push('rel=' + el.rel);
                }
            }
            return out;
        }""",
        {k: sorted(v) for k, v in ALLOWED.items()},
    )
    assert bad == [], bad
    assert page.locator("[onerror], [onload], [onmouseover]").count() == 0
    assert page.locator("a[href^='javascript'], [href*='javascript:']").count() == 0
    assert "&lt;img src=x onerror=alert(2)&gt;" in html  # shown, as text


def test_markdown_renderer(tabs: Any) -> None:
    tab = tabs()
    page = tab.open()
    cases = {
        "<script>alert(1)</script>": "<p>&lt;script&gt;alert(1)&lt;/script&gt;</p>",
        "**b** and *i* and `<b>`": "<p><strong>b</strong> and <em>i</em> and <code>&lt;b&gt;</code></p>",
        "[x](javascript:alert(1))": "<p>[x](javascript:alert(1))</p>",
        "[x](https://e.com/a_b_c)": '<p><a href="https://e.com/a_b_c" target="_blank" rel="noopener noreferrer">x</a></p>',
        "see https://e.com/x_y_z.": '<p>see <a href="https://e.com/x_y_z" target="_blank" rel="noopener noreferrer">'
                                    "https://e.com/x_y_z</a>.</p>",
        "line one\nline two\n\nnext": "<p>line one<br>line two</p><p>next</p>",
        "- a\n- b\n  - c\n- d": "<ul><li>a</li><li>b<ul><li>c</li></ul></li><li>d</li></ul>",
        "3. x\n4. y": '<ol start="3"><li>x</li><li>y</li></ol>',
        "`a*b*c` *d*": "<p><code>a*b*c</code> <em>d</em></p>",
        "snake_case_name stays": "<p>snake_case_name stays</p>",
        "# Title": "<h3>Title</h3>",
        "a\n\n---\n\nb": "<p>a</p><hr><p>b</p>",
        "> quoted **x**": "<blockquote><p>quoted <strong>x</strong></p></blockquote>",
        "a | b\n--|--:\n1 | <i>": '<div class="table-wrap"><table><thead><tr><th>a</th><th class="al-r">b</th></tr></thead>'
                                  '<tbody><tr><td>1</td><td class="al-r">&lt;i&gt;</td></tr></tbody></table></div>',
    }
    got = page.evaluate("(cases) => Object.keys(cases).map(k => window.ember.renderMarkdown(k))", cases)
    for (src, want), html in zip(cases.items(), got):
        assert html == want, (src, html)
    code = page.evaluate("window.ember.renderMarkdown('```py\\nif a < b && c:\\n    x = \"<b>\"\\n```')")
    assert '<span class="code-lang">py</span>' in code
    assert "<pre><code>if a &lt; b &amp;&amp; c:\n    x = &quot;&lt;b&gt;&quot;</code></pre>" in code
    # An unclosed fence (a reply still streaming) is a code block to the end.
    assert "<pre><code>x = 1</code></pre>" in page.evaluate("window.ember.renderMarkdown('```\\nx = 1')")

    # Fuzz: random mixes of Markdown and HTML pieces. Every result holds only
    # whitelisted elements and attributes, and the HTML parser builds exactly
    # the tags the string has (well nested: nothing for the parser to repair).
    problems = page.evaluate(
        """(allowed) => {
            const pieces = ['|', ' | ', '|---|', '\\n|:-:|--|\\n', '*', '**', '_', '__', '~~', '`', '```', '```js', '~~~', '\\n', '\\n\\n', '- ', '  - ',
                '1. ', '7) ', '> ', '# ', '---', ' ', 'word', 'x_y', '[a](https://x.y/_a_*b*)', '[b](javascript:x)',
                '[c](', ')', '<', '>', '&', '&amp;', '"', "'", '<script>', '</b>', '<img src=x onerror=alert(1)>',
                'https://e.com/a*b*_c_', 'http://', '\\t', '\\u0000', '\\u00001\\u0000', '\\r\\n'];
            let seed = 12345;
            const rand = (n) => { seed = (seed * 1103515245 + 12345) & 0x7fffffff; return seed % n; };
            const tagSeq = (html) => [...html.matchAll(/<(\\/?)([a-z0-9]+)/g)].map(m => m[1] + m[2]);
            const VOID = new Set(['br', 'hr']);
            const domSeq = (node, out) => {
                for (const el of node.children) {
                    out.push(el.tagName.toLowerCase());
                    domSeq(el, out);
                    if (!VOID.has(el.tagName.toLowerCase())) out.push('/' + el.tagName.toLowerCase());
                }
                return out;
            };
            const out = [];
            for (let i = 0; i < 600; i++) {
                let src = '';
                for (let j = 1 + rand(14); j > 0; j--) src += pieces[rand(pieces.length)];
                const html = window.ember.renderMarkdown(src);
                const tpl = document.createElement('template');
                tpl.innerHTML = html;
                for (const el of tpl.content.querySelectorAll('*')) {
                    const tag = el.tagName.toLowerCase();
                    if (!(tag in allowed)) { out.push([src, 'tag ' + tag]); continue; }
                    for (const a of el.attributes) {
                        if (!allowed[tag].includes(a.name)) out.push([src, tag + '@' + a.name]);
                        if (a.name === 'href' && !/^https?:\\/\\/[^"<>\\s]+$/.test(a.value)) out.push([src, 'href ' + a.value]);
                    }
                }
                const want = tagSeq(html).join(','), got = domSeq(tpl.content, []).join(',');
                if (want !== got) out.push([src, 'nesting: ' + html]);
                if (tpl.content.textContent.includes('\\u0000')) out.push([src, 'NUL kept']);
            }
            return out;
        }""",
        {k: sorted(v) for k, v in ALLOWED.items()},
    )
    assert problems == [], problems[:5]


def test_layouts_and_screenshots(tabs: Any, server: Server) -> None:
    """Desktop and phone layouts (light and dark), no sideways scrolling on a
    phone, the drawer and settings panel, and a code block's copy button."""
    desk = tabs(DESKTOP, "light")
    page = desk.open(chats=[nice_chat()])
    desk.wait_models()
    page.wait_for_selector(".code")
    desk.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.url)
    page.click(".copy-btn")
    assert page.evaluate("navigator.clipboard.readText()") == 'def greet(name):\n    return f"<b>{name}</b>"'
    assert page.is_visible("#sidebar") and page.is_hidden("#menu")
    assert STATS.search(page.inner_text(".msg.assistant .meta"))
    assert page.inner_text(".msg.assistant .stats").startswith("128 tokens · 44.1 tok/s · TTFT 0.18 s")
    desk.shot("web-desktop.png")
    page.click("#settings-toggle")
    page.wait_for_selector("#settings", state="visible")
    page.wait_for_timeout(400)  # the slide-in animation
    desk.shot("web-desktop-settings.png")

    dark = tabs(DESKTOP, "dark")
    page = dark.open(chats=[nice_chat()])
    dark.wait_models()
    page.wait_for_selector(".code")
    bg = page.evaluate("getComputedStyle(document.body).backgroundColor")
    assert bg != "rgb(255, 255, 255)", "dark scheme not applied"
    dark.shot("web-desktop-dark.png")

    phones: list[tuple[Scheme, ViewportSize]] = [("light", PHONE), ("dark", SMALL_PHONE)]
    for scheme, size in phones:
        phone = tabs(size, scheme)
        page = phone.open(chats=[nice_chat()])
        phone.wait_models()
        page.wait_for_selector(".code")
        widths = page.evaluate(
            "() => [document.documentElement.scrollWidth, document.documentElement.clientWidth,"
            " document.querySelector('#messages').scrollWidth, document.querySelector('#messages').clientWidth]"
        )
        assert widths[0] <= widths[1] and widths[2] <= widths[3], f"sideways scrolling on a phone: {widths}"
        assert page.is_visible("#menu")
        box = page.locator("#sidebar").bounding_box()
        assert box is not None and box["x"] + box["width"] <= 0, "the drawer should start closed on a phone"
        composer = page.locator("#composer").bounding_box()
        assert composer is not None and composer["y"] + composer["height"] <= size["height"] + 1
        phone.shot(f"web-phone-{scheme}.png")
        if scheme == "light":
            page.click("#menu")
            page.wait_for_timeout(300)
            box = page.locator("#sidebar").bounding_box()
            assert box is not None and box["x"] >= 0
            phone.shot("web-phone-drawer.png")
            page.click("#scrim", position={"x": 370, "y": 400})
            page.wait_for_timeout(300)
            box = page.locator("#sidebar").bounding_box()
            assert box is not None and box["x"] + box["width"] <= 0, "tapping outside closes the drawer"
