"""The web playground at `/`, in a real headless Chromium (Debian's `chromium`, driven by
Playwright for Python): with the server's API key typed in, a question streams an
answer (the same text as the OpenAI endpoint gives for the same request) and TTFT and
tokens/s appear; without the key the page shows the 401, cleared once the right key
loads the models. The page works offline: it loads nothing but itself and its script.
While an answer streams, Stop / Escape and Clear abort it (on the server too) and
Ctrl+Enter sends nothing; an answer cut short (max tokens, the server's abort, an error
mid-stream) keeps its text and says so; empty fields leave the values to the server; a
model without a chat template gets plain completions (QA, 45th session)."""

from __future__ import annotations

import io
import json
import shutil
import time

import httpx
import pytest

from tests.test_serve_support import MODEL, serve, tiny_chat_checkpoint, wait_until

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
    assert "401" in page.inner_text("#stats")  # the model list's, from the page load
    # The right key loads the models and clears that stale 401.
    page.fill("#key", KEY)
    page.dispatch_event("#key", "change")
    page.wait_for_function("document.getElementById('model').options.length > 0")
    page.wait_for_function("!document.getElementById('stats').textContent.includes('401')")


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
    # 8 tokens of 8: cut by max_tokens, and the page says so (its text stays as it came)
    assert stats.endswith("cut: max tokens") and "…" not in stats
    assert page.get_attribute("#answer", "data-cut") == "max tokens"
    assert page.locator("#mode").is_hidden()  # this model has a chat template
    assert all(r.startswith(keyed_server.url) for r in page.requested)  # no CDN, nothing else
    # The answer is on screen: its screenshot is not blank.
    shot = Image.open(io.BytesIO(page.locator("#answer").screenshot())).convert("L")
    low, high = shot.getextrema()
    assert shot.width > 50 and high - low > 100


def test_a_one_token_answer_shows_no_rate(page, keyed_server):
    """One token has no inter-token time: TTFT and "1 token", not "0.0 tok/s"."""
    page.goto(keyed_server.url + "/")
    page.fill("#key", KEY)
    page.dispatch_event("#key", "change")
    page.fill("#max-tokens", "1")
    page.fill("#prompt", "Hello there")
    page.click("#send")
    page.wait_for_function("document.getElementById('stats').dataset.done === '1' && "
                           "document.getElementById('stats').textContent.includes('1 token')",
                           timeout=60_000)
    stats = page.inner_text("#stats")
    assert stats.startswith("TTFT ") and "tok/s" not in stats and "1 token ·" in stats, stats


def _chat_bodies(page) -> list[dict]:
    """The bodies of the page's chat and completion requests from now on (max_tokens 1
    left out)."""
    bodies: list[dict] = []

    def seen(request):
        if request.url.endswith("/completions") and request.method == "POST":
            body = json.loads(request.post_data)
            if body.get("max_tokens") != 1:
                bodies.append(body)

    page.on("request", seen)
    return bodies


def _running(served) -> int:
    return served.llm.num_unfinished


def test_stop_clear_and_ctrl_enter_while_an_answer_streams(page, keyed_server, monkeypatch):
    engine = keyed_server.llm.engine
    step = engine.step

    def slow_step():  # ~20 tokens a second: time to act while the answer streams
        time.sleep(0.05)
        return step()

    monkeypatch.setattr(engine, "step", slow_step)
    bodies = _chat_bodies(page)
    page.goto(keyed_server.url + "/")
    page.fill("#key", KEY)
    page.dispatch_event("#key", "change")
    page.wait_for_function("document.getElementById('model').options.length > 0")
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "200")
    page.fill("#prompt", "Write a long story about a dragon.")
    page.press("#prompt", "Control+Enter")
    answer = "document.getElementById('answer')"
    page.wait_for_function(f"{answer} && {answer}.textContent.length > 0", timeout=30_000)
    # Ctrl+Enter while it streams sends nothing (two answers streamed at once before).
    assert page.is_disabled("#send") and page.is_enabled("#stop")
    page.fill("#prompt", "A second question")
    page.press("#prompt", "Control+Enter")
    page.wait_for_timeout(300)
    assert len(bodies) == 1 and page.locator("#log .msg.user").count() == 1
    assert page.input_value("#prompt") == "A second question"
    # Escape stops it: the text so far stays, marked; the server drops the request.
    page.keyboard.press("Escape")
    page.wait_for_function("document.getElementById('stats').dataset.done === '1'")
    assert page.get_attribute("#answer", "data-cut") == "stopped"
    kept = page.eval_on_selector("#answer", "e => e.textContent")
    assert kept and page.is_enabled("#send") and page.is_disabled("#stop")
    stats = page.inner_text("#stats")
    assert stats.endswith("cut: stopped") and "…" not in stats
    assert wait_until(lambda: _running(keyed_server) == 0)
    # The stopped answer is part of the conversation as shown: the next question sends it.
    page.fill("#prompt", "Go on")
    page.click("#send")
    page.wait_for_function(f"{answer}.textContent.length > 0", timeout=30_000)
    assert [(m["role"], m["content"]) for m in bodies[-1]["messages"]] == [
        ("user", "Write a long story about a dragon."), ("assistant", kept), ("user", "Go on")]
    # Clear while it streams: aborted, and nothing of it reaches the next conversation.
    page.click("#clear")
    assert page.locator("#log .msg").count() == 0 and page.is_enabled("#send")
    assert wait_until(lambda: _running(keyed_server) == 0)
    monkeypatch.undo()
    page.fill("#max-tokens", "2")
    page.fill("#prompt", "Hi")
    page.click("#send")
    page.wait_for_function("document.getElementById('stats').dataset.done === '1'")
    assert [(m["role"], m["content"]) for m in bodies[-1]["messages"]] == [("user", "Hi")]
    page.wait_for_timeout(300)  # the cleared send's end, had it still been running
    assert page.eval_on_selector_all("#log .msg", "l => l.map(e => e.className)") == [
        "msg user", "msg assistant cut"]
    page.fill("#prompt", "And?")
    page.click("#send")
    page.wait_for_function("document.getElementById('stats').dataset.done === '1'")
    assert [m["role"] for m in bodies[-1]["messages"]] == ["user", "assistant", "user"]
    assert bodies[-1]["messages"][0]["content"] == "Hi"


