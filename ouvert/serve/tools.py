"""Tools (function calling): tool definitions and calls into the prompt, tool calls out of the text.

Two output formats, chosen from the chat template:
  hermes  (Qwen 2.5 / 3, Hermes, ...; the template mentions `<tool_call>`): one block per call,
          `<tool_call>\\n{"name": F, "arguments": {...}}\\n</tool_call>`.
  llama   (Llama 3.1 / 3.2 JSON tool calling; every other template): the reply is the call itself,
          `{"name": F, "parameters": {...}}`, possibly after `<|python_tag|>`; several calls are
          separated by `;` or new lines. "arguments" is read as well as "parameters".

A template that knows tools (it reads the `tools` variable) gets them as they are, and OpenAI
tool_calls in the history with their arguments decoded to objects, as Hugging Face templates
expect. A template without tool support (Llama 3's original template, the one our tests use)
gets them rendered by us:
  - the tool list goes into the system message (one is put first if there is none), with
    Llama 3.1's instruction to answer with a JSON call;
  - an assistant message with tool_calls becomes the text of those calls in the llama format;
  - a `tool` message keeps its role and content (Llama 3's template writes any role as a header).
With `tool_choice` "required" or a named function the call is forced by a grammar
(serve/grammar.py), so even a random-weight model returns a call whose arguments fit the schema.

Out of the text: `assistant_message` reads a whole reply; a stream goes through `ReplyStream`,
which decides whether the text is content or calls, and `CallStream`, which sends a call's
arguments as they are written.
"""

from __future__ import annotations

import json
import re
import secrets
from typing import Any

from ouvert.serve.grammar import JsonState, lark_json

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"

LLAMA_INSTRUCTION = (
    "You have access to the following functions. To call a function, respond with only a JSON object "
    'in the format {"name": function name, "parameters": dictionary of argument name and its value}. '
    "Do not use variables.\n\n"
)


def output_format(template: str | None) -> str:
    return "hermes" if template and HERMES_OPEN in template else "llama"


def template_knows_tools(template: str | None) -> bool:
    return bool(template) and re.search(r"\btools\b", template) is not None


