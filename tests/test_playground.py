"""The playground at `/`, end to end in a real browser: Playwright drives Debian's Chromium (no
browser download) against a real `nanoinfer serve` on the default model, started once for the
module with an API key, so every test also goes through the key.

Screenshots land in test-artifacts/playground/ (git-ignored). Without Chromium (`make setup`
installs Debian's package where it can) the tests skip, saying so.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright
from server_utils import free_socket

from nanoinfer.bench.soak import wait_healthy

MODEL = "smollm2-135m-instruct"
KEY = "playground-test-key"
MAX_MODEL_LEN = 1024
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "playground"
WAIT_MS = 60_000  # any one wait in the browser; a warm server answers these prompts in about a second
# Long enough that the prefix cache holds whole 16-token pages of it on a second request.
SYSTEM = "You are a helpful assistant who answers in plain English. Keep every answer short and friendly."
CJK = "明月几时有，把酒问"  # the seeds' tokenizer example: byte-level BPE splits its characters


def _chromium() -> str | None:
    """Debian's Chromium (or the one NANOINFER_CHROMIUM names)."""
    named = os.environ.get("NANOINFER_CHROMIUM")
    if named:
        return named
    return next((path for name in ("chromium", "chromium-browser") if (path := shutil.which(name))), None)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`nanoinfer serve` with an API key on a free loopback port; its URL once the model answers."""
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    log_path = tmp_path_factory.mktemp("playground") / "server.log"
    args = ["--model", MODEL, "--port", str(port), "--max-model-len", str(MAX_MODEL_LEN), "--api-key", KEY]
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "w+") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "nanoinfer.cli", "serve", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            _wait_ready(proc, url, log_path)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def _wait_ready(proc: subprocess.Popen[bytes], url: str, log_path: Path, timeout: float = 180) -> None:
    """Until /health says ok, then one short answer: the first request pays for warm-up, not a test."""
    try:
        wait_healthy(url, proc, time.monotonic() + timeout)
    except (RuntimeError, TimeoutError) as e:
        raise AssertionError(f"{e}:\n{log_path.read_text()[-3000:]}") from None
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, headers=_auth(), timeout=120)
    assert r.status_code == 200, r.text


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    path = _chromium()
    if path is None:
        pytest.skip("Chromium not found: `apt-get install chromium` (make setup tries), or set NANOINFER_CHROMIUM")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=path, headless=True)
        yield browser
        browser.close()


# Script errors and console errors of each page; a refused request (401, 400) is no script error.
PAGE_ERRORS: dict[Page, list[str]] = {}


@pytest.fixture
def open_page(browser: Browser, server: str) -> Iterator[Callable[..., Page]]:
    """Opens the playground in a fresh browser profile; `key` is in its storage unless None."""
    contexts: list[BrowserContext] = []

    def open_(key: str | None = KEY, **context: Any) -> Page:
        ctx = browser.new_context(**{"viewport": {"width": 1280, "height": 860}, **context})
        contexts.append(ctx)
        ctx.set_default_timeout(WAIT_MS)
        if key is not None:
            ctx.add_init_script(f"localStorage.setItem('nanoinfer.apiKey', {key!r})")
        page = ctx.new_page()
        errors = PAGE_ERRORS.setdefault(page, [])
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" and "status of" not in m.text else None)
        page.goto(server)
        return page

    yield open_
    for ctx in contexts:
        for page in ctx.pages:
            PAGE_ERRORS.pop(page, None)
        ctx.close()


def _no_page_errors(page: Page) -> None:
    assert PAGE_ERRORS[page] == [], PAGE_ERRORS[page]


def _send(page: Page, text: str, **controls: Any) -> Any:
    """Type `text` with the given sampling controls set, press Enter, wait for the whole answer;
    the answer's message element."""
    for name, value in controls.items():
        page.fill(f"#{name}", str(value))
    answers = page.locator(".msg.assistant")
    before = answers.count()
    page.fill("#input", text)
    page.press("#input", "Enter")
    expect(answers).to_have_count(before + 1)
    answer = answers.nth(before)
    expect(answer.locator(".tok").first).to_be_visible()
    _wait_idle(page)
    return answer


