"""The request bodies the API accepts, as pydantic models of OpenAI's fields.

A field out of its range is refused by these models (FastAPI answers 400 with the field in `param`);
what only the engine can judge (the context length, token ids against the vocabulary) it judges at
submission (engine.InvalidRequest). Unknown fields are ignored, as OpenAI's own server does.
Extensions beyond OpenAI's fields, as other servers name them: `top_k`, `min_p`, `ignore_eos`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ouvert.serve.engine import SEED_MAX

MAX_STOP_CHARS = 500  # per stop string: what is held back from a stream while it may begin one


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


class SamplingFields(_Schema):
    """The fields chat and text completions share: the model, the budget and how to sample."""

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

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        """A stream ends with a chunk of usage only."""
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    @property
    def chars(self) -> int:
        """Characters of text in the messages (their tool calls included), to refuse before tokenizing."""
        n = 0
        for m in self.messages:
            n += len(m.content) if isinstance(m.content, str) else sum(len(p.text) for p in m.content or [])
            n += sum(len(c.function.name) + len(c.function.arguments) for c in m.tool_calls or [])
        return n


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None
