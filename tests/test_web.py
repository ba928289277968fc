"""The chat page at GET /, driven in a real headless browser (Debian's Chromium through Playwright) against a real
server over the tiny checkpoint; answers compared with transformers' greedy decode. Every request that is not to
the server is blocked and recorded. Screenshot: $ONEVISION_ARTIFACTS (default test-artifacts/) /web_chat.png."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import httpx
import pytest
from _server_helpers import MEDIA, data_uri, reference_answer, shared_ckpt, start_server

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = Path(os.environ.get("ONEVISION_ARTIFACTS", Path(__file__).parents[1] / "test-artifacts"))
TIMEOUT_MS = 30_000


def _playwright():
    """The sync_playwright factory, or fail (CI) / skip (elsewhere) with the reason."""
    reason = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        reason = "playwright is not installed: pip install playwright (the `test` extra)"
    if reason is None and not os.path.exists(CHROMIUM):
        reason = f"{CHROMIUM} is missing: apt-get install chromium (scripts/test.sh does it)"
    if reason:
        (pytest.fail if os.environ.get("CI") else pytest.skip)(reason)
    return sync_playwright


@pytest.fixture(scope="module")
def ckpt(tiny_ckpt, tmp_path_factory):
    return shared_ckpt(tiny_ckpt, tmp_path_factory)


@pytest.fixture(scope="module")
def browser():
    with _playwright()() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server(ckpt):
    with start_server(ckpt) as server:
        yield server


class Page:
    """A fresh browser page on the server, with every other origin blocked and recorded in `.external`."""

    def __init__(self, browser, server):
        self.external: list[str] = []
        # bypass_csp: wait_for_function evaluates strings; the page itself never needs eval
        self.context = browser.new_context(viewport={"width": 1000, "height": 700}, bypass_csp=True)
        self.page = self.context.new_page()
        self.page.set_default_timeout(TIMEOUT_MS)

        def gate(route):
            if route.request.url.startswith(server.url + "/") or route.request.url.startswith("data:"):
                return route.continue_()
            self.external.append(route.request.url)
            return route.abort()

        self.context.route("**/*", gate)
        self.errors: list[str] = []
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.goto(server.url + "/")

    def role(self, name: str):
        return self.page.locator(f'[data-role="{name}"]')

    def settings(self, max_tokens: int, temperature: float = 0.0):
        self.page.locator("#settings summary").click()
        self.role("max-tokens").fill(str(max_tokens))
        self.role("temperature").fill(str(temperature))

    def ask(self, text: str, files=()):
        if files:
            self.role("attach").set_input_files(files)
            self.page.wait_for_function(f"document.querySelectorAll('#pending figure').length === {len(files)}")
        self.role("message").fill(text)
        self.role("message").press("Enter")

    def answer(self, index: int) -> str:
        bubble = self.role("assistant").nth(index)
        bubble.and_(self.page.locator('[data-done="true"]')).wait_for()
        return bubble.text_content()

    def close(self):
        assert self.external == [], f"the page tried to reach other origins: {self.external}"
        assert self.errors == [], f"JavaScript errors: {self.errors}"
        self.context.close()


@pytest.fixture
def page(browser, server):
    page = Page(browser, server)
    yield page
    page.close()


def _image(name="cat.jpg"):
    from PIL import Image

    return Image.open(MEDIA / name).convert("RGB")


def test_image_question_two_turns_equal_reference(page, server, ckpt):
    page.page.wait_for_function("document.querySelector('[data-role=model]').textContent === 'tiny'")
    page.settings(max_tokens=12)
    page.ask("What is in the picture?", [str(MEDIA / "cat.jpg")])
    assert page.page.locator(".msg.user img").count() == 1  # the thumbnail stays in the conversation
    first = page.answer(0)
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]}]
    expected, _, _ = reference_answer(ckpt, conv, images=[_image()], max_new_tokens=12)
    assert first == expected

    page.role("message").fill("Describe")
    page.role("message").press("Shift+Enter")  # a line break, not a send
    page.role("message").press_sequentially("it again.")
    assert page.role("assistant").count() == 1
    assert page.role("message").input_value() == "Describe\nit again."
    page.role("send").click()
    second = page.answer(1)
    conv += [{"role": "assistant", "content": [{"type": "text", "text": first}]},
             {"role": "user", "content": [{"type": "text", "text": "Describe\nit again."}]}]
    expected, _, _ = reference_answer(ckpt, conv, images=[_image()], max_new_tokens=12)
    assert second == expected

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.page.screenshot(path=str(ARTIFACTS / "web_chat.png"))
    page.role("new-chat").click()
    assert page.role("assistant").count() == 0


def test_stop_aborts_a_long_answer(page, server):
    tokenizer = server.app.state.server.tokenizer
    limit = 4000
    page.settings(max_tokens=limit, temperature=1.0)
    page.ask("Tell a very long story.")
    bubble = page.role("assistant").nth(0)
    page.page.wait_for_function("document.querySelector('[data-role=assistant]').textContent.length > 0")
    page.role("stop").click()
    text = page.answer(0)
    assert bubble.get_attribute("data-stopped") == "true"
    assert len(tokenizer.encode(text, add_special_tokens=False)) < limit
    page.page.wait_for_function("!document.querySelector('[data-role=send]').disabled")
    assert page.role("stop").is_hidden()


def test_corrupt_image_shows_the_server_error(page, server):
    junk = b"\x89PNG\r\n\x1a\nthis is not an image"
    body = {"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_uri(junk)}}, {"type": "text", "text": "What?"}]}]}
    reply = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)
    assert reply.status_code == 400
    message = reply.json()["error"]["message"]
    page.ask("What?", [{"name": "broken.png", "mimeType": "image/png", "buffer": junk}])
    text = page.answer(0)
    assert "400" in text and message in text
    assert page.page.locator('[data-role="assistant"] .error').count() == 1
    # the failed turn is not re-sent: the next question works
    page.settings(max_tokens=3)
    page.ask("Hello")
    assert page.page.locator('[data-role="assistant"]').nth(1).locator(".error").count() == 0
    page.answer(1)
    assert page.page.locator('[data-role="assistant"] .error').count() == 1


def test_api_key_is_asked_once_and_kept_in_the_session(browser, ckpt):
    with start_server(ckpt, api_key="sk-web-test") as server:
        assert httpx.get(server.url + "/").status_code == 200  # the page itself loads without a key
        assert httpx.get(server.url + "/v1/models").status_code == 401
        page = Page(browser, server)
        try:
            page.role("api-key").fill("wrong")
            page.role("api-key-ok").click()
            page.page.wait_for_function("document.querySelector('#key-dialog').open")  # 401 again: asked again
            assert "invalid API key" in page.page.locator("#key-dialog p").text_content()
            page.role("api-key").fill("sk-web-test")
            page.role("api-key-ok").click()
            page.page.wait_for_function("document.querySelector('[data-role=model]').textContent === 'tiny'")
            page.settings(max_tokens=3)
            page.ask("Hello")
            assert ".error" not in page.page.locator('[data-role="assistant"]').inner_html()
            page.answer(0)
            assert page.page.locator('[data-role="assistant"] .error').count() == 0
            assert page.page.evaluate("sessionStorage.getItem('onevision.apiKey')") == "sk-web-test"
            assert page.page.evaluate("localStorage.length") == 0
        finally:
            page.close()


def test_no_web_gives_404(ckpt, server):
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert httpx.get(server.url + "/web/app.js").headers["content-type"].startswith("text/javascript")
    with start_server(ckpt, web=False) as bare:
        for path in ("/", "/web/app.js", "/web/style.css"):
            reply = httpx.get(bare.url + path)
            assert reply.status_code == 404 and reply.json()["error"]["code"] == "not_found"


def test_paste_an_image_and_drop_a_video(page):
    from _server_helpers import image_bytes, video_bytes

    page.page.evaluate("""([image, video]) => {
        const file = (b64, name, type) => new File([Uint8Array.from(atob(b64), (c) => c.charCodeAt(0))], name, {type});
        const pasted = new DataTransfer();
        pasted.items.add(file(image, "cat.jpg", "image/jpeg"));
        document.dispatchEvent(new ClipboardEvent("paste", {clipboardData: pasted, bubbles: true}));
        const dropped = new DataTransfer();
        dropped.items.add(file(video, "clip.mp4", "video/mp4"));
        document.querySelector("[data-role=log]").dispatchEvent(new DragEvent("drop", {dataTransfer: dropped, bubbles: true}));
    }""", [base64.b64encode(image_bytes()).decode(), base64.b64encode(video_bytes()).decode()])
    page.page.wait_for_function("document.querySelectorAll('#pending figure').length === 2")
    page.settings(max_tokens=4)
    page.ask("What happens?")
    page.answer(0)
    assert page.page.locator('[data-role="assistant"] .error').count() == 0
    assert page.page.locator(".msg.user img").count() == 1 and page.page.locator(".msg.user video").count() == 1
