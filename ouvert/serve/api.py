"""The OpenAI-compatible HTTP API over one Engine: the app, its routes, and the helpers that turn a
request body into the engine's Requests and its Outputs into OpenAI's responses.

Routes: GET /v1/models, POST /v1/chat/completions, POST /v1/completions (streaming as server-sent
events ending with `data: [DONE]`, or not), GET /health, GET /metrics (Prometheus text), and the
chat page at /. Every error is in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`,
with a 4xx status and the field at fault in `param`; an unexpected failure answers 500 with a plain
message, never a stack trace. An optional bearer key guards /v1 and /metrics (compared in
constant time), request bodies over a size limit get 413, and a body that does not arrive in full
within a time limit gets 408 and a closed connection (a client cannot hold one open by sending half).

The bodies are schemas.py's; the engine judges what they ask of the model (the context length,
token ids) and its refusals are answered here in the body's own field names. Log-probabilities are
the model's own (log-softmax of the raw logits), before penalties, temperature or a grammar change
them. Tool calls (tools.py) stream as one delta each, when complete.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request as HTTPRequest

from ouvert.generate.sampling import SamplingParams
from ouvert.serve import tools as tool_fmt
from ouvert.serve.engine import (
    SEED_MAX,
    ContextTooLong,
    Engine,
    Handle,
    InvalidRequest,
    Output,
    QueueFull,
    Request,
)
from ouvert.serve.grammar import Grammar, GrammarCompiler, GrammarError
from ouvert.serve.schemas import ChatCompletionRequest, CompletionRequest, SamplingFields

STATIC = Path(__file__).resolve().parent / "static"
# A prompt of more characters than this per token of context cannot fit, whatever the tokenizer:
# refused before the tokenizer spends seconds on it.
MAX_CHARS_PER_TOKEN = 64
MAX_PROMPTS = 16  # prompts in one text completion request


# ---- errors -----------------------------------------------------------------------------------


class APIError(Exception):
    """A request answered with an error in OpenAI's shape: HTTP status, message, the field at fault."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(status: int, message: str, type: str, param=None, code=None, headers=None) -> JSONResponse:
    return JSONResponse(error_body(message, type, param, code), status_code=status, headers=headers)


def _param(loc: tuple) -> str | None:
    """("body", "messages", 0, "role") -> "messages[0].role"."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


async def _api_error(request: HTTPRequest, e: APIError) -> JSONResponse:
    return error_response(e.status, e.message, e.type, e.param, e.code, e.headers)


async def _invalid_body(request: HTTPRequest, e: RequestValidationError) -> JSONResponse:
    err = e.errors()[0]
    if err.get("type") == "json_invalid":
        return error_response(400, f"The body is not valid JSON: {err.get('msg')}", "invalid_request_error",
                              code="invalid_json")
    param = _param(tuple(err.get("loc", ())))
    return error_response(400, f"{param}: {err.get('msg')}" if param else str(err.get("msg")),
                          "invalid_request_error", param, "invalid_value")


async def _http_error(request: HTTPRequest, e: StarletteHTTPException) -> JSONResponse:
    return error_response(e.status_code, str(e.detail), "invalid_request_error")


async def _crash(request: HTTPRequest, e: Exception) -> JSONResponse:
    return error_response(500, "The server had an error while processing the request.", "server_error")


def refusal(e: InvalidRequest, names: dict[str, str]) -> APIError:
    """The engine's refusal as a 400, in the body's words: `names` maps the engine's Request fields
    to the body's ("prompt" is "messages" in a chat)."""
    rename = lambda f: names.get(f, f)
    if isinstance(e, ContextTooLong):
        return APIError(400, e.explain(rename("prompt"), rename("max_tokens")), rename(e.param),
                        "context_length_exceeded")
    return APIError(400, str(e), rename(e.param), "invalid_value")


