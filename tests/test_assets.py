"""A file `make assets` fetches (ouvert/assets.py), missing or corrupted, fails to load in one line
that names it and says how to fetch it again, from load_model and from the CLI alike."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

import ouvert
from ouvert import CheckpointError
from ouvert.assets import ASSETS
from ouvert.checkpoint.gguf import GGUFFile
from ouvert.checkpoint.manifest import sha256_file
from ouvert.cli import main as cli_main

SMOLLM2 = Path(__file__).resolve().parent.parent / ".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"


def test_missing_asset_says_how_to_fetch_it(tmp_path, capsys):
    path = tmp_path / SMOLLM2.name
    with pytest.raises(CheckpointError) as e:
        ouvert.load_model(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: no such file; fetch SmolLM2-135M-Instruct")
    assert "`make assets` (scripts/fetch_assets.sh)" in msg and "\n" not in msg
    assert cli_main(["generate", "--model", str(path), "Hello"]) == 2
    assert [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln] == [f"ouvert generate: error: {msg}"]
    # a file that is not a known asset keeps the plain message
    with pytest.raises(CheckpointError, match=r"other\.gguf: no such file$"):
        ouvert.load_model(tmp_path / "other.gguf")


@pytest.mark.skipif(not SMOLLM2.is_file(), reason="run `make assets` (scripts/fetch_assets.sh)")
@pytest.mark.parametrize("damage", ["flipped byte", "truncated"])
def test_corrupted_asset_names_both_sums(tmp_path, capsys, damage):
    bad = tmp_path / SMOLLM2.name
    shutil.copyfile(SMOLLM2, bad)
    size = bad.stat().st_size
    if damage == "flipped byte":  # in the tensor data: the file still parses, only its hash tells
        with open(bad, "r+b") as f:
            f.seek(size // 2)
            byte = f.read(1)[0]
            f.seek(size // 2)
            f.write(bytes([byte ^ 1]))
        GGUFFile(bad)
    else:
        os.truncate(bad, size - 4096)
    got, want = sha256_file(bad), ASSETS[bad.name][1]
    assert got != want
    for kw in ({}, {"dtype": torch.float32}):  # as stored and dequantized go through the same check
        with pytest.raises(CheckpointError) as e:
            ouvert.load_model(bad, **kw)
        msg = str(e.value)
        assert msg.startswith(f"{bad}: sha256 {got}, expected {want}: a corrupted or partial copy; fetch ")
        assert "again with `make assets` (scripts/fetch_assets.sh)" in msg and "\n" not in msg
    assert cli_main(["generate", "--model", str(bad), "Hello"]) == 2
    assert [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln] == [f"ouvert generate: error: {msg}"]
