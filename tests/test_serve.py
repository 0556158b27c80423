"""`ouvert serve` as clients meet it: a live uvicorn server on 127.0.0.1, driven by the official
`openai` client (and by raw HTTP where the client hides what we check), over a random-weight
Llama with Llama 3's real tokenizer and chat template."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2 as httpx  # the HTTP client the openai package is built on
import jsonschema
import openai
import pytest
import torch

from ouvert import ModelConfig, Transformer, load_tokenizer, save_model
from ouvert.cli import build_parser
from ouvert.serve import tools as tool_fmt
from ouvert.serve.cli import BackgroundServer, build_app

CONFIG = dict(model_type="llama", vocab_size=128256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True,
              bos_token_id=128000, eos_token_id=128001)
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]},
                           "days": {"type": "integer", "minimum": 1, "maximum": 7}},
            "required": ["city", "unit"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}}}
USER = [{"role": "user", "content": "Hello! Who are you?"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, llama3_tokenizer_dir):
    out = tmp_path_factory.mktemp("serve") / "tiny-chat"
    model = Transformer(ModelConfig(**CONFIG))
    model.init_weights(std=0.2, generator=torch.Generator().manual_seed(0))
    save_model(model, out, tokenizer=load_tokenizer(llama3_tokenizer_dir))
    return out


def start(model_dir, *flags):
    """An app built by `ouvert serve`'s own argument parsing and loading, served from a thread."""
    args = build_parser().parse_args(["serve", "--model", str(model_dir), "--chunk", "16", *flags])
    app, _ = build_app(args)
    return BackgroundServer(app)


@pytest.fixture(scope="module")
def url(model_dir):
    with start(model_dir, "--max-batch", "8", "--max-body", "65536") as u:
        yield u


@pytest.fixture(scope="module")
def strict_url(model_dir):
    """A server with the default body limit (4 MiB), a queue of 4 and a body timeout of 1 s."""
    with start(model_dir, "--max-batch", "2", "--max-queue", "4", "--body-timeout", "1") as u:
        yield u


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def chat(client, messages=USER, **kw):
    return client.chat.completions.create(model="tiny-chat", messages=messages, **kw)