class Guard:
    """ASGI middleware: bearer key on /v1 and /metrics, request-body size and time limits, and HTTP counts."""

    def __init__(self, app, api_key: str | None, max_body: int, counts: dict, body_timeout: float = 30.0):
        self.app, self.api_key, self.max_body, self.counts = app, api_key, max_body, counts
        self.body_timeout = body_timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        status = {}

        async def counted_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        async def reply(response):
            await response(scope, receive, counted_send)

        try:
            if self.api_key and (path.startswith("/v1") or path == "/metrics"):
                auth = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
                scheme, _, token = auth.partition(" ")
                if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
                    return await reply(error_response(
                        401, "Incorrect or missing API key; send 'Authorization: Bearer KEY'.",
                        "invalid_request_error", code="invalid_api_key"))
            if scope["method"] in ("POST", "PUT", "PATCH"):
                length = dict(scope["headers"]).get(b"content-length")
                if length is not None and int(length) > self.max_body:
                    return await reply(self._too_large())
                parts, size, more = [], 0, True  # joined once: += on bytes is quadratic in the parts
                deadline = asyncio.get_running_loop().time() + self.body_timeout
                while more:
                    try:
                        message = await asyncio.wait_for(receive(), deadline - asyncio.get_running_loop().time())
                    except TimeoutError:
                        return await reply(error_response(
                            408, f"The request body did not arrive within {self.body_timeout:g} s.",
                            "invalid_request_error", code="request_timeout", headers={"Connection": "close"}))
                    if message["type"] == "http.disconnect":
                        return
                    parts.append(message.get("body", b""))
                    size += len(parts[-1])
                    more = message.get("more_body", False)
                    if size > self.max_body:
                        return await reply(self._too_large())
                body, sent = b"".join(parts), False

                async def replay():
                    nonlocal sent
                    if not sent:
                        sent = True
                        return {"type": "http.request", "body": body, "more_body": False}
                    return await receive()

                return await self.app(scope, replay, counted_send)
            return await self.app(scope, receive, counted_send)
        finally:
            if "code" in status:
                key = (path if path in ("/v1/chat/completions", "/v1/completions", "/v1/models") else "other",
                       status["code"])
                self.counts[key] = self.counts.get(key, 0) + 1

    def _too_large(self) -> JSONResponse:
        return error_response(413, f"Request body exceeds {self.max_body} bytes.", "invalid_request_error",
                              code="request_too_large")


# ---- the app ----------------------------------------------------------------------------------


@dataclass
class AppState:
    """What the routes share: the engine, the name it is served under, its grammar compiler, and the
    HTTP counts the Guard keeps for /metrics."""

    engine: Engine
    model_name: str
    grammars: GrammarCompiler
    http_counts: dict[tuple[str, int], int] = field(default_factory=dict)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def tok(self):
        return self.engine.tokenizer

    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "ouvert",
                "context_length": self.engine.context_length}

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"The model '{name}' does not exist; this server serves '{self.model_name}'.",
                           "model", "model_not_found")


def create_app(engine: Engine, model_name: str, api_key: str | None = None, max_body: int = 4 << 20,
               body_timeout: float = 30.0, start_engine: bool = True) -> FastAPI:
    """The FastAPI app serving `engine` under `model_name`; starts and stops the engine's thread
    (start_engine=False: the caller runs the engine, as `ouvert serve` does on its main thread).
    body_timeout: seconds a request's body may take to arrive in full."""
    state = AppState(engine, model_name, GrammarCompiler(engine.tokenizer, engine.vocab_size, engine.stop_token_ids))

    @asynccontextmanager
    async def lifespan(app):
        if start_engine:
            engine.start()
        try:
            yield
        finally:
            if start_engine:
                engine.stop()

    app = FastAPI(title="ouvert", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Guard, api_key=api_key, max_body=max_body, counts=state.http_counts,
                       body_timeout=body_timeout)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _invalid_body)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _crash)

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/health")
    async def health():
        return {"status": "ok", "running": engine.running, "waiting": engine.queue_depth}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [state.model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        state.check_model(name)
        return state.model_card()

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(render_metrics(engine, state.http_counts), media_type="text/plain; version=0.0.4")

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: HTTPRequest):
        return await chat_completion(state, body, request)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: HTTPRequest):
        return await text_completion(state, body, request)

    return app


# ---- requests -> engine -----------------------------------------------------------------------


def check_chars(context_length: int, n: int, param: str) -> None:
    """Refuse a prompt that cannot fit in the context before tokenizing it (seconds for megabytes)."""
    if n > context_length * MAX_CHARS_PER_TOKEN:
        raise APIError(400, f"This model's maximum context length is {context_length} tokens; {n} characters "
                            f"in the {param} are more than {context_length} tokens can hold.", param,
                       "context_length_exceeded")


