"""Chat templates: the jinja2 templates shipped in tokenizer_config.json, rendered exactly as
transformers renders them (sandboxed environment, trim_blocks and lstrip_blocks, its `tojson`,
`raise_exception` and `strftime_now`), so a model sees the prompt format it was trained on."""

from __future__ import annotations

import json
import os
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


class ChatError(ValueError):
    """A conversation that cannot be rendered for training; names what is wrong."""


ROLES = ("system", "user", "assistant", "tool")


def check_conversation(messages: Any, need_assistant_last: bool = True) -> None:
    if not isinstance(messages, list) or not messages:
        raise ChatError("'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise ChatError(f"message {i} must be an object with a string 'content'")
        if m.get("role") not in ROLES:
            raise ChatError(f"message {i} has unknown role {m.get('role')!r} (expected one of {', '.join(ROLES)})")
    if need_assistant_last and messages[-1]["role"] != "assistant":
        raise ChatError(f"the last turn is {messages[-1]['role']!r}, not 'assistant': nothing to learn from")


def render_with_mask(tokenizer, messages: list[dict[str, Any]]) -> tuple[list[int], list[int]]:
    """Token ids of the conversation under the tokenizer's chat template, and a loss mask that is
    1 on exactly the assistant turns' content tokens and the end-of-turn token that closes each.

    Ids and mask come from one rendering of the whole conversation, so training cannot disagree
    with the template: the assistant spans are located in that text (after the prompt the template
    renders for the turn, via add_generation_prompt), and tokens are marked by their offsets.
    """
    check_conversation(messages)
    full = tokenizer.apply_chat_template(messages)
    enc = tokenizer.tok.encode(full, add_special_tokens=False)
    ids, offsets = enc.ids, enc.offsets
    mask = [0] * len(ids)
    special = set(tokenizer.stop_token_ids) | {tokenizer.token_to_id(t) for t in ("<|eot_id|>", "<|im_end|>")}
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True) if i else ""
        content = m["content"].strip()
        start = full.find(content, len(os.path.commonprefix([prompt, full])))
        if start < 0 or not content:
            raise ChatError(f"message {i}: the chat template does not render the assistant content verbatim")
        end = start + len(content)
        last = None
        for t, (a, b) in enumerate(offsets):
            if a < end and b > start:
                mask[t] = 1
                last = t
        if last is not None and last + 1 < len(ids) and ids[last + 1] in special:
            mask[last + 1] = 1  # the end-of-turn token: the model must learn to stop
    return ids, mask