class Ticker:
    """A long streaming request read in a thread, with the time each line of it arrives: how steadily
    one stream is served while something else happens."""

    def __init__(self, url: str):
        self.times: list[float] = []
        self.done = threading.Event()
        body = {"model": "tiny-chat", "messages": USER, "max_tokens": 4000, "stream": True, "ignore_eos": True}

        def read():
            with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as r:
                for _ in r.iter_lines():
                    self.times.append(time.monotonic())
                    if self.done.is_set():
                        return

        self.thread = threading.Thread(target=read, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while len(self.times) < 10 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(self.times) >= 10, "the stream did not start"

    def largest_gap(self) -> float:
        """Stop reading (after one more line) and return the longest wait between two lines."""
        self.done.set()
        self.thread.join(timeout=120)
        return max(b - a for a, b in zip(self.times, self.times[1:]))


def metrics(url) -> dict[str, float]:
    text = httpx.get(url + "/metrics").text
    return {m[1]: float(m[2]) for m in re.finditer(r"^([a-z_]+(?:\{[^}]*\})?) (\S+)$", text, re.M)}


# ---- the API surface ------------------------------------------------------------------------


def test_models_health_and_page(url, client):
    assert [m.id for m in client.models.list()] == ["tiny-chat"]
    assert client.models.retrieve("tiny-chat").id == "tiny-chat"
    assert httpx.get(url + "/health").json()["status"] == "ok"
    page = httpx.get(url + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"] and "ouvert" in page.text


def test_chat_stream_and_not_agree(url, client):
    full = chat(client, max_tokens=12, temperature=0)
    c = full.choices[0]
    assert c.message.role == "assistant" and c.message.content and c.finish_reason == "length"
    assert full.usage.completion_tokens == 12 and full.usage.total_tokens == full.usage.prompt_tokens + 12
    chunks = list(chat(client, max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == c.message.content
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12
    # the wire format: server-sent events ending with [DONE]
    body = {"model": "tiny-chat", "messages": USER, "max_tokens": 3, "stream": True}
    lines = [ln for ln in httpx.post(url + "/v1/chat/completions", json=body).text.split("\n") if ln]
    assert all(ln.startswith("data: ") for ln in lines) and lines[-1] == "data: [DONE]"
    # max_completion_tokens is the newer name of max_tokens
    assert chat(client, max_completion_tokens=5, temperature=0).usage.completion_tokens == 5


def test_completions(client, llama3_tokenizer_dir):
    r = client.completions.create(model="tiny-chat", prompt="Once upon a time", max_tokens=10, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text and r.usage.completion_tokens == 10
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny-chat", prompt="Once upon a time", max_tokens=10, temperature=0, stream=True))
    assert streamed == r.choices[0].text
    echo = client.completions.create(model="tiny-chat", prompt="Once upon a time", max_tokens=4, temperature=0,
                                     echo=True)
    assert echo.choices[0].text.startswith("Once upon a time")
    prompt_ids = load_tokenizer(llama3_tokenizer_dir).encode("Once upon a time")  # the same prompt as token ids
    ids = client.completions.create(model="tiny-chat", prompt=prompt_ids, max_tokens=10, temperature=0)
    assert ids.choices[0].text == r.choices[0].text and ids.usage.prompt_tokens == len(prompt_ids)


def test_n_choices(client):
    r = chat(client, max_tokens=8, temperature=1.0, seed=7, n=3)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert len({c.message.content for c in r.choices}) > 1
    assert r.usage.completion_tokens == 24
    streamed = {}
    for ch in chat(client, max_tokens=8, temperature=1.0, seed=7, n=3, stream=True):
        for c in ch.choices:
            streamed[c.index] = streamed.get(c.index, "") + (c.delta.content or "")
    assert [streamed[i] for i in range(3)] == [c.message.content for c in r.choices]


def test_stop(client):
    full = chat(client, max_tokens=24, temperature=0).choices[0].message.content
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    r = chat(client, max_tokens=24, temperature=0, stop=[stop, "never-seen-stop"])
    assert r.choices[0].message.content == full[: full.index(stop)] and r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in chat(client, max_tokens=24, temperature=0,
                                                                       stop=stop, stream=True) if c.choices)
    assert streamed == full[: full.index(stop)]


def test_seed_reproducibility(client):
    a = [chat(client, max_tokens=10, temperature=1.0, top_p=0.95, seed=s).choices[0].message.content
         for s in (1, 1, 2)]
    assert a[0] == a[1] != a[2]
    # penalties change the distribution, and are reproducible too
    p = [chat(client, max_tokens=10, temperature=1.0, seed=1, presence_penalty=2, frequency_penalty=2)
         .choices[0].message.content for _ in range(2)]
    assert p[0] == p[1]


def test_logprobs(client):
    r = chat(client, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 6 and "".join(e.token for e in content) == r.choices[0].message.content
    for e in content:
        tops = [t.logprob for t in e.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and tops[0] <= 0
        assert e.logprob == tops[0] and e.token == e.top_logprobs[0].token  # greedy takes the most likely
    c = client.completions.create(model="tiny-chat", prompt="Hi", max_tokens=4, temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == 4 and len(lp.top_logprobs[0]) == 2 and all(x <= 0 for x in lp.token_logprobs)
    assert lp.text_offset[0] == 0 and "".join(lp.tokens) == c.choices[0].text


# ---- constrained decoding and tools -----------------------------------------------------------


def test_json_object(client):
    for seed in range(3):
        r = chat(client, max_tokens=40, temperature=1.0, seed=seed, response_format={"type": "json_object"})
        assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_json_schema(client):
    schema = {"type": "object", "properties": {
        "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "languages": {"type": "array", "items": {"enum": ["fr", "en", "de"]}}},
        "required": ["name", "age", "languages"], "additionalProperties": False}
    for seed in range(3):
        r = chat(client, max_tokens=48, temperature=1.0, seed=seed,
                 response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}})
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)


def test_tool_call_round_trip(client):
    messages = [{"role": "user", "content": "What's the weather in Paris?"}]
    r = chat(client, messages, max_tokens=64, temperature=1.0, seed=3, tools=[WEATHER, TIME], tool_choice="required")
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    params = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]["function"]["parameters"]
    jsonschema.validate(json.loads(call.function.arguments), params)
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21, "sky": "clear"}'}]
    answer = chat(client, messages, max_tokens=8, temperature=0, tools=[WEATHER, TIME], tool_choice="none")
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls
    assert answer.usage.prompt_tokens > r.usage.prompt_tokens + 10  # the call and its result are in the prompt


def test_named_tool_choice_streams(client):
    kw = dict(max_tokens=64, temperature=1.0, seed=5, tools=[WEATHER, TIME],
              tool_choice={"type": "function", "function": {"name": "get_time"}})
    whole = chat(client, **kw).choices[0].message.tool_calls[0]
    deltas, finish = [], None
    for ch in chat(client, stream=True, **kw):
        for c in ch.choices:
            deltas += c.delta.tool_calls or []
            finish = c.finish_reason or finish
    # The first delta names the call; its arguments then arrive piece by piece as they are generated.
    first, rest = deltas[0], deltas[1:]
    assert first.id.startswith("call_") and first.function.name == whole.function.name == "get_time"
    assert len(rest) > 1 and all(d.index == 0 and d.id is None and d.function.name is None for d in rest)
    args = "".join(d.function.arguments for d in deltas)
    assert finish == "tool_calls" and json.loads(args) == json.loads(whole.function.arguments)
    jsonschema.validate(json.loads(args), TIME["function"]["parameters"])


def test_tool_call_stream_parser():
    """CallStream, fed a few characters at a time, gives each call's name once and its arguments
    in pieces whose join is the arguments' JSON; strings with braces and escapes do not fool it."""
    text = ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Pa\\"ris}", "days": [1, {"a": 2}]}}; '
            '{"name": "get_time", "parameters": {}}')
    for step in (1, 4, len(text)):
        cs = tool_fmt.CallStream("llama", {"get_weather", "get_time"})
        deltas = [d for j in range(0, len(text), step) for d in cs.feed(text[j : j + step])]
        names = [d["function"]["name"] for d in deltas if "id" in d]
        args = ["".join(d["function"]["arguments"] for d in deltas if d["index"] == k) for k in (0, 1)]
        assert names == ["get_weather", "get_time"] and cs.state == "head"
        assert [json.loads(a) for a in args] == [{"city": 'Pa"ris}', "days": [1, {"a": 2}]}, {}]
    hermes = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'
    cs = tool_fmt.CallStream("hermes", {"get_weather"})
    deltas = [d for ch in hermes for d in cs.feed(ch)]
    assert "".join(d["function"]["arguments"] for d in deltas) == '{"city": "Rome"}' and cs.state == "head"
    unknown = tool_fmt.CallStream("llama", {"get_weather"})
    assert unknown.feed('{"name": "rm_rf", "parameters": {}}') == [] and not unknown.started


