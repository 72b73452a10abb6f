"""The chat page at `/` in headless Chromium (through selenium): type a message, press send, and watch the answer
stream in: it must arrive in several pieces and end as the API's greedy answer.

Needs selenium, Chromium and its chromedriver (found on PATH, or at LMLAB_CHROMIUM / LMLAB_CHROMEDRIVER). Without
them the test is skipped, except under CI (the CI environment variable set), where that is a failure.
"""

from __future__ import annotations

import os
import shutil
import time

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from lmlab.infer.engine import Engine, EngineConfig  # noqa: E402
from lmlab.infer.server import create_app, serve_in_thread  # noqa: E402
from lmlab.model import load  # noqa: E402
from lmlab.tokenizer import load_tokenizer  # noqa: E402

KEY = "sk-page-key"
QUESTION = "Hello there, how are you?"
MAX_TOKENS = 24

# What the page does on each new piece of the answer, recorded: the answer's length after every change.
RECORD_LENGTHS = """
window.lengths = [];
const log = document.getElementById("log");
new MutationObserver(() => {
  const answers = log.querySelectorAll(".msg.assistant");
  if (answers.length) window.lengths.push(answers[answers.length - 1].textContent.length);
}).observe(log, { subtree: true, childList: true, characterData: true });
"""


def _browser_paths() -> tuple[str, str]:
    """(chromium, chromedriver), skipping (or failing under CI) with the reason when something is missing."""
    chromium = os.environ.get("LMLAB_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    driver = os.environ.get("LMLAB_CHROMEDRIVER") or shutil.which("chromedriver")
    missing = []
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip install selenium)")
    if not chromium:
        missing.append("Chromium (apt install chromium, or set LMLAB_CHROMIUM)")
    if not driver:
        missing.append("chromedriver (apt install chromium-driver, or set LMLAB_CHROMEDRIVER)")
    if missing:
        reason = "the chat page test needs " + ", ".join(missing)
        if os.environ.get("CI"):
            pytest.fail(reason + "; CI must have them")
        pytest.skip(reason)
    return chromium, driver


@pytest.fixture
def browser(tmp_path):
    chromium, driver_path = _browser_paths()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def server(tiny_base, monkeypatch):
    model, tokenizer = load(tiny_base).eval(), load_tokenizer(tiny_base)
    engine = Engine(model, tokenizer, EngineConfig(max_num_seqs=4, max_batch_tokens=64))
    step = engine.step

    def paced_step():  # a tiny model answers in milliseconds; pace it so the stream visibly arrives in pieces
        time.sleep(0.02)
        return step()

    monkeypatch.setattr(engine, "step", paced_step)
    with serve_in_thread(create_app(engine, model_name="tiny", api_key=KEY)) as running:
        yield running.url


def _fill(element, text: str) -> None:
    element.clear()
    element.send_keys(text)


def test_chat_page_streams_the_answer(browser, server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    api = openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)
    want = api.chat.completions.create(model="tiny", messages=[{"role": "user", "content": QUESTION}],
                                       temperature=0, max_tokens=MAX_TOKENS).choices[0].message.content
    assert len(want) > 3

    browser.get(server + "/")
    _fill(browser.find_element(By.ID, "key"), KEY)
    _fill(browser.find_element(By.ID, "temperature"), "0")
    _fill(browser.find_element(By.ID, "max-tokens"), str(MAX_TOKENS))
    browser.execute_script(RECORD_LENGTHS)
    browser.find_element(By.ID, "input").send_keys(QUESTION)
    browser.find_element(By.ID, "send").click()

    def answer_finished(driver):
        state = driver.execute_script(
            "const a = document.querySelector('.msg.assistant'); return a ? a.dataset.state : null;")
        if state == "error":
            error = driver.find_element(By.CSS_SELECTOR, ".msg.error").text
            pytest.fail(f"the page reported an error: {error}")
        return state == "done"

    WebDriverWait(browser, 30).until(answer_finished)
    shown = browser.execute_script("return document.querySelector('.msg.assistant').textContent;")
    assert shown == want  # the streamed pieces add up to the API's greedy answer
    assert browser.find_element(By.CSS_SELECTOR, ".msg.user").text == QUESTION
    lengths = browser.execute_script("return window.lengths;")
    growing = sorted({n for n in lengths if n > 0})
    assert len(growing) > 1, lengths  # it arrived in more than one piece
    assert growing[-1] == len(want)
    assert browser.execute_script("return document.querySelector('#model').textContent;").endswith("tiny")

    # a second turn sends the whole conversation, and a wrong key is reported on the page
    _fill(browser.find_element(By.ID, "key"), "wrong")
    browser.find_element(By.ID, "input").send_keys("And then?")
    browser.find_element(By.ID, "send").click()
    WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.error"))
    assert "API key" in browser.find_element(By.CSS_SELECTOR, ".msg.error").text