def engine_requests(body: SamplingFields, prompt: list[int], max_tokens: int, n: int, **extra) -> list[Request]:
    """The body's n completions of one prompt as the engine's Requests (extra: Request fields of one
    route). With a seed they take seed, seed + 1, ...: the n differ, and each repeats."""
    bias = None
    if body.logit_bias:
        try:
            bias = {int(k): v for k, v in body.logit_bias.items()}
        except ValueError:
            raise APIError(400, "logit_bias keys must be token ids", "logit_bias", "invalid_value") from None
    seeds = [None if body.seed is None else (body.seed + i) % (SEED_MAX + 1) for i in range(n)]
    return [Request(prompt, max_tokens, SamplingParams(
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p, top_k=body.top_k or 0, min_p=body.min_p or 0.0,
        presence_penalty=body.presence_penalty or 0.0, frequency_penalty=body.frequency_penalty or 0.0,
        seed=seed, stop=body.stops,
    ), logit_bias=bias, ignore_eos=bool(body.ignore_eos), **extra) for seed in seeds]


def submit(engine: Engine, requests: list[Request], names: dict[str, str] | None = None,
           ) -> tuple[list[Handle], asyncio.Queue]:
    """Queue all the body's completions at once, or none of them. Outputs arrive on the queue as
    (index in requests, Output); the engine's refusals answer in the body's field names (`refusal`)."""
    loop, queue = asyncio.get_running_loop(), asyncio.Queue()
    callbacks = [lambda out, i=i: loop.call_soon_threadsafe(queue.put_nowait, (i, out))
                 for i in range(len(requests))]
    try:
        handles = engine.submit_many(requests, callbacks)
    except QueueFull as e:
        raise APIError(429, f"The server is busy ({e}); retry shortly.", None, "queue_full",
                       type="rate_limit_error", headers={"Retry-After": "1"}) from None
    except InvalidRequest as e:
        raise refusal(e, names or {}) from None
    return handles, queue


async def collect(handles: list[Handle], queue: asyncio.Queue, request: HTTPRequest) -> list[list[Output]]:
    """Wait for every request to finish; cancel them all if the client goes away."""
    outs: list[list[Output]] = [[] for _ in handles]
    left = len(handles)
    try:
        while left:
            try:
                i, out = await asyncio.wait_for(queue.get(), timeout=0.5)
                outs[i].append(out)
                left -= out.finish_reason is not None
            except TimeoutError:
                pass
            # at every output too: a busy server may never leave half a second without one
            if left and await request.is_disconnected():
                raise APIError(499, "The client closed the request.") from None
    finally:
        if left:
            for h in handles:
                h.cancel()
    for o in outs:
        if o[-1].finish_reason == "error":
            raise APIError(500, "The server had an error while generating.", type="server_error")
    return outs


def usage(finals: list[Output], prompt_tokens: int | None = None) -> dict:
    """Usage from each completion's last Output; prompt_tokens: the prompts' total where there are several."""
    prompt = finals[0].prompt_tokens if prompt_tokens is None else prompt_tokens
    completion = sum(o.completion_tokens for o in finals)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": finals[0].cached_tokens}}


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def stream_response(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def generation_error() -> str:
    return sse(error_body("The server had an error while generating.", "server_error"))


# ---- chat -------------------------------------------------------------------------------------


def chat_prompt(tok, body: ChatCompletionRequest) -> list[int]:
    """The messages (and tools) through the chat template, as token ids."""
    messages = []
    for m in body.messages:
        d = m.model_dump(exclude_none=True)
        if isinstance(m.content, list):
            d["content"] = "".join(p.text for p in m.content)
        messages.append(d)
    tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
    messages, native_tools = tool_fmt.prepare(messages, tools, tok.chat_template)
    try:
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tools=native_tools)
    except (jinja2.TemplateError, TypeError, ValueError) as e:
        raise APIError(400, f"the chat template cannot render these messages: {e}", "messages",
                       "invalid_value") from None
    return tok.encode_batch([text], add_special_tokens=False)[0]  # as tokenize=True, but frees the GIL