def _wait_idle(page: Page) -> None:
    expect(page.locator("#messages")).to_have_attribute("aria-busy", "false")


def _shot(page: Page, name: str, **kwargs: Any) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), **kwargs)


def _token_label(page: Page, answer: Any, k: int) -> str:
    """The chosen token at position k as its alternatives popup names it."""
    token = answer.locator(".tok").nth(k)
    token.hover()
    head = page.locator("#alts-head")
    expect(head).to_be_visible()
    match = re.match(r"“(.*?)”(?: \(part of| ·)", head.inner_text(), re.S)
    assert match, head.inner_text()
    return match.group(1)


# ---- tests ------------------------------------------------------------------------------------


def test_page_and_files_load_without_the_key_but_the_api_does_not(server: str) -> None:
    page = httpx.get(f"{server}/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    # Nothing from another site, no inline or eval'd script.
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for name in ("playground.js", "playground.css"):
        assert httpx.get(f"{server}/static/{name}").status_code == 200
    # The open /static/ prefix reaches the static folder only.
    for escape in ("/static/%2e%2e/routes.py", "/static/%2e%2e/v1/models", "/static/..%2fapp.py"):
        assert httpx.get(f"{server}{escape}").status_code == 404, escape
    for path in ("/v1/models", "/openapi.json", "/docs"):
        assert httpx.get(f"{server}{path}").status_code == 401
    assert httpx.post(f"{server}/tokenize", json={"prompt": "hi"}).status_code == 401


def _post(server: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    r = httpx.post(f"{server}{path}", json=body, headers=_auth(), timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_the_api_fields_the_page_uses(server: str) -> None:
    """vLLM's return_token_strs on /tokenize (and /detokenize) and return_tokens_as_token_ids."""
    plain = _post(server, "/tokenize", {"prompt": CJK})
    assert plain["token_strs"] is None
    pieces = _post(server, "/tokenize", {"prompt": CJK, "return_token_strs": True})
    assert set(pieces) == {"tokens", "count", "max_model_len", "token_strs"}
    assert pieces["tokens"] == plain["tokens"] and len(pieces["token_strs"]) == pieces["count"]
    # Byte-level BPE pieces: 明 (e6 98 8e) is "æĺ" + "İ", two tokens of part of a character each.
    assert pieces["token_strs"][:2] == ["æĺ", "İ"]
    chat = _post(server, "/tokenize", {"messages": [{"role": "user", "content": CJK}], "return_token_strs": True})
    assert chat["token_strs"][0] == "<|im_start|>" and len(chat["token_strs"]) == chat["count"]
    back = _post(server, "/detokenize", {"tokens": pieces["tokens"], "return_token_strs": True})
    assert back == {"prompt": CJK, "token_strs": pieces["token_strs"]}
    assert _post(server, "/detokenize", {"tokens": pieces["tokens"]})["token_strs"] is None
    bad = httpx.post(f"{server}/tokenize", json={"prompt": "x", "return_token_strs": "yes"}, headers=_auth())
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "return_token_strs"

    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 0, "logprobs": True}
    answer = _post(server, "/v1/chat/completions", {**body, "top_logprobs": 2, "return_tokens_as_token_ids": True})
    entry = answer["choices"][0]["logprobs"]["content"][0]
    token_id = int(entry["token"].removeprefix("token_id:"))
    assert entry["token"] == f"token_id:{token_id}" and all(
        t["token"].startswith("token_id:") for t in entry["top_logprobs"]
    )
    # The bytes stay the token's own: its text, as /detokenize's piece spells it.
    named = _post(server, "/v1/chat/completions", {**body, "top_logprobs": 2})["choices"][0]["logprobs"]["content"][0]
    assert (
        bytes(entry["bytes"]).decode()
        == named["token"]
        == _post(server, "/detokenize", {"tokens": [token_id]})["prompt"]
    )
    legacy = _post(
        server,
        "/v1/completions",
        {"prompt": [1, 2, 3], "max_tokens": 2, "logprobs": 2, "return_tokens_as_token_ids": True},
    )
    lp = legacy["choices"][0]["logprobs"]
    assert all(re.fullmatch(r"token_id:\d+", t) for t in lp["tokens"] + [k for top in lp["top_logprobs"] for k in top])


def test_a_wrong_key_is_refused_and_the_right_one_is_kept(open_page: Callable[..., Page]) -> None:
    page = open_page(key=None)
    banner = page.locator("#banner")
    expect(banner).to_contain_text("401")
    expect(page.locator("#key-form")).to_be_visible()
    page.fill("#key-input", "not-the-key")
    page.press("#key-input", "Enter")
    expect(page.locator("#key-reason")).to_contain_text("did not accept")
    expect(banner).to_contain_text("invalid API key")
    _shot(page, "wrong-key")
    page.fill("#key-input", KEY)
    page.click("#key-form button[type=submit]")
    expect(page.locator("#key-form")).to_be_hidden()
    expect(page.locator("#model")).to_have_value(MODEL)
    assert page.evaluate("localStorage.getItem('nanoinfer.apiKey')") == KEY
    _no_page_errors(page)


def test_chat_streams_tokens_with_their_alternatives(open_page: Callable[..., Page]) -> None:
    page = open_page()
    # Every batch of new tokens the page draws, counted as it happens.
    page.evaluate(
        """() => { window.seen = []; new MutationObserver(() => window.seen.push(
            document.querySelectorAll('.msg.assistant .tok').length)).observe(
            document.getElementById('messages'), {childList: true, subtree: true}); }"""
    )
    page.fill("#system", SYSTEM)
    requests: list[dict[str, Any]] = []
    page.on("request", lambda r: requests.append(r.post_data_json) if r.url.endswith("/chat/completions") else None)
    answer = _send(page, "Name three colours.", temperature=0, max_tokens=24)
    tokens = answer.locator(".tok")
    n = tokens.count()
    assert n > 3
    seen = page.evaluate("window.seen")
    assert len({c for c in seen if 0 < c < n}) >= 2, f"the answer did not arrive token by token: {seen}"
    body = requests[0]
    assert body["stream"] and body["logprobs"] and body["top_logprobs"] == 5 and body["return_tokens_as_token_ids"]
    assert body["stream_options"] == {"include_usage": True}
    assert body["temperature"] == 0 and body["max_tokens"] == 24
    assert not {"top_p", "top_k", "min_p", "seed"} & set(body), "untouched controls must leave the defaults alone"
    assert re.fullmatch(r"\d+ ms", page.inner_text("#stat-ttft"))
    assert page.inner_text("#stat-generated") == str(n)
    for k in range(n):  # every token coloured by its probability
        assert re.search(r"\bp[0-4]\b", tokens.nth(k).get_attribute("class") or "")

    tokens.nth(1).hover()
    popup = page.locator("#alts")
    expect(popup).to_be_visible()
    rows = popup.locator(".alt")
    assert 5 <= rows.count() <= 6
    shares = [float(t.rstrip("%").lstrip("<")) for t in popup.locator(".pct").all_inner_texts()]
    assert shares[:5] == sorted(shares[:5], reverse=True) and sum(shares[:5]) <= 100.5
    assert popup.locator(".alt.chosen").count() == 1
    assert popup.locator(".bar span").count() == rows.count()
    _shot(page, "alternatives")
    _no_page_errors(page)


def test_forcing_an_alternative_regenerates_from_there(open_page: Callable[..., Page]) -> None:
    page = open_page()
    completions: list[dict[str, Any]] = []
    page.on("request", lambda r: completions.append(r.post_data_json) if r.url.endswith("/v1/completions") else None)
    answer = _send(page, "Write one sentence about the sea.", temperature=0, max_tokens=20)
    k = 2
    before = [_token_label(page, answer, i) for i in range(k)]
    answer.locator(".tok").nth(k).hover()
    alternative = page.locator("#alts .alt:not(.chosen)").first
    forced_text = alternative.locator(".alt-text").inner_text().replace("␣", " ").replace("↵", "\n")
    alternative.click()
    _wait_idle(page)
    expect(answer.locator(".tok.forced")).to_have_count(1)
    tokens = answer.locator(".tok")
    assert tokens.nth(k).get_attribute("class").split().count("forced") == 1  # type: ignore[union-attr]
    assert [_token_label(page, answer, i) for i in range(k)] == before
    assert _token_label(page, answer, k).replace("␣", " ").replace("↵", "\n") == forced_text
    assert tokens.count() > k + 1, "no continuation after the forced token"
    page.keyboard.press("Escape")  # the popup sits inside the message: out of its text
    expect(page.locator("#alts")).to_be_hidden()
    text = "".join(tokens.nth(i).inner_text() for i in range(k + 1))
    assert text.endswith(forced_text) and answer.locator(".bubble").inner_text().startswith(text)
    # The continuation came from /v1/completions on exact ids, the chat prompt's prefix cached.
    body = completions[0]
    assert body["stream"] and body["logprobs"] == 5 and all(isinstance(t, int) for t in body["prompt"])
    assert body["max_tokens"] == 20 - (k + 1)
    assert int(page.inner_text("#stat-cached").split()[0]) > 0
    # The continuation's tokens have their alternatives too (their texts learnt from /detokenize).
    tokens.nth(k + 1).hover()
    expect(page.locator("#alts .alt")).not_to_have_count(0)
    assert all(label.strip() for label in page.locator("#alts .alt-text").all_inner_texts())
    _shot(page, "forced")
    _no_page_errors(page)


def test_prompt_view_shows_pieces_ids_and_the_cached_span(open_page: Callable[..., Page], server: str) -> None:
    page = open_page()
    page.fill("#system", SYSTEM + " (prompt view)")
    _send(page, "Say hello.", max_tokens=4)
    page.click("#clear")
    _send(page, CJK, max_tokens=4)  # the same system prompt: its pages come from the prefix cache
    messages = [{"role": "system", "content": SYSTEM + " (prompt view)"}, {"role": "user", "content": CJK}]
    rendered = httpx.post(
        f"{server}/tokenize", json={"messages": messages, "return_token_strs": True}, headers=_auth()
    ).json()
    assert len(rendered["token_strs"]) == rendered["count"]
    chips = page.locator("#prompt-tokens .chip")
    expect(chips).to_have_count(rendered["count"])
    assert [int(t) for t in page.locator("#prompt-tokens .id").all_inner_texts()] == rendered["tokens"]
    assert CJK in page.inner_text("#prompt-text")
    halves = page.locator("#prompt-tokens .chip.frag")
    assert halves.count() > 0, "pieces holding part of a character are not marked"
    assert halves.first.inner_text().startswith("\\x") and "part of “明”" in (halves.first.get_attribute("title") or "")
    cached = int(page.inner_text("#stat-cached").split()[0])
    assert cached >= 16
    expect(page.locator("#prompt-tokens .chip.cached")).to_have_count(cached)
    assert page.locator("#prompt-text mark").inner_text().startswith("<|im_start|>system")
    page.locator("#prompt-box").scroll_into_view_if_needed()
    _shot(page, "prompt-view", full_page=True)
    _no_page_errors(page)


def test_an_answer_reads_whole_characters_from_partial_tokens(open_page: Callable[..., Page]) -> None:
    """明 split e6 98 | 8e reads 明 in the answer, the first half a box naming it; labels escape."""
    page = open_page()
    seen = page.evaluate(
        """() => {
        const tokens = [[0xe6, 0x98], [0x8e], [0xe6, 0x9c, 0x88], [0x0a]].map(
            (b, id) => ({id, bytes: Uint8Array.from(b), logprob: -0.1, alts: []}));
        const item = messageItem({role: "assistant", tokens}, 0);
        const frag = item.querySelector(".tok.frag");
        return {text: item.querySelector(".bubble").textContent, frags: item.querySelectorAll(".tok.frag").length,
                partOf: frag.dataset.partOf, labels: tokens.map((t) => tokenLabel(t.bytes)),
                pieces: [pieceBytes("æĺ"), pieceBytes("Ġthe")].map((b) => Array.from(b)),
                byteLevel: [looksByteLevel(["<|im_start|>", "æĺ", "Ċ"]), looksByteLevel(["<bos>", "\u2581the"])]};
    }"""
    )
    assert seen == {
        "text": "明月\n",
        "frags": 1,
        "partOf": "明",
        "labels": ["\\xe6\\x98", "\\x8e", "月", "\n"],
        "pieces": [[0xE6, 0x98], [0x20, 0x74, 0x68, 0x65]],
        "byteLevel": [True, False],
    }


def test_errors_are_shown(open_page: Callable[..., Page]) -> None:
    page = open_page()
    page.fill("#max_tokens", str(MAX_MODEL_LEN * 2))
    page.fill("#input", "Hello")
    page.press("#input", "Enter")
    expect(page.locator("#banner")).to_contain_text("maximum context length")
    expect(page.locator("#input")).to_have_value("Hello")  # the turn is handed back to edit
    expect(page.locator(".msg")).to_have_count(0)
    _shot(page, "context-overflow")
    page.fill("#max_tokens", "")
    # The server gone: every request fails at the network level.
    page.route(re.compile(r".*/(tokenize|metrics|v1/.*)$"), lambda route: route.abort())
    page.press("#input", "Enter")
    expect(page.locator("#banner")).to_contain_text("Cannot reach the server")
    expect(page.locator("#stat-running")).to_have_text("offline", timeout=10_000)
    _shot(page, "server-gone")


def test_keyboard_stop_and_regenerate(open_page: Callable[..., Page], server: str) -> None:
    page = open_page()
    page.fill("#input", "line one")
    page.press("#input", "Shift+Enter")
    page.type("#input", "line two")
    expect(page.locator("#input")).to_have_value("line one\nline two")
    assert page.locator(".msg").count() == 0
    page.fill("#input", "")
    answer = _send(page, "Say yes.", temperature=0, max_tokens=6)
    # Tab from the message box reaches the tokens; focus opens the popup, Tab enters it, Escape closes it.
    answer.locator(".tok").first.focus()
    expect(page.locator("#alts")).to_be_visible()
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.classList.contains('alt')")
    page.keyboard.press("Escape")
    expect(page.locator("#alts")).to_be_hidden()
    assert page.evaluate("document.activeElement.classList.contains('tok')")
    # Stop: the stream is aborted, and so is the request on the server.
    page.fill("#max_tokens", "400")
    page.fill("#input", "Count from 1 to 300, one number per line.")
    page.press("#input", "Enter")
    expect(page.locator(".msg.assistant")).to_have_count(2)
    last = page.locator(".msg.assistant").nth(1)
    expect(last.locator(".tok").nth(5)).to_be_visible()
    page.click("#stop")
    _wait_idle(page)
    expect(last.locator(".meta")).to_have_text("stopped")
    assert last.locator(".tok").count() < 400
    deadline = time.monotonic() + 10
    while _metric(server, "nanoinfer:num_requests_running") > 0:
        assert time.monotonic() < deadline, "the stopped request still runs on the server"
        time.sleep(0.1)
    # Regenerate: the last answer is replaced, not added to.
    page.fill("#max_tokens", "6")
    page.click("#regenerate")
    _wait_idle(page)
    expect(page.locator(".msg.assistant")).to_have_count(2)
    expect(page.locator(".msg.assistant").last.locator(".meta")).not_to_have_text("stopped")
    _no_page_errors(page)


def test_phone_width(open_page: Callable[..., Page]) -> None:
    page = open_page(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    answer = _send(page, "Name a fruit.", temperature=0, max_tokens=12)
    assert page.evaluate("document.documentElement.scrollWidth") <= 390, "the page scrolls sideways"
    answer.locator(".tok").nth(1).tap()
    popup = page.locator("#alts")
    expect(popup).to_be_visible()
    box = popup.bounding_box()
    assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 390
    _shot(page, "phone")
    _no_page_errors(page)


def _metric(url: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", httpx.get(f"{url}/metrics").text, re.M)
    assert match, name
    return float(match.group(1))