def test_reply_stream_decides_content_or_calls():
    """ReplyStream with tool_choice auto: text that cannot begin a call goes out as content with its
    logprobs, once it can tell; a call goes out as tool_calls deltas; a call CallStream cannot follow
    is parsed whole at the end; with tools off text passes straight through."""
    names = {"get_weather"}
    plain = tool_fmt.ReplyStream("llama", names, forced=False)
    assert plain.feed(" ", "lp0") == []  # too short to tell
    assert plain.feed("Sunny.", "lp1") == [({"content": " Sunny."}, "lp1")]
    assert plain.feed("!", "lp2") == [({"content": "!"}, "lp2")] and plain.finish("stop") == ([], "stop")
    call = tool_fmt.ReplyStream("llama", names, forced=False)
    sent = [d for ch in '{"name": "get_weather", "parameters": {"city": "Rome"}}' for d in call.feed(ch, "lp")]
    assert all(lp is None and list(d) == ["tool_calls"] for d, lp in sent)
    assert "".join(d["tool_calls"][0]["function"]["arguments"] for d, _ in sent) == '{"city": "Rome"}'
    assert call.finish("stop") == ([], "tool_calls")
    odd = tool_fmt.ReplyStream("llama", names, forced=False)  # arguments before the name
    assert odd.feed('{"parameters": {"city": "Rome"}, "name": "get_weather"}') == []
    deltas, finish = odd.finish("stop")
    assert finish == "tool_calls" and [d["tool_calls"][0]["function"]["name"] for d in deltas] == ["get_weather"]
    off = tool_fmt.ReplyStream("llama", None, forced=False)
    assert off.feed("", "lp") == [({"content": ""}, "lp")] and off.feed("") == []
    assert off.finish("length") == ([], "length")


