"""The web playground at `/`, in a real headless Chromium (Debian's `chromium`, driven by
Playwright for Python): with the server's API key typed in, a question streams an
answer (the same text as the OpenAI endpoint gives for the same request) and TTFT and
tokens/s appear; without the key the page shows the 401. The page works offline: it
loads nothing but itself and its script."""

from __future__ import annotations

import io
import shutil

import httpx
import pytest

from tests.test_serve_support import MODEL, serve

KEY = "playground-key"


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.skip("no chromium (apt install chromium)")


@pytest.fixture(scope="module")
def keyed_server():
    with serve(api_key=KEY) as served:
        yield served


@pytest.fixture(scope="module")
def page(keyed_server):
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), headless=True,
                                    args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page()
        requested: list[str] = []
        page.on("request", lambda r: requested.append(r.url))
        page.requested = requested
        yield page
        browser.close()


def test_page_and_script_are_served_without_the_key(keyed_server):
    assert httpx.get(keyed_server.url + "/").status_code == 200
    assert "text/javascript" in httpx.get(keyed_server.url + "/playground.js").headers[
        "content-type"]
    assert httpx.get(keyed_server.url + "/v1/models").status_code == 401  # the API is not


def _ask(page, url: str, key: str, question: str) -> None:
    page.goto(url + "/")
    page.fill("#key", key)
    page.dispatch_event("#key", "change")
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "8")
    page.fill("#prompt", question)
    page.click("#send")


def test_without_the_key_the_page_shows_401(page, keyed_server):
    _ask(page, keyed_server.url, "", "Hello")
    page.wait_for_selector(".msg.error", timeout=30_000)
    assert "401" in page.inner_text(".msg.error")


def test_answer_streams_with_ttft_and_tokens_per_second(page, keyed_server):
    import openai
    from PIL import Image

    client = openai.OpenAI(base_url=keyed_server.v1, api_key=KEY, max_retries=0)
    question = "What is the capital of France?"
    want = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=8, messages=[
        {"role": "user", "content": question}]).choices[0].message.content
    page.requested.clear()
    _ask(page, keyed_server.url, KEY, question)
    page.wait_for_function("document.getElementById('stats').dataset.done === '1'",
                           timeout=60_000)
    assert page.select_option("#model", MODEL)  # the model list came from /v1/models
    assert page.eval_on_selector("#answer", "e => e.textContent") == want
    stats = page.inner_text("#stats")
    assert "TTFT" in stats and "tok/s" in stats and "8 tokens" in stats
    assert all(r.startswith(keyed_server.url) for r in page.requested)  # no CDN, nothing else
    # The answer is on screen: its screenshot is not blank.
    shot = Image.open(io.BytesIO(page.locator("#answer").screenshot())).convert("L")
    low, high = shot.getextrema()
    assert shot.width > 50 and high - low > 100
