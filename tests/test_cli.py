"""The `ouvert` command, run as a user runs it."""

from __future__ import annotations

import subprocess
import sys

import pytest


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
    assert r.stderr.count("tokens/s") == 2


def test_errors_are_one_line(tmp_path):
    r = run("info", "--model", str(tmp_path))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"ouvert info: error: {tmp_path}/config.json: missing; {tmp_path} is "
                                             "not a Hugging Face checkpoint directory"]
    r = run("init", "--preset", "nope", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "unknown preset 'nope'" in r.stderr