def test_tools_in_the_prompt(llama3_tokenizer_dir):
    """Llama 3's template has no tool support: tools go into the system message, a past call is
    written as the model writes calls, and the tool's result keeps its role."""
    tok = load_tokenizer(llama3_tokenizer_dir)
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages = [{"role": "user", "content": "Weather?"}, {"role": "assistant", "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "21 C"}]
    msgs, native = tool_fmt.prepare(messages, [WEATHER], tok.chat_template)
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tools=native)
    assert native is None and text.index('"name": "get_weather"') < text.index("Weather?")
    assert '{"name": "get_weather", "parameters": {"city": "Paris"}}' in text
    assert "<|start_header_id|>tool<|end_header_id|>\n\n21 C<|eot_id|>" in text
    # and calls are read back in both formats, unknown names and bad JSON refused
    names = {"get_weather"}
    _, calls = tool_fmt.parse_calls('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Rome"}}', "llama",
                                    names)
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Rome"}
    content, calls = tool_fmt.parse_calls('Sure.<tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call>',
                                          "hermes", names)
    assert content == "Sure." and calls[0]["function"]["arguments"] == "{}"
    assert tool_fmt.parse_calls('{"name": "rm_rf", "parameters": {}}', "llama", names) is None
    assert tool_fmt.parse_calls('{"name": "get_weather", "parameters": ', "llama", names) is None
    assert tool_fmt.parse_calls("It is sunny.", "llama", names) is None


# ---- the engine under the API -------------------------------------------------------------------


def trace(r) -> list[tuple[str, float]]:
    return [(e.token, e.logprob) for e in r.choices[0].logprobs.content]


def stream_trace(stream) -> list[tuple[str, float]]:
    return [(e.token, e.logprob) for ch in stream for c in ch.choices if c.logprobs for e in c.logprobs.content]


def test_batching_is_exact(client):
    """8 concurrent streaming requests, greedy and seeded sampling, each get exactly the tokens
    (and log-probabilities, bit for bit) they get alone."""
    kws = [dict(messages=[{"role": "user", "content": f"Tell me about the number {i}." + " Please." * i}],
                max_tokens=12 + i, temperature=0.0 if i % 2 else 0.9, seed=i, logprobs=True) for i in range(8)]
    alone = [trace(chat(client, **kw)) for kw in kws]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda kw: stream_trace(chat(client, stream=True, **kw)), kws))
    assert together == alone
    assert all(len(t) == 12 + i for i, t in enumerate(together))


def test_prefix_cache(url, client):
    """Requests sharing a system prompt reuse its cache (the metrics say so) and answer as without."""
    system = {"role": "system", "content": "You are ouvert, a careful and concise assistant. " * 6}
    kws = [dict(messages=[system, {"role": "user", "content": q}], max_tokens=8, temperature=0, logprobs=True)
           for q in ("Hi!", "What is 2+2?", "Name a colour.", "Why is the sky blue?")]
    before = metrics(url)
    first = chat(client, **kws[0])  # may itself hit what an earlier test left, but not this system prompt
    rest = [chat(client, **kw) for kw in kws[1:]]
    after = metrics(url)
    assert after["ouvert_prefix_cache_hits_total"] - before["ouvert_prefix_cache_hits_total"] >= 3
    assert all(r.usage.prompt_tokens_details.cached_tokens >= 48 for r in rest)
    # the same answers from a cache that holds nothing of them: a fresh prompt order on a cold server
    assert first.usage.prompt_tokens_details.cached_tokens < 16
    with ThreadPoolExecutor(4) as pool:
        again = list(pool.map(lambda kw: trace(chat(client, **kw)), kws))
    assert again == [trace(r) for r in [first, *rest]]