def test_empty_fields_leave_the_values_to_the_server(page, keyed_server):
    _ask(page, keyed_server.url, KEY, "Hi")
    bodies = _chat_bodies(page)
    page.wait_for_function("document.getElementById('stats').dataset.done === '1'")
    page.fill("#max-tokens", "")
    page.fill("#temperature", "")
    page.fill("#prompt", "Hello there")
    page.click("#send")
    page.wait_for_function("document.getElementById('stats').dataset.done === '1'",
                           timeout=60_000)
    assert "max_tokens" not in bodies[-1] and "temperature" not in bodies[-1]
    assert page.locator("#log .msg.error").count() == 0  # max_tokens 0 was a 400


def _sse(*events: dict) -> str:
    return "".join(f"data: {json.dumps(e)}\n\n" for e in events)


def _delta(text: str, finish: str | None = None, why: str | None = None) -> dict:
    return {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish,
                         "stop_reason": why}]}


@pytest.mark.parametrize("stream, cut", [
    (_sse(_delta("Once upon"), _delta(" a time"), {"error": {"message": "engine died"}}),
     "error: engine died"),
    (_sse(_delta("Once upon"), _delta(" a time", "abort", "regex: no token allowed")) +
     "data: [DONE]\n\n", "aborted by the server: regex: no token allowed"),
    (_sse(_delta("Once upon"), _delta(" a time")), "the stream ended before the answer did"),
])
def test_an_answer_cut_short_keeps_its_text_and_says_so(page, keyed_server, stream, cut):
    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, content_type="text/event-stream", body=stream))
    try:
        _ask(page, keyed_server.url, KEY, "Tell me <b>a story</b>")
        page.wait_for_function("document.getElementById('stats').dataset.done === '1'")
        assert page.eval_on_selector("#answer", "e => e.textContent") == "Once upon a time"
        assert page.get_attribute("#answer", "data-cut") == cut
        stats = page.inner_text("#stats")
        assert stats.endswith("cut: " + cut) and "…" not in stats
        assert page.inner_text("#log .msg.user") == "Tell me <b>a story</b>"  # as text
    finally:
        page.unroute("**/v1/chat/completions")


@pytest.fixture(scope="module")
def no_template_engine(tmp_path_factory):
    """The chat test model with its chat template taken out."""
    from kiln.build import build
    from kiln.config import BuildConfig

    hf = tmp_path_factory.mktemp("no-template") / "hf"
    shutil.copytree(tiny_chat_checkpoint(), hf)
    config = json.loads((hf / "tokenizer_config.json").read_text())
    config.pop("chat_template")
    (hf / "tokenizer_config.json").write_text(json.dumps(config))
    cfg = BuildConfig(dtype="float32", max_batch_size=8, max_seq_len=256, max_num_tokens=512)
    return build(hf, hf.parent / "engine", cfg, progress=False)


def test_a_model_without_a_chat_template_gets_plain_completions(page, no_template_engine):
    with serve(no_template_engine) as served:
        page.requested.clear()
        bodies = _chat_bodies(page)
        page.goto(served.url + "/")
        page.wait_for_selector("#mode", state="visible")  # said before anything is sent
        assert "no chat template" in page.inner_text("#mode")
        assert page.is_disabled("#system")
        page.fill("#temperature", "0")
        page.fill("#max-tokens", "6")
        for question in ("The capital of France is", "Once upon a time"):
            page.fill("#prompt", question)
            page.click("#send")
            page.wait_for_function("document.getElementById('stats').dataset.done === '1'",
                                   timeout=60_000)
            want = httpx.post(served.v1 + "/completions", json={
                "model": MODEL, "prompt": question, "max_tokens": 6, "temperature": 0},
            ).json()["choices"][0]["text"]
            assert page.eval_on_selector("#answer", "e => e.textContent") == want
            assert bodies[-1]["prompt"] == question and "messages" not in bodies[-1]
        assert page.locator("#log .msg.error").count() == 0
        chat = [u for u in page.requested if u.endswith("/v1/chat/completions")]
        assert chat == []  # /v1/models said so: no chat request at all
        assert httpx.get(served.v1 + "/models").json()["data"][0]["chat_template"] is False