async def chat_grammar(grammars: GrammarCompiler, body: ChatCompletionRequest, fmt: str) -> Grammar | None:
    """The grammar that constrains this request (a forced tool call or a response_format), or None."""
    choice = body.tool_choice
    if body.tools and choice not in (None, "auto", "none"):
        if choice == "required":
            chosen, param = [t.model_dump() for t in body.tools], "tools"
        else:
            chosen = [t.model_dump() for t in body.tools if t.function.name == choice.function.name]
            param = "tool_choice"
            if not chosen:
                raise APIError(400, f"tool_choice names '{choice.function.name}', which is not in tools",
                               param, "invalid_value")
        lark = tool_fmt.forced_call_lark(chosen, fmt)
        return await compile_grammar(lambda: grammars.lark(lark), param)
    if body.tool_choice not in (None, "none") and not body.tools:
        raise APIError(400, "tool_choice needs tools", "tool_choice", "invalid_value")
    rf = body.response_format
    if rf is None or rf.type == "text":
        return None
    if rf.type == "json_object":
        return await compile_grammar(lambda: grammars.json_schema({"type": "object"}), "response_format")
    if rf.json_schema is None:
        raise APIError(400, "response_format.json_schema is required for type json_schema",
                       "response_format.json_schema", "invalid_value")
    schema = rf.json_schema.schema_
    return await compile_grammar(lambda: grammars.json_schema(schema), "response_format.json_schema.schema")


async def compile_grammar(build: Callable[[], Grammar], param: str) -> Grammar:
    try:
        return await asyncio.to_thread(build)
    except (GrammarError, ValueError) as e:
        raise APIError(400, f"cannot compile this schema for constrained decoding: {e}", param,
                       "invalid_value") from None


async def chat_completion(state: AppState, body: ChatCompletionRequest, request: HTTPRequest):
    """POST /v1/chat/completions: the chat response, or its stream."""
    state.check_model(body.model)
    engine, tok = state.engine, state.tok
    fmt = tool_fmt.output_format(tok.chat_template)
    check_chars(engine.context_length, body.chars, "messages")
    prompt = await asyncio.to_thread(chat_prompt, tok, body)  # off the event loop: other requests go on
    asked = body.max_completion_tokens or body.max_tokens
    # unasked, the budget is what the context leaves (at least 1: a prompt that fills it is refused)
    max_tokens = max(engine.context_length - len(prompt), 1) if asked is None else asked
    grammar = await chat_grammar(state.grammars, body, fmt)
    n = body.n or 1
    top = (body.top_logprobs or 0) if body.logprobs else None
    reqs = engine_requests(body, prompt, max_tokens, n, logprobs=top, grammar=grammar)
    tools_on = bool(body.tools) and body.tool_choice != "none"
    names = {t.function.name for t in body.tools or []} if tools_on else None
    forced = tools_on and body.tool_choice not in (None, "auto")
    rid, created = "chatcmpl-" + secrets.token_hex(12), int(time.time())
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    handles, queue = submit(engine, reqs, {"prompt": "messages", "max_tokens": param})

    if body.stream:
        streams = [tool_fmt.ReplyStream(fmt, names, forced) for _ in range(n)]
        return stream_response(chat_events(state, rid, created, streams, handles, queue, body.include_usage))
    outs = await collect(handles, queue, request)
    choices = []
    for i, o in enumerate(outs):
        msg, finish = tool_fmt.assistant_message("".join(x.text for x in o), o[-1].finish_reason, fmt, names)
        lps = [e for x in o for e in (x.logprobs or [])]
        logprobs = {"content": [chat_logprob(e, tok.token_bytes) for e in lps]} if body.logprobs else None
        choices.append({"index": i, "message": msg, "finish_reason": finish, "logprobs": logprobs})
    return {"id": rid, "object": "chat.completion", "created": created, "model": state.model_name,
            "system_fingerprint": "ouvert", "choices": choices, "usage": usage([o[-1] for o in outs])}