def test_disconnect_frees_the_slot(url):
    before = metrics(url)
    body = {"model": "tiny-chat", "messages": USER, "max_tokens": 4000, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()  # kept referenced: a closed iterator closes the connection
        for _ in range(6):
            next(lines)
        assert metrics(url)["ouvert_batch_size"] == 1
    assert_one_cancelled(url, before, within=20, tokens_below=4000)


def assert_one_cancelled(url: str, before: dict, within: float, tokens_below: int) -> None:
    """Within `within` seconds no request runs any more; since the metrics `before`, exactly one
    request finished as cancelled and fewer than `tokens_below` tokens were generated."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        m = metrics(url)
        if m["ouvert_batch_size"] == 0:
            break
        time.sleep(0.1)
    assert m["ouvert_batch_size"] == 0
    key = 'ouvert_requests_finished_total{reason="cancelled"}'
    assert m.get(key, 0) == before.get(key, 0) + 1
    assert m["ouvert_generation_tokens_total"] - before["ouvert_generation_tokens_total"] < tokens_below


# ---- errors ---------------------------------------------------------------------------------------


def test_overload_gives_429(model_dir):
    with start(model_dir, "--max-batch", "1", "--max-queue", "1") as u:
        body = {"model": "tiny-chat", "messages": USER, "max_tokens": 4000, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", u + "/v1/chat/completions", json=body, timeout=60) as running, \
                httpx.stream("POST", u + "/v1/chat/completions", json=body, timeout=60) as waiting:
            assert running.status_code == waiting.status_code == 200
            deadline = time.monotonic() + 20
            while metrics(u)["ouvert_queue_depth"] < 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            c = openai.OpenAI(base_url=u + "/v1", api_key="x", max_retries=0)
            with pytest.raises(openai.RateLimitError) as e:
                chat(c, max_tokens=4)
            assert e.value.status_code == 429 and e.value.response.headers["retry-after"] == "1"
            assert e.value.body["code"] == "queue_full"
            assert metrics(u)["ouvert_requests_rejected_total"] == 1


def test_too_long_prompt(client):
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, [{"role": "user", "content": "word " * 5000}], max_tokens=4)
    assert e.value.body["code"] == "context_length_exceeded" and e.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, max_tokens=5000)
    assert e.value.body["code"] == "context_length_exceeded" and e.value.body["param"] == "max_tokens"


@pytest.mark.parametrize("body, status, param, code", [
    ({"model": "gpt-4o", "messages": USER}, 404, "model", "model_not_found"),
    ({"model": "tiny-chat", "messages": USER, "max_tokens": "many"}, 400, "max_tokens", "invalid_value"),
    ({"model": "tiny-chat", "messages": USER, "temperature": 3}, 400, "temperature", "invalid_value"),
    ({"model": "tiny-chat", "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role",
     "invalid_value"),
    ({"model": "tiny-chat"}, 400, "messages", "invalid_value"),
    ({"model": "tiny-chat", "messages": USER, "tool_choice": "required"}, 400, "tool_choice", "invalid_value"),
    ({"model": "tiny-chat", "messages": USER, "tools": [WEATHER],
      "tool_choice": {"type": "function", "function": {"name": "nope"}}}, 400, "tool_choice", "invalid_value"),
    ({"model": "tiny-chat", "messages": USER, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "no-such-type"}}}}, 400, "response_format.json_schema.schema",
     "invalid_value"),
    ({"model": "tiny-chat", "messages": USER, "logit_bias": {"999999999": 5}}, 400, "logit_bias", "invalid_value"),
    ({"model": "tiny-chat", "messages": USER, "seed": 2**64}, 400, "seed", "invalid_value"),
    ({"model": "tiny-chat", "messages": USER, "seed": -1}, 400, "seed", "invalid_value"),
    ({"model": "tiny-chat", "messages": USER, "stop": "x" * 501}, 400, "stop", "invalid_value"),
    ({"model": "tiny-chat", "messages": USER, "stop": ["ok", "x" * 501]}, 400, "stop", "invalid_value"),
])
def test_bad_requests_answer_in_openai_shape(url, body, status, param, code):
    r = httpx.post(url + "/v1/chat/completions", json=body)
    assert r.status_code == status
    err = r.json()["error"]
    assert (err["param"], err["code"]) == (param, code) and err["message"] and err["type"]


def test_bad_json_and_body_limit(url):
    r = httpx.post(url + "/v1/chat/completions", content=b'{"model": "tiny-chat", "messages": [',
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(url + "/v1/completions", json={"model": "tiny-chat", "prompt": "x" * 70000})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = httpx.get(url + "/v1/nowhere")
    assert r.status_code == 404 and "error" in r.json()
    assert "Traceback" not in r.text


def test_api_key(model_dir):
    with start(model_dir, "--max-batch", "2", "--api-key", "s3cret") as u:
        with pytest.raises(openai.AuthenticationError) as e:
            chat(openai.OpenAI(base_url=u + "/v1", api_key="wrong", max_retries=0), max_tokens=2)
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
        assert httpx.get(u + "/v1/models").status_code == 401
        assert httpx.get(u + "/metrics").status_code == 401
        assert httpx.get(u + "/health").status_code == 200
        ok = chat(openai.OpenAI(base_url=u + "/v1", api_key="s3cret", max_retries=0), max_tokens=2)
        assert ok.usage.completion_tokens == 2


def test_metrics(url, client):
    chat(client, max_tokens=3)
    text = httpx.get(url + "/metrics").text
    for name in ("ouvert_http_requests_total", "ouvert_prompt_tokens_total", "ouvert_generation_tokens_total",
                 "ouvert_queue_depth", "ouvert_batch_size", "ouvert_time_to_first_token_seconds_bucket",
                 "ouvert_tokens_per_second", "ouvert_prefix_cache_hits_total"):
        assert f"# TYPE {name.removesuffix('_bucket')} " in text and re.search(rf"^{name}[{{ ]", text, re.M)
    m = metrics(url)
    assert m['ouvert_time_to_first_token_seconds_bucket{le="+Inf"}'] == m["ouvert_time_to_first_token_seconds_count"]
    assert m['ouvert_http_requests_total{route="/v1/chat/completions",code="200"}'] >= 1


def test_engine_thread_survives_concurrent_load(client):
    """Many short requests at once, more than the slots: none fails below the queue limit."""
    errors = []

    def one(i):
        try:
            return chat(client, max_tokens=4, temperature=1.0, seed=i).usage.completion_tokens
        except Exception as e:  # noqa: BLE001 - collected and asserted on below
            errors.append(e)

    with ThreadPoolExecutor(20) as pool:
        counts = list(pool.map(one, range(20)))
    assert not errors and counts == [4] * 20
    assert threading.active_count() < 100


def test_a_failing_request_answers_500_without_a_trace(model_dir, capfd):
    """A request that fails inside the engine gets a plain 500 in the OpenAI shape (the trace goes to
    the server's log, not to the client) and fails alone: the batch and the server go on."""
    args = build_parser().parse_args(["serve", "--model", str(model_dir), "--chunk", "16", "--max-batch", "4"])
    app, engine = build_app(args)
    real = engine._next

    def fragile(seq, logits):
        if seq.req.max_tokens == 7:
            raise RuntimeError("boom: a bug in sampling")
        real(seq, logits)

    engine._next = fragile
    with BackgroundServer(app) as u:
        c = openai.OpenAI(base_url=u + "/v1", api_key="x", max_retries=0)
        with ThreadPoolExecutor(2) as pool:
            bad = pool.submit(lambda: chat(c, max_tokens=7))
            good = pool.submit(lambda: chat(c, max_tokens=12))
            with pytest.raises(openai.InternalServerError) as e:
                bad.result()
            assert good.result().usage.completion_tokens == 12
        assert e.value.status_code == 500 and e.value.body["type"] == "server_error"
        assert "boom" not in e.value.response.text and "Traceback" not in e.value.response.text
        assert chat(c, max_tokens=3).usage.completion_tokens == 3
    assert "boom: a bug in sampling" in capfd.readouterr().err


# ---- hostile clients ------------------------------------------------------------------------------


def test_hostile_stop_strings_do_not_stall_streams(strict_url):
    """A megabyte stop string is refused (it once froze every stream for 20 s: each token tested each
    of its prefixes), and four of the longest allowed are served while a stream goes on at its pace.
    The bound on the stream's longest wait is generous: the machine may be busy with other tests."""
    ticker = Ticker(strict_url)
    body = {"model": "tiny-chat", "messages": USER, "max_tokens": 1, "stop": ["a" * 1_000_000]}
    r = httpx.post(strict_url + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop"
    longest = ["x" * 499 + c for c in "abcd"]
    body = {"model": "tiny-chat", "messages": USER, "max_tokens": 40, "stop": longest, "ignore_eos": True}
    r = httpx.post(strict_url + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 40
    assert ticker.largest_gap() < 2.0


def test_huge_prompt_is_refused_before_tokenizing(strict_url):
    """4 MB of text cannot fit in 4096 tokens: refused at once, without seconds of tokenizing on the
    event loop that stalled /health and the running streams."""
    ticker = Ticker(strict_url)
    waits, done = [], threading.Event()

    def poll():
        with httpx.Client(timeout=60) as http:
            while not done.is_set():
                t = time.monotonic()
                assert http.get(strict_url + "/health").status_code == 200
                waits.append(time.monotonic() - t)
                time.sleep(0.02)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    for path, body, param in [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 800_000}]}, "messages"),
        ("/v1/completions", {"prompt": "word " * 800_000}, "prompt"),
    ]:
        r = httpx.post(strict_url + path, json={"model": "tiny-chat", "max_tokens": 4, **body}, timeout=120)
        assert r.status_code == 400
        assert (r.json()["error"]["param"], r.json()["error"]["code"]) == (param, "context_length_exceeded")
    time.sleep(0.2)
    done.set()
    poller.join()
    assert max(waits) < 1.0 and ticker.largest_gap() < 2.0


