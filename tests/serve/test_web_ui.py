"""The web chat page at ``/``, driven in headless Chromium against a real stack serving the default model.

One conversation: the page loads without the API key (the model list then shows the 401), the key is typed
in, a first reply streams to its end, a second grows on screen over several polls and is stopped, and the
server then runs nothing; the next turns resend the whole history, the stopped partial reply included; "New
chat" starts over. Every resource the page loaded is same-origin. ``--no-web-ui`` makes ``/`` a 404 in the
API's error shape. A screenshot is taken mid-stream: into docs/images/web_chat.png with
LONGSERVE_WRITE_SCREENSHOTS=1, else into tmp_path.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait
from stack import Stack

from longserve.cli import _serve_config, build_parser
from longserve.config import ServeConfig
from longserve.serve.api_server import create_api_app

MODEL = "SmolLM2-135M-Instruct"
KEY = "sk-web-ui-test"
SYSTEM = "You are a helpful assistant."
SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "images" / "web_chat.png"
# Wraps fetch so the test sees each chat request body exactly as the page sends it.
RECORD_CHAT_REQUESTS = """
window.sentChats = [];
const original = window.fetch;
window.fetch = (url, init) => {
  if (String(url).includes("chat/completions")) window.sentChats.push(JSON.parse(init.body));
  return original(url, init);
};
"""


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with Stack(
        None, num_workers=1, engine_options={"kv_cache_memory_mb": 64}, model_name=MODEL, api_keys=(KEY,)
    ) as running:
        yield running


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or chromedriver is None:
        pytest.skip(
            "chromium and chromedriver are not installed (Debian: apt-get install chromium chromium-driver)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=chromedriver), options=options)
    # The page itself 1200x800 (a window size would include the browser's own frame).
    metrics = {"width": 1200, "height": 800, "deviceScaleFactor": 1, "mobile": False}
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
    try:
        yield driver
    finally:
        driver.quit()


def wait(driver: webdriver.Chrome, condition, timeout: float = 20.0, what: str = "condition"):
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: condition())
    except TimeoutException:
        state = driver.execute_script(
            "return {error: document.getElementById('error').textContent,"
            " messages: document.getElementById('messages').innerText.slice(-600)}"
        )
        pytest.fail(f"timed out after {timeout} s waiting for {what}; the page: {state}")


def by_id(driver: webdriver.Chrome, element_id: str):
    return driver.find_element(By.ID, element_id)


def replies(driver: webdriver.Chrome) -> list:
    return driver.find_elements(By.CSS_SELECTOR, "#messages .message.assistant")


def reply_text(driver: webdriver.Chrome) -> str:
    return driver.execute_script(
        "const r = document.querySelectorAll('#messages .message.assistant .content');"
        "return r.length ? r[r.length - 1].textContent : '';"
    )


def set_value(driver: webdriver.Chrome, element_id: str, value: str) -> None:
    field = by_id(driver, element_id)
    field.clear()
    field.send_keys(value)


def say(driver: webdriver.Chrome, text: str, max_tokens: int) -> None:
    set_value(driver, "max-tokens", str(max_tokens))
    set_value(driver, "prompt", text)
    by_id(driver, "prompt").send_keys(Keys.ENTER)
    wait(driver, lambda: by_id(driver, "stop").is_enabled(), what="the reply to start")


def say_and_finish(driver: webdriver.Chrome, text: str, max_tokens: int) -> str:
    """Sends ``text`` and waits for the whole reply; returns the line under it (its token counts)."""
    say(driver, text, max_tokens)
    wait(driver, lambda: not by_id(driver, "stop").is_enabled(), timeout=30, what="the reply to finish")
    assert not by_id(driver, "error").is_displayed(), by_id(driver, "error").text
    return replies(driver)[-1].find_element(By.CLASS_NAME, "meta").text


def server_running(stack: Stack) -> float:
    text = httpx.get(f"{stack.api_url}/metrics", timeout=5).text
    lines = [line for line in text.splitlines() if line.startswith("vllm:num_requests_running{")]
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines)


def prompt_tokens(meta: str) -> int:
    return int(meta.split(" prompt + ")[0].rsplit(" ", 1)[-1])


def test_page_and_static_files_need_no_key(stack: Stack) -> None:
    page = httpx.get(f"{stack.api_url}/", timeout=5)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for name in ("app.js", "style.css"):
        assert httpx.get(f"{stack.api_url}/static/{name}", timeout=5).status_code == 200
    assert httpx.get(f"{stack.api_url}/v1/models", timeout=5).status_code == 401
    missing = httpx.get(f"{stack.api_url}/static/missing.js", timeout=5)
    assert missing.status_code == 404 and "message" in missing.json()["error"]


def test_chat_streams_stops_and_keeps_history(
    stack: Stack, browser: webdriver.Chrome, tmp_path: Path
) -> None:
    driver = browser
    driver.get(f"{stack.api_url}/")
    error = by_id(driver, "error")
    wait(driver, lambda: error.is_displayed() and "401" in error.text, what="the 401 of the model list")
    assert "API key" in error.text
    driver.execute_script(RECORD_CHAT_REQUESTS)

    by_id(driver, "api-key").send_keys(KEY, Keys.TAB)  # the key is read on change
    wait(driver, lambda: MODEL in [o.text for o in Select(by_id(driver, "model")).options], what="models")
    Select(by_id(driver, "model")).select_by_value(MODEL)
    assert not error.is_displayed()
    set_value(driver, "system", SYSTEM)
    set_value(driver, "temperature", "0")  # greedy: the same replies every run

    first_meta = say_and_finish(driver, "What is the capital of France?", max_tokens=40)
    first_reply = reply_text(driver)
    assert first_reply and " prompt + " in first_meta

    # A long reply, watched while it streams: it must grow over several polls, the panel must see it run.
    say(driver, "Write a long story about a robot who learns to paint.", max_tokens=600)
    lengths = [len(reply_text(driver))]

    def grew() -> bool:
        length = len(reply_text(driver))
        if length > lengths[-1]:
            lengths.append(length)
        return len(lengths) >= 5

    wait(driver, grew, what="the reply to grow over several polls")
    wait(driver, lambda: len(reply_text(driver)) > 250, timeout=30, what="a few lines of the story")
    wait(driver, lambda: by_id(driver, "metric-running").text == "1", timeout=6, what="the panel to show it")
    wait(
        driver, lambda: float(by_id(driver, "metric-tps").text.replace("–", "0")) > 0, timeout=6, what="tok/s"
    )
    shot = SCREENSHOT if os.environ.get("LONGSERVE_WRITE_SCREENSHOTS") == "1" else tmp_path / "web_chat.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    assert driver.save_screenshot(str(shot))
    assert by_id(driver, "stop").is_enabled(), "the reply finished before it could be stopped"

    by_id(driver, "stop").click()
    wait(driver, lambda: not by_id(driver, "stop").is_enabled(), what="the stop to take effect")
    stopped = reply_text(driver)
    assert replies(driver)[-1].find_element(By.CLASS_NAME, "meta").text == "stopped"
    deadline = time.monotonic() + 5
    while server_running(stack) or stack.engines[0].engine.requests:
        assert time.monotonic() < deadline, "the server still runs the stopped request"
        time.sleep(0.1)
    time.sleep(0.5)
    assert reply_text(driver) == stopped, "the reply kept growing after stop"

    third_meta = say_and_finish(driver, "Thanks!", max_tokens=8)
    sent = driver.execute_script("return window.sentChats")
    assert [m["role"] for m in sent[2]["messages"]] == [
        "system",
        "user",
        "assistant",
        "user",
        "assistant",
        "user",
    ]
    assert sent[2]["messages"][2]["content"] == first_reply
    assert sent[2]["messages"][4]["content"] == stopped  # the partial reply, as shown
    assert sent[1]["messages"] == sent[2]["messages"][:4]
    assert sent[1]["stream"] is True and sent[1]["temperature"] == 0 and sent[1]["max_tokens"] == 600
    assert prompt_tokens(third_meta) > prompt_tokens(first_meta) + len(stopped) // 8

    by_id(driver, "new-chat").click()
    assert not replies(driver)
    say_and_finish(driver, "Hi", max_tokens=4)
    last = driver.execute_script("return window.sentChats")[-1]["messages"]
    assert last == [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi"}]

    origin = stack.api_url.rstrip("/")
    resources = driver.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)"
        ".concat(performance.getEntriesByType('navigation').map(e => e.name))"
    )
    assert any(name.endswith("/static/app.js") for name in resources), resources
    assert all(name.startswith(f"{origin}/") for name in resources), resources


def test_a_bad_request_shows_the_servers_message(stack: Stack, browser: webdriver.Chrome) -> None:
    driver = browser
    driver.get(f"{stack.api_url}/")
    by_id(driver, "api-key").send_keys(KEY, Keys.TAB)
    wait(driver, lambda: by_id(driver, "model").get_attribute("value") == MODEL, what="models")
    set_value(driver, "temperature", "9")
    set_value(driver, "prompt", "Hello")
    by_id(driver, "send").click()
    error = by_id(driver, "error")
    wait(driver, lambda: error.is_displayed(), what="the error")
    assert error.text.startswith("400: ") and "temperature" in error.text
    assert not replies(driver) and by_id(driver, "prompt").get_attribute("value") == "Hello"


def test_no_web_ui_is_a_404_in_the_api_error_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    args = build_parser().parse_args(["api", "--no-web-ui"])
    config = _serve_config(args)
    assert config.web_ui is False
    assert _serve_config(build_parser().parse_args(["serve"])).web_ui is True
    monkeypatch.setenv("LONGSERVE_WEB_UI", "0")
    assert _serve_config(build_parser().parse_args(["serve"])).web_ui is False
    with TestClient(create_api_app(config)) as client:
        for path in ("/", "/static/app.js"):
            response = client.get(path)
            assert response.status_code == 404
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}
        assert "--no-web-ui" in client.get("/").json()["error"]["message"]
    with TestClient(create_api_app(ServeConfig())) as client:
        assert client.get("/").status_code == 200
        assert json.loads(client.get("/openapi.json").text)["paths"].get("/") is None


def test_a_reasoning_models_thinking_shows_apart_from_its_answer(browser: webdriver.Chrome) -> None:
    """With a fake engine that says what the prompt scripts, through the real API server and worker."""
    from api_fakes import MODEL as FAKE
    from api_fakes import create_fake_controller, create_fake_worker
    from servers import serve_app

    def answered(turn: int) -> bool:
        shown = replies(browser)
        return len(shown) == turn and "tokens" in shown[-1].text

    def send(text: str, turn: int) -> None:  # the fake answers at once: wait for the turn's token line
        set_value(browser, "prompt", text)
        by_id(browser, "prompt").send_keys(Keys.ENTER)
        wait(browser, lambda: answered(turn), what="the reply")

    worker = create_fake_worker(context_length=512, reasoning_parser="think")
    with serve_app(worker) as worker_url, serve_app(create_fake_controller([worker_url])) as controller_url:
        with serve_app(create_api_app(ServeConfig(controller_address=controller_url))) as api_url:
            browser.get(f"{api_url}/")
            models = lambda: [o.text for o in Select(by_id(browser, "model")).options]  # noqa: E731
            wait(browser, lambda: FAKE in models(), what="models")
            Select(by_id(browser, "model")).select_by_value(FAKE)  # (the page may remember another model)
            set_value(browser, "max-tokens", "60")
            browser.execute_script(RECORD_CHAT_REQUESTS)
            send("SAY:<think>two and two</think>Four.", turn=1)
            thinking = browser.find_elements(By.CSS_SELECTOR, "#messages .message.assistant .thinking-text")
            assert [t.text for t in thinking] == ["two and two"]
            assert reply_text(browser) == "Four."
            send("SAY:again", turn=2)
            sent = browser.execute_script("return window.sentChats")[-1]["messages"]
            assert sent[-2] == {"role": "assistant", "content": "Four."}  # the thinking is not sent back
