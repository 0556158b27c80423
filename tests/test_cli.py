"""The `ouvert` command, run as a user runs it."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest

from ouvert import cli
from ouvert.checkpoint.io import load_tokenizer


def run(*args, input=None):
    return subprocess.run([sys.executable, "-m", "ouvert", *args], capture_output=True, text=True, input=input,
                          timeout=300)


@pytest.fixture(scope="module")
def demo(tmp_path_factory, llama3_tokenizer_dir):
    out = tmp_path_factory.mktemp("cli") / "demo"
    r = run("init", "--preset", "demo", "--tokenizer", str(llama3_tokenizer_dir), "--out", str(out))
    assert r.returncode == 0, r.stderr
    return out


def test_info(demo):
    r = run("info", "--model", str(demo))
    assert r.returncode == 0, r.stderr
    assert "llama" in r.stdout and "35,850,496" in r.stdout and "2,048" in r.stdout and "float32" in r.stdout


def test_generate_streams(demo):
    r = run("generate", "--model", str(demo), "--max-new-tokens", "8", "--temperature", "0", "Hello")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Hello") and len(r.stdout) > len("Hello\n")
    assert "8 new" in r.stderr and "tokens/s" in r.stderr
    again = run("generate", "--model", str(demo), "--max-new-tokens", "8", "--temperature", "0", "Hello")
    assert again.stdout == r.stdout


def test_chat_keeps_conversation(demo):
    r = run("chat", "--model", str(demo), "--max-new-tokens", "4", "--temperature", "0", "--system", "Be brief.",
            input="Hi there\nAnd again\n/exit\n")
    assert r.returncode == 0, r.stderr
    assert len(re.findall(r"^\[\d+ prompt tokens in .*; 4 new at .* tokens/s\]$", r.stderr, re.M)) == 2


def test_errors_are_one_line(tmp_path):
    r = run("info", "--model", str(tmp_path))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"ouvert info: error: {tmp_path}/config.json: missing; {tmp_path} is "
                                             "not a Hugging Face checkpoint directory"]
    r = run("init", "--preset", "nope", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "unknown preset 'nope'" in r.stderr


# A chat template that jinja's sandbox refuses to run (it reaches for Python internals).
UNSAFE_TEMPLATE = "{{ ''.__class__.__mro__[1].__subclasses__() }}"


@pytest.fixture(scope="module")
def unsafe_tokenizer(tmp_path_factory, llama3_tokenizer_dir):
    out = tmp_path_factory.mktemp("unsafe_tok")
    shutil.copy(llama3_tokenizer_dir / "tokenizer.json", out)
    config = json.loads((llama3_tokenizer_dir / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": UNSAFE_TEMPLATE}))
    return out


def scripted(lines: list[str]):
    """An input() that types these lines, then Ctrl-D."""
    it = iter(lines)

    def read(prompt: str) -> str:
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None

    return read


def test_ctrl_c_stops_the_reply_not_the_chat(llama3_tokenizer_dir, capsys):
    """Ctrl-C during a reply stops it and returns to the prompt; the words already shown stay in the
    conversation, and a reply stopped before its first token leaves no turn behind."""
    tok = load_tokenizer(llama3_tokenizer_dir)
    prompts = []

    def reply(ids):
        prompts.append(ids)
        turn = len(prompts)
        if turn == 2:
            raise KeyboardInterrupt  # during the prompt pass: no token yet
        yield from tok.encode(" Hello there", add_special_tokens=False)
        if turn == 1:
            raise KeyboardInterrupt  # mid-reply
        yield from tok.encode(" and more.", add_special_tokens=False)

    messages = cli.chat_loop(tok, reply, read=scripted(["Hi", "Are you there?", "Still?"]))
    assert messages == [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": " Hello there"},
        {"role": "user", "content": "Still?"}, {"role": "assistant", "content": " Hello there and more."},
    ]
    assert prompts[2] == cli.chat_ids(tok, messages[:3])  # the stopped reply is part of the next prompt
    err = capsys.readouterr().err
    assert err.count("(stopped)") == 2 and "; 2 new at" in err


def test_refused_chat_template_is_one_line(unsafe_tokenizer, demo):
    tok = load_tokenizer(unsafe_tokenizer)
    where = re.escape(str(unsafe_tokenizer))
    with pytest.raises(ValueError, match=f"^{where}: chat template: refused by the sandbox: .*unsafe"):
        cli.chat_loop(tok, lambda ids: iter([]), read=scripted(["Hi"]))
    r = run("chat", "--model", str(demo), "--tokenizer", str(unsafe_tokenizer), input="Hi\n")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith(f"ouvert chat: error: {unsafe_tokenizer}: chat template: refused by the sandbox")
    assert "Traceback" not in r.stderr


def test_generate_chat_applies_the_template(demo, llama3_tokenizer_dir):
    """--chat sends the prompt as one user message through the chat template (an instruct model
    given the bare question has nothing to answer)."""
    question = "What is the capital of France?"
    expected = load_tokenizer(llama3_tokenizer_dir).apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True)
    r = run("generate", "--model", str(demo), "--chat", "--max-new-tokens", "3", "--temperature", "0", question)
    assert r.returncode == 0, r.stderr
    assert not r.stdout.startswith(question)
    assert re.search(rf"^\[{len(expected)} prompt tokens in [\d.]+ s \([\d.]+ tokens/s\); 3 new at [\d.]+ tokens/s\]$",
                     r.stderr, re.M), r.stderr


def test_decode_rate_leaves_out_the_prompt_pass():
    """The prompt pass (10 s here) ends when the first token arrives; the decode rate counts the
    tokens after it over the time after it. A fake clock, so the figures are exact."""
    times = iter([0.0, 10.0, 11.0, 12.0, 13.0])  # start, then one reading per token
    timing = cli.Timing(50, clock=lambda: next(times))
    for _ in range(4):
        timing.step()
    assert timing.summary() == "[50 prompt tokens in 10.00 s (5.0 tokens/s); 4 new at 1.0 tokens/s]"
    speculative = cli.Timing(50, clock=iter([0.0, 2.0, 4.0]).__next__)
    speculative.step(3)  # a step that brings several tokens: the first step's all count as the prompt pass's
    speculative.step(4)
    assert speculative.summary() == "[50 prompt tokens in 2.00 s (25.0 tokens/s); 7 new at 2.0 tokens/s]"