def test_prompts_are_tokenized_off_the_event_loop(model_dir):
    """The chat template and the tokenizer run in worker threads, never in the event loop's."""
    args = build_parser().parse_args(["serve", "--model", str(model_dir), "--chunk", "16", "--max-batch", "2"])
    app, engine = build_app(args)
    tok, threads = engine.tokenizer, []

    def spy(real):
        def called(*a, **kw):
            threads.append(threading.current_thread())
            return real(*a, **kw)
        return called

    for name in ("encode", "encode_batch", "apply_chat_template"):
        setattr(tok, name, spy(getattr(tok, name)))
    server = BackgroundServer(app)
    with server as u:
        c = openai.OpenAI(base_url=u + "/v1", api_key="x", max_retries=0)
        assert chat(c, max_tokens=1).usage.completion_tokens == 1
        assert len(c.completions.create(model="tiny-chat", prompt=["Once", "upon"], max_tokens=1).choices) == 2
    assert len(threads) >= 3 and server.thread not in threads


def test_dropped_request_frees_its_slot(url):
    """A non-streaming request whose client leaves is cancelled while it is generating (the server
    once looked only after half a second without output, which a busy server never has)."""
    before = metrics(url)
    body = {"model": "tiny-chat", "messages": USER, "max_tokens": 4000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/chat/completions", json=body, timeout=httpx.Timeout(30, read=1.5))
    assert_one_cancelled(url, before, within=10, tokens_below=3000)


def test_a_request_larger_than_the_queue_is_a_400(strict_url):
    """More completions (prompts x n) than the queue holds can never be served: 400, not 429 "retry
    shortly", and the queue is left alone; up to the queue's size they are served."""
    c = openai.OpenAI(base_url=strict_url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="tiny-chat", prompt=["a", "b", "c"], n=2, max_tokens=1)
    assert e.value.body["param"] == "n" and "at most 4" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        chat(c, n=5, max_tokens=1)
    assert len(chat(c, n=4, max_tokens=1).choices) == 4
    assert metrics(strict_url)["ouvert_requests_rejected_total"] == 0


def test_tiny_temperature_is_greedy(client):
    """temperature 1e-39 overflowed the logits to inf (a 500); below 1e-5 it is greedy."""
    greedy = chat(client, max_tokens=6, temperature=0).choices[0].message.content
    assert chat(client, max_tokens=6, temperature=1e-39).choices[0].message.content == greedy


def test_logprob_bytes_are_the_tokens_own(client, llama3_tokenizer_dir):
    """A token that holds part of a UTF-8 character reports its own bytes, not those of U+FFFD."""
    tok = load_tokenizer(llama3_tokenizer_dir)
    half = tok.token_to_id("ðŁ")  # bytes F0 9F: the first half of an emoji, in GPT-2's byte alphabet
    assert tok.decode([half]) == "\ufffd" and tok.token_bytes(half) == b"\xf0\x9f"
    text = "Bonjour, ça va ? 🙂🦜 <|eot_id|>"
    assert b"".join(tok.token_bytes(t) for t in tok.encode(text, add_special_tokens=False)) == text.encode()
    r = chat(client, max_tokens=1, temperature=0, logprobs=True, top_logprobs=2, logit_bias={str(half): 100})
    assert r.choices[0].logprobs.content[0].bytes == [0xF0, 0x9F]


def test_a_partial_body_is_cut_off(strict_url):
    """A client that announces more body than it sends gets a 408 and a closed connection after the
    body timeout (1 s here), and the server serves others meanwhile."""
    host, port = strict_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n{\"model\": \"tiny-chat\"")
        assert httpx.get(strict_url + "/health").status_code == 200
        reply = b""
        while data := s.recv(4096):  # until the server closes the connection (a timeout raises)
            reply += data
    assert reply.startswith(b"HTTP/1.1 408") and b"request_timeout" in reply


def test_the_largest_seed_with_n(client):
    """Seeds run to 2**63 - 1 (torch's signed 64 bits); the next choices' seeds, seed + i, wrap around."""
    assert len(chat(client, max_tokens=2, seed=2**63 - 1, n=2).choices) == 2


def test_serve_a_gguf_file(model_dir, tmp_path, client):
    """`ouvert serve --model FILE.gguf` loads as generate and chat do: the tokenizer from the file."""
    from ouvert.checkpoint.io import export_gguf

    path = export_gguf(model_dir, tmp_path / "tiny-chat.gguf", "f32")
    with start(path, "--max-batch", "2", "--served-model-name", "tiny-chat") as u:
        c = openai.OpenAI(base_url=u + "/v1", api_key="x", max_retries=0)
        r = chat(c, max_tokens=8, temperature=0)
    assert r.usage.completion_tokens == 8
    assert r.choices[0].message.content == chat(client, max_tokens=8, temperature=0).choices[0].message.content


def test_the_serve_command_runs_its_engine_on_the_main_thread_and_stops_on_sigterm(model_dir):
    """`ouvert serve` itself, as a process: HTTP from a thread, the engine stepping on the main thread
    (torch's OpenMP workers belong to it); a completion, then SIGTERM ends it cleanly; a second server
    on the same port says it could not start and exits 1."""
    import signal
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "ouvert", "serve", "--model", str(model_dir), "--port", str(port), "--max-batch", "2",
           "--max-len", "256"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "the server did not answer"
                time.sleep(0.2)
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-")
        reply = c.chat.completions.create(model="tiny-chat", messages=USER, max_tokens=5, temperature=0,
                                          extra_body={"ignore_eos": True})
        assert reply.usage.completion_tokens == 5
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert second.returncode == 1 and "did not start" in second.stderr
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