async def chat_events(state: AppState, rid: str, created: int, streams: list[tool_fmt.ReplyStream],
                      handles: list[Handle], queue: asyncio.Queue, include_usage: bool) -> AsyncIterator[str]:
    """The chat stream: one chunk per delta of each choice (`streams`, one per choice), as outputs come."""

    def chunk(i, delta, finish=None, logprobs=None):
        return sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": state.model_name,
                    "system_fingerprint": "ouvert",
                    "choices": [{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]})

    finals: list[Output | None] = [None] * len(streams)
    try:
        for i in range(len(streams)):
            yield chunk(i, {"role": "assistant", "content": ""})
        while any(f is None for f in finals):
            i, out = await queue.get()
            lps = None
            if out.logprobs:
                lps = {"content": [chat_logprob(e, state.tok.token_bytes) for e in out.logprobs]}
            for delta, logprobs in streams[i].feed(out.text, lps):
                yield chunk(i, delta, logprobs=logprobs)
            if out.finish_reason is None:
                continue
            finals[i] = out
            if out.finish_reason == "error":
                yield generation_error()
                return
            deltas, finish = streams[i].finish(out.finish_reason)
            for delta in deltas:
                yield chunk(i, delta)
            yield chunk(i, {}, finish)
        if include_usage:
            yield sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": state.model_name,
                       "choices": [], "usage": usage(finals)})
        yield "data: [DONE]\n\n"
    finally:
        for h in handles:
            h.cancel()  # a no-op for finished requests; frees the slot of a client that left


# ---- completions ------------------------------------------------------------------------------


async def completion_prompts(tok, body: CompletionRequest, context_length: int) -> list[list[int]]:
    """The body's prompt (a text, texts, token ids, or lists of them) as token ids, one list a prompt."""
    p = body.prompt
    if isinstance(p, str) or (p and all(isinstance(x, str) for x in p)):
        texts = [p] if isinstance(p, str) else p
        check_chars(context_length, max(len(x) for x in texts), "prompt")
        prompts = await asyncio.to_thread(tok.encode_batch, texts)  # off the event loop (and the GIL)
    elif p and all(isinstance(x, int) for x in p):
        prompts = [list(p)]
    else:
        prompts = [list(x) for x in p]
    if not prompts:
        raise APIError(400, "prompt is empty", "prompt", "invalid_value")
    if len(prompts) > MAX_PROMPTS:
        raise APIError(400, f"at most {MAX_PROMPTS} prompts per request", "prompt", "invalid_value")
    return prompts


async def text_completion(state: AppState, body: CompletionRequest, request: HTTPRequest):
    """POST /v1/completions: the completion response, or its stream."""
    state.check_model(body.model)
    engine, tok = state.engine, state.tok
    if body.suffix:
        raise APIError(400, "suffix is not supported", "suffix", "unsupported_value")
    if body.best_of not in (None, 1, body.n):
        raise APIError(400, "best_of is not supported", "best_of", "unsupported_value")
    prompts = await completion_prompts(tok, body, engine.context_length)
    max_tokens = 16 if body.max_tokens is None else body.max_tokens  # OpenAI's default for completions
    n = body.n or 1
    reqs = [r for x in prompts for r in engine_requests(body, x, max_tokens, n, logprobs=body.logprobs)]
    rid, created = "cmpl-" + secrets.token_hex(12), int(time.time())
    handles, queue = submit(engine, reqs)
    # decoded once the engine has checked the ids; choice i is completion i % n of prompt i // n
    echo = [e for x in prompts for e in [tok.decode(x) if body.echo else ""] * n]
    prompt_tokens = sum(len(x) for x in prompts)

    if body.stream:
        return stream_response(completion_events(state, rid, created, echo, prompt_tokens, body, handles, queue))
    outs = await collect(handles, queue, request)
    choices = []
    for i, o in enumerate(outs):
        lps = [e for x in o for e in (x.logprobs or [])]
        choices.append({"index": i, "text": echo[i] + "".join(x.text for x in o),
                        "logprobs": completion_logprobs(lps, len(echo[i])) if body.logprobs is not None else None,
                        "finish_reason": o[-1].finish_reason})
    return {"id": rid, "object": "text_completion", "created": created, "model": state.model_name,
            "system_fingerprint": "ouvert", "choices": choices, "usage": usage([o[-1] for o in outs], prompt_tokens)}