def _arguments_object(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
    return arguments


def call_text(name: str, arguments: Any, fmt: str) -> str:
    """One call written the way the model writes it."""
    if fmt == "hermes":
        return f"{HERMES_OPEN}\n{json.dumps({'name': name, 'arguments': arguments})}\n{HERMES_CLOSE}"
    return json.dumps({"name": name, "parameters": arguments})


def prepare(messages: list[dict], tools: list[dict] | None, template: str | None) -> tuple[list[dict], list | None]:
    """Messages (OpenAI shape, as dicts) and tools -> what to hand the chat template."""
    fmt = output_format(template)
    native = template_knows_tools(template)
    out = []
    for m in messages:
        m = dict(m)
        calls = m.get("tool_calls")
        if calls:
            if native:
                m["tool_calls"] = [
                    {**c, "function": {**c["function"], "arguments": _arguments_object(c["function"]["arguments"])}}
                    for c in calls
                ]
            else:
                text = "\n".join(
                    call_text(c["function"]["name"], _arguments_object(c["function"]["arguments"]), fmt) for c in calls
                )
                m.pop("tool_calls")
                m["content"] = ((m.get("content") or "") + "\n" + text).strip()
        if m.get("content") is None and m.get("role") in ("assistant", "tool"):
            m["content"] = ""
        out.append(m)
    if not tools or native:
        return out, tools or None
    listing = LLAMA_INSTRUCTION + "\n\n".join(json.dumps(t) for t in tools)
    if out and out[0].get("role") in ("system", "developer"):
        out[0] = {**out[0], "content": f"{out[0].get('content') or ''}\n\n{listing}".strip()}
    else:
        out.insert(0, {"role": "system", "content": listing})
    return out, None


def call_schema(tool: dict, fmt: str) -> dict:
    """The JSON schema of one call to `tool` in the model's format (name first, then arguments)."""
    f = tool["function"]
    params = f.get("parameters") or {"type": "object", "properties": {}}
    key = "arguments" if fmt == "hermes" else "parameters"
    return {
        "type": "object",
        "properties": {"name": {"const": f["name"]}, key: params},
        "required": ["name", key],
        "additionalProperties": False,
    }


def forced_call_lark(tools: list[dict], fmt: str) -> str:
    """A Lark grammar for exactly one call to one of `tools` (pass one tool for a named choice)."""
    schemas = [call_schema(t, fmt) for t in tools]
    body = lark_json(schemas[0] if len(schemas) == 1 else {"anyOf": schemas})
    if fmt == "hermes":
        return f'start: "{HERMES_OPEN}\\n" call "\\n{HERMES_CLOSE}"\ncall: {body}\n'
    return f"start: {body}\n"


def may_be_call(text: str, fmt: str) -> bool | None:
    """While streaming with tool_choice auto: True if the text so far starts a tool call, False if
    it cannot, None while it is too short to tell."""
    s = text.lstrip()
    if s.startswith(PYTHON_TAG):
        s = s[len(PYTHON_TAG) :].lstrip()
    if not s:
        return None
    if fmt == "hermes":
        if s.startswith(HERMES_OPEN):
            return True
        return None if HERMES_OPEN.startswith(s) else False
    return s[0] == "{"


def _decode_objects(s: str) -> list[Any] | None:
    """A string of JSON values separated by whitespace or ';' -> the values, or None."""
    dec, out, i = json.JSONDecoder(), [], 0
    while True:
        while i < len(s) and (s[i].isspace() or s[i] == ";"):
            i += 1
        if i == len(s):
            return out
        try:
            obj, i = dec.raw_decode(s, i)
        except json.JSONDecodeError:
            return None
        out.append(obj)


def parse_calls(text: str, fmt: str, names: set[str]) -> tuple[str, list[dict]] | None:
    """The model's text -> (content left outside the calls, OpenAI tool_calls), or None when the
    text holds no well-formed call to a known tool."""
    if fmt == "hermes":
        blocks = re.findall(re.escape(HERMES_OPEN) + r"(.*?)" + re.escape(HERMES_CLOSE), text, re.S)
        content = re.sub(re.escape(HERMES_OPEN) + r".*?" + re.escape(HERMES_CLOSE), "", text, flags=re.S).strip()
        objs = [o for b in blocks for o in (_decode_objects(b.strip()) or [None])]
    else:
        s = text.strip()
        if s.startswith(PYTHON_TAG):
            s = s[len(PYTHON_TAG) :]
        objs, content = _decode_objects(s), ""
    if not objs:
        return None
    calls = []
    for o in objs:
        if not isinstance(o, dict) or o.get("name") not in names:
            return None
        args = o.get("arguments", o.get("parameters", {}))
        if not isinstance(args, dict):
            return None
        calls.append({
            "id": "call_" + secrets.token_hex(12),
            "type": "function",
            "function": {"name": o["name"], "arguments": json.dumps(args, ensure_ascii=False)},
        })
    return content, calls


# A call's head, up to where its arguments object starts: the name must come first, as our
# grammar and Llama's and Hermes' formats write it.
_CALL_HEAD = {
    "llama": re.compile(r'[\s;]*(?:' + re.escape(PYTHON_TAG) + r')?\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,'
                        r'\s*"(?:parameters|arguments)"\s*:\s*'),
    "hermes": re.compile(r'\s*' + re.escape(HERMES_OPEN) + r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,'
                         r'\s*"(?:arguments|parameters)"\s*:\s*'),
}
_CALL_TAIL = {"llama": re.compile(r"\s*\}"), "hermes": re.compile(r"\s*\}\s*" + re.escape(HERMES_CLOSE))}


class CallStream:
    """Tool calls as OpenAI streams them, while the model writes them: `feed` the text as it comes
    and get `tool_calls` delta entries, first {index, id, type, function: {name, arguments: ""}}
    once a call's name is read (and is one of the tools), then pieces of its arguments' JSON text
    as they arrive. The pieces joined are the arguments object as the model wrote it.

    It stops at anything it cannot follow (another key order, an unknown name): `started` tells
    the caller whether any call went out; if none did, the whole text is parsed at the end."""

    def __init__(self, fmt: str, names: set[str]):
        self.head, self.tail, self.names = _CALL_HEAD[fmt], _CALL_TAIL[fmt], names
        self.text, self.pos, self.index = "", 0, -1
        self.state = "head"  # head: before a call; args: inside its arguments; tail: after them; stuck
        self.json = JsonState()  # how open the current call's arguments are

    @property
    def started(self) -> bool:
        return self.index >= 0

    def feed(self, text: str) -> list[dict]:
        self.text += text
        out: list[dict] = []
        while self.state != "stuck":
            if self.state == "head":
                m = self.head.match(self.text, self.pos)
                if m is None or m.end() == len(self.text):  # wait until the arguments begin
                    break
                name = json.loads(f'"{m.group(1)}"')
                if name not in self.names:
                    self.state = "stuck"
                    break
                self.index += 1
                out.append({"index": self.index, "id": "call_" + secrets.token_hex(12), "type": "function",
                            "function": {"name": name, "arguments": ""}})
                self.pos, self.state, self.json = m.end(), "args", JsonState()
            elif self.state == "args":
                end, closed = self._scan()
                if end > self.pos:
                    out.append({"index": self.index, "function": {"arguments": self.text[self.pos : end]}})
                    self.pos = end
                if not closed:
                    break
                self.state = "tail"
            else:  # tail: the call's closing brace (and </tool_call>), then maybe another call
                m = self.tail.match(self.text, self.pos)
                if m is None:
                    break
                self.pos, self.state = m.end(), "head"
        return out

    def _scan(self) -> tuple[int, bool]:
        """Advance over the arguments' JSON from self.pos; returns where to stream up to (the end of
        the text, or just after the arguments object) and whether the object closed there."""
        j = self.json
        for i in range(self.pos, len(self.text)):
            c = self.text[i]
            if j.depth == 0 and not c.isspace() and c != "{":  # arguments that are not an object
                self.state = "stuck"
                return self.pos, False
            j.feed(c)
            if j.depth == 0 and c == "}" and not j.in_string:
                return i + 1, True
        return len(self.text), False


def assistant_message(text: str, finish: str, fmt: str, names: set[str] | None) -> tuple[dict, str]:
    """A whole reply as OpenAI's assistant message, and its finish reason: the calls it holds when
    tools are on (`names`, the tools' names; None when off) and it holds well-formed calls to them
    (finish "tool_calls"), else the text as content."""
    parsed = parse_calls(text, fmt, names) if names is not None else None
    if parsed is None:
        return {"role": "assistant", "content": text}, finish
    content, calls = parsed
    return {"role": "assistant", "content": content or None, "tool_calls": calls}, "tool_calls"


class ReplyStream:
    """One streamed chat choice as OpenAI's deltas, deciding as the text comes whether it is content
    or tool calls.

    Its mode is "text" when tools are off (`names` None): text passes straight through. With
    tool_choice "auto" it starts "undecided" and holds the text until `may_be_call` can tell; it
    then goes out as content ("text") or as calls ("call"). A forced call starts in "call". Calls
    stream through a CallStream; text that one cannot follow is held and parsed whole at `finish`.
    Logprobs ride along only with content, and not with text that was held.
    """

    def __init__(self, fmt: str, names: set[str] | None, forced: bool):
        self.fmt, self.names = fmt, names
        self.mode = "call" if forced else ("undecided" if names is not None else "text")
        self.held = ""  # text held while it may be a tool call
        self.calls = CallStream(fmt, names or set())  # a call's arguments stream as written

    def feed(self, text: str, logprobs: Any = None) -> list[tuple[dict, Any]]:
        """New text (and its logprobs) -> (delta, logprobs) pairs to send."""
        if self.mode == "text":
            return [({"content": text}, logprobs)] if text or logprobs else []
        self.held += text
        new = text
        if self.mode == "undecided":
            verdict = may_be_call(self.held, self.fmt)
            self.mode = "text" if verdict is False else ("call" if verdict else "undecided")
            new = self.held  # all of it goes out as the call or as content
        if self.mode == "call":
            return [({"tool_calls": [delta]}, None) for delta in self.calls.feed(new)]
        if self.mode == "text" and self.held:
            out, self.held = [({"content": self.held}, logprobs)], ""
            return out
        return []

    def finish(self, reason: str) -> tuple[list[dict], str]:
        """The deltas still to send when the choice ends with `reason`, and the finish reason to send."""
        if self.calls.started:  # the calls went out as they came; a call cut short keeps "length"
            return [], "tool_calls" if self.calls.state == "head" else reason
        if not self.held:
            return [], reason
        msg, reason = assistant_message(self.held, reason, self.fmt, self.names)
        deltas = [{"content": msg["content"]}] if msg.get("content") else []
        deltas += [{"tool_calls": [{"index": k, **call}]} for k, call in enumerate(msg.get("tool_calls") or [])]
        return deltas, reason
