"""The OpenAI-compatible HTTP API over one Engine: FastAPI routes and the pydantic schemas.

Routes: GET /v1/models, POST /v1/chat/completions, POST /v1/completions (streaming as server-sent
events ending with `data: [DONE]`, or not), GET /health, GET /metrics (Prometheus text), and the
chat page at /. Every error is in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`,
with a 4xx status and the field at fault in `param`; an unexpected failure answers 500 with a plain
message, never a stack trace. An optional bearer key guards /v1 and /metrics (compared in
constant time), request bodies over a size limit get 413, and a body that does not arrive in full
within a time limit gets 408 and a closed connection (a client cannot hold one open by sending half).

Extensions beyond OpenAI's fields, as other servers name them: `top_k`, `min_p`, `ignore_eos`.
Log-probabilities are the model's own (log-softmax of the raw logits), before penalties,
temperature or a grammar change them. Tool calls stream as one delta each, when complete.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import jinja2
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request as HTTPRequest

from ouvert.serve import tools as tool_fmt
from ouvert.serve.engine import SEED_MAX, Engine, Handle, Output, QueueFull, Request
from ouvert.serve.grammar import GrammarCompiler, GrammarError

STATIC = Path(__file__).resolve().parent / "static"
MAX_STOP_CHARS = 500  # per stop string: what is held back from a stream while it may begin one
# A prompt of more characters than this per token of context cannot fit, whatever the tokenizer:
# refused before the tokenizer spends seconds on it.
MAX_CHARS_PER_TOKEN = 64


# ---- errors -----------------------------------------------------------------------------------


class APIError(Exception):
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


# ---- schemas ----------------------------------------------------------------------------------


class _Schema(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class TextPart(_Schema):
    type: Literal["text"]
    text: str


class FunctionCall(_Schema):
    name: str
    arguments: str


class ToolCall(_Schema):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Schema):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class FunctionDef(_Schema):
    name: Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Schema):
    type: Literal["function"]
    function: FunctionDef


class ToolChoiceFunction(_Schema):
    name: str


class NamedToolChoice(_Schema):
    type: Literal["function"]
    function: ToolChoiceFunction


class JsonSchemaFormat(_Schema):
    name: str
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=lambda: {"type": "object"}, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Schema):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(_Schema):
    include_usage: bool = False


class _Sampling(_Schema):
    model: str
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    n: Annotated[int, Field(ge=1, le=16)] | None = None
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    seed: Annotated[int, Field(ge=0, le=SEED_MAX)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    ignore_eos: bool | None = None

    @field_validator("stop")
    @classmethod
    def _short_stops(cls, v):
        for s in [v] if isinstance(v, str) else v or []:
            if len(s) > MAX_STOP_CHARS:
                raise ValueError(f"a stop string may hold at most {MAX_STOP_CHARS} characters, got {len(s)}")
        return v


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None


# ---- the app ----------------------------------------------------------------------------------


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


def create_app(engine: Engine, model_name: str, api_key: str | None = None, max_body: int = 4 << 20,
               body_timeout: float = 30.0, start_engine: bool = True) -> FastAPI:
    """The FastAPI app serving `engine` under `model_name`; starts and stops the engine's thread
    (start_engine=False: the caller runs the engine, as `ouvert serve` does on its main thread).
    body_timeout: seconds a request's body may take to arrive in full."""
    from contextlib import asynccontextmanager

    tok = engine.tokenizer
    grammars = GrammarCompiler(tok, engine.vocab_size, engine.stop_token_ids)
    http_counts: dict[tuple[str, int], int] = {}
    created = int(time.time())

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
    app.add_middleware(Guard, api_key=api_key, max_body=max_body, counts=http_counts, body_timeout=body_timeout)

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return error_response(e.status, e.message, e.type, e.param, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        err = e.errors()[0]
        if err.get("type") == "json_invalid":
            return error_response(400, f"The body is not valid JSON: {err.get('msg')}", "invalid_request_error",
                                  code="invalid_json")
        param = _param(tuple(err.get("loc", ())))
        return error_response(400, f"{param}: {err.get('msg')}" if param else str(err.get("msg")),
                              "invalid_request_error", param, "invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e: StarletteHTTPException):
        return error_response(e.status_code, str(e.detail), "invalid_request_error")

    @app.exception_handler(Exception)
    async def _crash(request, e: Exception):
        return error_response(500, "The server had an error while processing the request.", "server_error")

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "ouvert",
                "context_length": engine.context_length}

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(404, f"The model '{name}' does not exist; this server serves '{model_name}'.",
                           "model", "model_not_found")

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/health")
    async def health():
        return {"status": "ok", "running": engine.running, "waiting": engine.queue_depth}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        check_model(name)
        return model_card()

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(render_metrics(engine, http_counts), media_type="text/plain; version=0.0.4")

    # ---- requests -> engine ----

    def sampling(body: _Sampling, prompt: list[int], max_tokens: int, stop: list[str], **extra) -> Request:
        bias = None
        if body.logit_bias:
            try:
                bias = {int(k): v for k, v in body.logit_bias.items()}
            except ValueError:
                raise APIError(400, "logit_bias keys must be token ids", "logit_bias", "invalid_value") from None
            if any(not 0 <= k < engine.vocab_size for k in bias):
                raise APIError(400, f"logit_bias: token ids must be in [0, {engine.vocab_size})", "logit_bias",
                               "invalid_value")
        return Request(
            prompt=prompt, max_tokens=max_tokens, stop=stop,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p, top_k=body.top_k or 0, min_p=body.min_p or 0.0,
            seed=body.seed, presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0, logit_bias=bias, ignore_eos=bool(body.ignore_eos),
            **extra,
        )

    def budget(prompt: list[int], asked: int | None, param: str, prompt_param: str) -> int:
        ctx = engine.context_length
        if len(prompt) >= ctx:
            raise APIError(400, f"This model's maximum context length is {ctx} tokens; the {prompt_param} take "
                                f"{len(prompt)} tokens.", prompt_param, "context_length_exceeded")
        if asked is None:
            return ctx - len(prompt)
        if len(prompt) + asked > ctx:
            raise APIError(400, f"This model's maximum context length is {ctx} tokens; you asked for "
                                f"{len(prompt) + asked} ({len(prompt)} in the {prompt_param}, {asked} in the "
                                f"completion). Lower {param} or shorten the {prompt_param}.",
                           param, "context_length_exceeded")
        return asked

    def submit_all(requests: list[Request]) -> tuple[list[Handle], asyncio.Queue]:
        """Queue all the request's completions at once, or none of them."""
        if len(requests) > engine.max_queue:  # it would never fit: no use retrying
            raise APIError(400, f"This request asks for {len(requests)} completions (prompts x n); this server "
                                f"queues at most {engine.max_queue}.", "n", "invalid_value")
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        callbacks = [lambda out, i=i: loop.call_soon_threadsafe(queue.put_nowait, (i, out))
                     for i in range(len(requests))]
        try:
            handles = engine.submit_many(requests, callbacks)
        except QueueFull as e:
            raise APIError(429, f"The server is busy ({e}); retry shortly.", None, "queue_full",
                           type="rate_limit_error", headers={"Retry-After": "1"}) from None
        except ValueError as e:
            raise APIError(400, str(e), None, "invalid_value") from None
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

    def seeds(body: _Sampling, n: int) -> list[int | None]:
        return [None if body.seed is None else (body.seed + i) % (SEED_MAX + 1) for i in range(n)]

    def check_chars(n: int, param: str) -> None:
        """Refuse a prompt that cannot fit in the context before tokenizing it (seconds for megabytes)."""
        ctx = engine.context_length
        if n > ctx * MAX_CHARS_PER_TOKEN:
            raise APIError(400, f"This model's maximum context length is {ctx} tokens; {n} characters in the "
                                f"{param} are more than {ctx} tokens can hold.", param, "context_length_exceeded")

    def usage(outs: list[list[Output]]) -> dict:
        last = [o[-1] for o in outs]
        prompt, completion = last[0].prompt_tokens, sum(o.completion_tokens for o in last)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": last[0].cached_tokens}}

    def sse(obj: Any) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    def stream_response(gen) -> StreamingResponse:
        return StreamingResponse(gen, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ---- chat ----

    async def chat_grammar(body: ChatCompletionRequest, fmt: str):
        """The grammar that constrains this request, or None."""
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

    async def compile_grammar(build, param: str):
        try:
            return await asyncio.to_thread(build)
        except (GrammarError, ValueError) as e:
            raise APIError(400, f"cannot compile this schema for constrained decoding: {e}", param,
                           "invalid_value") from None

    def chat_chars(body: ChatCompletionRequest) -> int:
        n = 0
        for m in body.messages:
            n += len(m.content) if isinstance(m.content, str) else sum(len(p.text) for p in m.content or [])
            n += sum(len(c.function.name) + len(c.function.arguments) for c in m.tool_calls or [])
        return n

    def chat_prompt(body: ChatCompletionRequest) -> list[int]:
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

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: HTTPRequest):
        check_model(body.model)
        fmt = tool_fmt.output_format(tok.chat_template)
        check_chars(chat_chars(body), "messages")
        prompt = await asyncio.to_thread(chat_prompt, body)  # off the event loop: other requests go on
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        max_tokens = budget(prompt, body.max_completion_tokens or body.max_tokens, param, "messages")
        grammar = await chat_grammar(body, fmt)
        n = body.n or 1
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        top = (body.top_logprobs or 0) if body.logprobs else None
        reqs = []
        for seed in seeds(body, n):
            r = sampling(body, prompt, max_tokens, stop, logprobs=top, grammar=grammar)
            r.seed = seed
            reqs.append(r)
        tools_on = bool(body.tools) and body.tool_choice != "none"
        names = {t.function.name for t in body.tools or []}
        forced = tools_on and body.tool_choice not in (None, "auto")
        rid, created_at = "chatcmpl-" + secrets.token_hex(12), int(time.time())
        handles, queue = submit_all(reqs)

        def message(text: str, finish: str) -> tuple[dict, str]:
            parsed = tool_fmt.parse_calls(text, fmt, names) if tools_on else None
            if parsed is None:
                return {"role": "assistant", "content": text}, finish
            content, calls = parsed
            return {"role": "assistant", "content": content or None, "tool_calls": calls}, "tool_calls"

        if not body.stream:
            outs = await collect(handles, queue, request)
            choices = []
            for i, o in enumerate(outs):
                msg, finish = message("".join(x.text for x in o), o[-1].finish_reason)
                lps = [e for x in o for e in (x.logprobs or [])]
                logprobs = {"content": [chat_logprob(e, tok.token_bytes) for e in lps]} if body.logprobs else None
                choices.append({"index": i, "message": msg, "finish_reason": finish, "logprobs": logprobs})
            return {"id": rid, "object": "chat.completion", "created": created_at, "model": model_name,
                    "system_fingerprint": "ouvert", "choices": choices, "usage": usage(outs)}

        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def events():
            def chunk(i, delta, finish=None, logprobs=None):
                return sse({"id": rid, "object": "chat.completion.chunk", "created": created_at, "model": model_name,
                            "system_fingerprint": "ouvert",
                            "choices": [{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]})

            finals: list[Output | None] = [None] * n
            held = [""] * n  # text held while it may be a tool call
            mode = ["call" if forced else ("undecided" if tools_on else "text") for _ in range(n)]
            calls = [tool_fmt.CallStream(fmt, names) for _ in range(n)]  # a call's arguments stream as written
            try:
                for i in range(n):
                    yield chunk(i, {"role": "assistant", "content": ""})
                while any(f is None for f in finals):
                    i, out = await queue.get()
                    lps = None
                    if out.logprobs:
                        lps = {"content": [chat_logprob(e, tok.token_bytes) for e in out.logprobs]}
                    if mode[i] != "text":
                        held[i] += out.text
                        new = out.text
                        if mode[i] == "undecided":
                            verdict = tool_fmt.may_be_call(held[i], fmt)
                            mode[i] = "text" if verdict is False else ("call" if verdict else "undecided")
                            new = held[i]  # all of it goes out as the call or as content
                        if mode[i] == "call":
                            for delta in calls[i].feed(new):
                                yield chunk(i, {"tool_calls": [delta]})
                        elif mode[i] == "text" and held[i]:
                            yield chunk(i, {"content": held[i]}, logprobs=lps)
                            held[i] = ""
                    elif out.text or lps:
                        yield chunk(i, {"content": out.text}, logprobs=lps)
                    if out.finish_reason is None:
                        continue
                    finals[i] = out
                    if out.finish_reason == "error":
                        yield sse(error_body("The server had an error while generating.", "server_error"))
                        return
                    finish = out.finish_reason
                    if calls[i].started:  # the calls went out as they came; a call cut short keeps "length"
                        finish = "tool_calls" if calls[i].state == "head" else finish
                    elif held[i]:
                        msg, finish = message(held[i], finish)
                        if msg.get("content"):
                            yield chunk(i, {"content": msg["content"]})
                        for k, call in enumerate(msg.get("tool_calls") or []):
                            yield chunk(i, {"tool_calls": [{"index": k, **call}]})
                    yield chunk(i, {}, finish)
                if include_usage:
                    yield sse({"id": rid, "object": "chat.completion.chunk", "created": created_at,
                               "model": model_name, "choices": [], "usage": usage([[f] for f in finals])})
                yield "data: [DONE]\n\n"
            finally:
                for h in handles:
                    h.cancel()  # a no-op for finished requests; frees the slot of a client that left

        return stream_response(events())

    # ---- completions ----

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: HTTPRequest):
        check_model(body.model)
        if body.suffix:
            raise APIError(400, "suffix is not supported", "suffix", "unsupported_value")
        if body.best_of not in (None, 1, body.n):
            raise APIError(400, "best_of is not supported", "best_of", "unsupported_value")
        p = body.prompt
        if isinstance(p, str) or (p and all(isinstance(x, str) for x in p)):
            texts = [p] if isinstance(p, str) else p
            check_chars(max(len(x) for x in texts), "prompt")
            prompts = await asyncio.to_thread(tok.encode_batch, texts)  # off the event loop (and the GIL)
        elif p and all(isinstance(x, int) for x in p):
            prompts = [list(p)]
        else:
            prompts = [list(x) for x in p]
        if not prompts or any(not x for x in prompts):
            raise APIError(400, "prompt is empty", "prompt", "invalid_value")
        if any(not 0 <= t < engine.vocab_size for x in prompts for t in x):
            raise APIError(400, f"prompt token ids must be in [0, {engine.vocab_size})", "prompt", "invalid_value")
        if len(prompts) > 16:
            raise APIError(400, "at most 16 prompts per request", "prompt", "invalid_value")
        asked = 16 if body.max_tokens is None else body.max_tokens  # OpenAI's default for completions
        budgets = [budget(x, asked, "max_tokens", "prompt") for x in prompts]
        n = body.n or 1
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        reqs, echo = [], []
        for x, m in zip(prompts, budgets):
            for seed in seeds(body, n):
                r = sampling(body, x, m, stop, logprobs=body.logprobs)
                r.seed = seed
                reqs.append(r)
                echo.append(tok.decode(x) if body.echo else "")
        rid, created_at = "cmpl-" + secrets.token_hex(12), int(time.time())
        handles, queue = submit_all(reqs)

        if not body.stream:
            outs = await collect(handles, queue, request)
            choices = []
            for i, o in enumerate(outs):
                lps = [e for x in o for e in (x.logprobs or [])]
                choices.append({"index": i, "text": echo[i] + "".join(x.text for x in o),
                                "logprobs": completion_logprobs(lps, len(echo[i])) if body.logprobs is not None
                                else None, "finish_reason": o[-1].finish_reason})
            u = usage(outs)
            u["prompt_tokens"] = sum(len(x) for x in prompts)
            u["total_tokens"] = u["prompt_tokens"] + u["completion_tokens"]
            return {"id": rid, "object": "text_completion", "created": created_at, "model": model_name,
                    "system_fingerprint": "ouvert", "choices": choices, "usage": u}

        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def events():
            finals: list[Output | None] = [None] * len(reqs)
            offsets = [len(e) for e in echo]
            try:
                for i, e in enumerate(echo):
                    if e:
                        yield sse(completion_chunk(rid, created_at, model_name, i, e, None, None))
                while any(f is None for f in finals):
                    i, out = await queue.get()
                    if out.finish_reason == "error":
                        yield sse(error_body("The server had an error while generating.", "server_error"))
                        return
                    lps = None
                    if body.logprobs is not None and out.logprobs:
                        lps = completion_logprobs(out.logprobs, offsets[i])
                    offsets[i] += len(out.text)
                    if out.text or lps or out.finish_reason:
                        yield sse(completion_chunk(rid, created_at, model_name, i, out.text, lps, out.finish_reason))
                    if out.finish_reason is not None:
                        finals[i] = out
                if include_usage:
                    u = usage([[f] for f in finals])
                    u["prompt_tokens"] = sum(len(x) for x in prompts)
                    u["total_tokens"] = u["prompt_tokens"] + u["completion_tokens"]
                    yield sse({"id": rid, "object": "text_completion", "created": created_at, "model": model_name,
                               "choices": [], "usage": u})
                yield "data: [DONE]\n\n"
            finally:
                for h in handles:
                    h.cancel()

        return stream_response(events())

    return app


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