async def completion_events(state: AppState, rid: str, created: int, echo: list[str], prompt_tokens: int,
                            body: CompletionRequest, handles: list[Handle], queue: asyncio.Queue,
                            ) -> AsyncIterator[str]:
    """The completion stream: the echoed prompts first, then each choice's text as it comes."""
    finals: list[Output | None] = [None] * len(handles)
    offsets = [len(e) for e in echo]
    try:
        for i, e in enumerate(echo):
            if e:
                yield sse(completion_chunk(rid, created, state.model_name, i, e, None, None))
        while any(f is None for f in finals):
            i, out = await queue.get()
            if out.finish_reason == "error":
                yield generation_error()
                return
            lps = None
            if body.logprobs is not None and out.logprobs:
                lps = completion_logprobs(out.logprobs, offsets[i])
            offsets[i] += len(out.text)
            if out.text or lps or out.finish_reason:
                yield sse(completion_chunk(rid, created, state.model_name, i, out.text, lps, out.finish_reason))
            if out.finish_reason is not None:
                finals[i] = out
        if body.include_usage:
            yield sse({"id": rid, "object": "text_completion", "created": created, "model": state.model_name,
                       "choices": [], "usage": usage(finals, prompt_tokens)})
        yield "data: [DONE]\n\n"
    finally:
        for h in handles:
            h.cancel()


# ---- response pieces --------------------------------------------------------------------------


def chat_logprob(e, token_bytes: Callable[[int], bytes]) -> dict:
    """A token's bytes are its own: part of a UTF-8 character where the token holds only part of one
    (its text then shows U+FFFD)."""
    return {"token": e.token, "logprob": e.logprob, "bytes": list(token_bytes(e.token_id)),
            "top_logprobs": [{"token": t, "logprob": p, "bytes": list(token_bytes(i))} for i, t, p in e.top]}


def completion_logprobs(entries, offset: int) -> dict:
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for e in entries:
        out["tokens"].append(e.token)
        out["token_logprobs"].append(e.logprob)
        out["top_logprobs"].append({t: p for _, t, p in e.top})
        out["text_offset"].append(offset)
        offset += len(e.token)
    return out


def completion_chunk(rid, created, model, index, text, logprobs, finish) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}]}


def render_metrics(engine: Engine, http_counts: dict) -> str:
    """Prometheus text exposition of the engine's counters and gauges."""
    m = engine.metrics
    lines: list[str] = []

    def metric(name: str, kind: str, help: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP {name} {help}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            lines.append(f"{name}{labels} {value}")

    metric("ouvert_http_requests_total", "counter", "HTTP requests by route and status.",
           [(f'{{route="{r}",code="{c}"}}', v) for (r, c), v in sorted(http_counts.items())])
    metric("ouvert_requests_finished_total", "counter", "Generation requests finished, by reason.",
           [(f'{{reason="{k}"}}', v) for k, v in sorted(m.finished.items())])
    metric("ouvert_requests_rejected_total", "counter", "Requests refused because the queue was full.",
           [("", m.rejected)])
    metric("ouvert_prompt_tokens_total", "counter", "Prompt tokens admitted.", [("", m.prompt_tokens)])
    metric("ouvert_generation_tokens_total", "counter", "Tokens generated.", [("", m.generation_tokens)])
    metric("ouvert_prefix_cache_hits_total", "counter", "Requests that reused a cached prompt prefix.",
           [("", m.prefix_cache_hits)])
    metric("ouvert_prefix_cache_tokens_total", "counter", "Prompt tokens taken from the prefix cache.",
           [("", m.prefix_cache_tokens)])
    metric("ouvert_queue_depth", "gauge", "Requests waiting for a slot.", [("", engine.queue_depth)])
    metric("ouvert_batch_size", "gauge", "Requests holding a slot (prefilling or decoding).", [("", engine.running)])
    metric("ouvert_slots", "gauge", "Cache slots in the pool.", [("", engine.max_batch)])
    metric("ouvert_decode_steps_total", "counter", "Decode steps run.", [("", m.decode_steps)])
    metric("ouvert_decode_rows_total", "counter", "Requests decoded, summed over decode steps.", [("", m.decode_rows)])
    metric("ouvert_decode_batch_rows_total", "counter", "Rows computed by decode steps, padding included.",
           [("", m.decode_batch_rows)])
    metric("ouvert_tokens_per_second", "gauge", "Generated tokens per second over the last 10 s.",
           [("", round(m.tokens_per_second(), 3))])
    cum, samples = 0, []
    for b, c in zip([*map(str, m.TTFT_BUCKETS), "+Inf"], m.ttft_counts):
        cum += c
        samples.append((f'_bucket{{le="{b}"}}', cum))
    samples += [("_sum", round(m.ttft_sum, 6)), ("_count", cum)]
    metric("ouvert_time_to_first_token_seconds", "histogram", "Time from submission to the first token.", samples)
    return "\n".join(lines) + "\n"
