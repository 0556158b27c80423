"""The chat page at / in a real headless browser (Debian's chromium, driven through chromedriver by
Selenium): type a message, watch the reply stream in, keep the conversation. The screenshot is
kept as a test artifact in $OUVERT_TEST_ARTIFACTS (default .cache/test-artifacts/)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from ouvert import ModelConfig, Transformer, load_tokenizer, save_model
from ouvert.serve.api import create_app
from ouvert.serve.engine import Engine

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
ARTIFACTS = Path(os.environ.get("OUVERT_TEST_ARTIFACTS", ROOT / ".cache" / "test-artifacts"))

if not os.environ.get("CI"):  # CI installs all three (.ci/run, requirements-dev.txt): there the test must run
    if not (CHROMIUM and DRIVER):
        pytest.skip("needs Debian's chromium and chromium-driver", allow_module_level=True)
    pytest.importorskip("selenium")

from selenium import webdriver  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def url(tmp_path_factory, llama3_tokenizer_dir):
    from ouvert.serve.cli import BackgroundServer

    tok = load_tokenizer(llama3_tokenizer_dir)
    model = Transformer(ModelConfig(
        vocab_size=128256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=128000,
        eos_token_id=128001))
    model.init_weights(std=0.2, generator=torch.Generator().manual_seed(0))
    out = tmp_path_factory.mktemp("page") / "page-model"
    save_model(model, out, tokenizer=tok)
    with BackgroundServer(create_app(Engine(model, tok, max_batch=2, chunk=32), "page-model")) as u:
        yield u


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
              "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1100,800",
              f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        opts.add_argument(a)
    driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=DRIVER))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def bubbles(driver, role: str) -> list[str]:
    return [e.text for e in driver.find_elements(By.CSS_SELECTOR, f".msg.{role} .text")]


def test_chat_page_streams_and_keeps_the_conversation(url, browser):
    wait = WebDriverWait(browser, 60)
    browser.get(url + "/")
    wait.until(lambda d: "page-model" in d.find_element(By.ID, "model").text)
    max_tokens = browser.find_element(By.ID, "max_tokens")
    max_tokens.clear()
    max_tokens.send_keys("60")
    # Record the reply's length at every change the page makes to it, to see it grow token by token.
    browser.execute_script("""
        window.lengths = [];
        new MutationObserver(() => {
          const b = document.querySelectorAll('.msg.assistant .text');
          if (b.length) window.lengths.push(b[b.length - 1].textContent.length);
        }).observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});
    """)
    box = browser.find_element(By.ID, "input")
    box.send_keys("Hello! Tell me a story.")
    box.send_keys(Keys.ENTER)
    wait.until(lambda d: "tokens/s" in d.find_element(By.CSS_SELECTOR, ".msg.assistant .meta").text)
    assert bubbles(browser, "user") == ["Hello! Tell me a story."]
    (reply,) = bubbles(browser, "assistant")
    assert reply.strip()
    lengths = [n for n in browser.execute_script("return window.lengths") if n > 0]
    assert len(set(lengths)) >= 10 and lengths == sorted(lengths)  # it arrived in many growing pieces
    meta = browser.find_element(By.CSS_SELECTOR, ".msg.assistant .meta").text
    assert meta.startswith("60 tokens,") and "(length)" in meta
    assert "tokens/s" in browser.find_element(By.ID, "stats").text

    box.send_keys("And then?")
    box.send_keys(Keys.ENTER)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant .meta")) == 2
               and "tokens/s" in d.find_elements(By.CSS_SELECTOR, ".msg.assistant .meta")[1].text)
    assert bubbles(browser, "user") == ["Hello! Tell me a story.", "And then?"]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / "chat_page.png"))

    browser.refresh()  # the conversation survives a reload
    wait.until(lambda d: len(bubbles(d, "assistant")) == 2)
    assert bubbles(browser, "user") == ["Hello! Tell me a story.", "And then?"]
    browser.find_element(By.ID, "reset").click()
    assert bubbles(browser, "user") == []
