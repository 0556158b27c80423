"""Chat templates: the jinja2 templates shipped in tokenizer_config.json, rendered exactly as
transformers renders them (sandboxed environment, trim_blocks and lstrip_blocks, its `tojson`,
`raise_exception` and `strftime_now`), so a model sees the prompt format it was trained on."""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment


def _tojson(x: Any, ensure_ascii: bool = False, indent=None, separators=None, sort_keys: bool = False) -> str:
    # jinja's own tojson escapes HTML characters; templates expect plain JSON.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def render(
    template: str,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool = False,
    tools: list[dict] | None = None,
    special_tokens: dict[str, str] | None = None,
    **kwargs: Any,
) -> str:
    """Render a conversation to the prompt text. `special_tokens` supplies bos_token, eos_token..."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise TypeError("messages must be a list of dicts with 'role' and 'content'")
    # transformers drops keys whose value is None before rendering
    messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
    context = {**(special_tokens or {}), **kwargs}
    return compile_template(template).render(
        messages=messages, tools=tools, documents=None, add_generation_prompt=add_generation_prompt, **context
    )
