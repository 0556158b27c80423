"""Verifiers for generative tasks: is a model's output the answer?

exact:   SQuAD's exact match (squad v1.1 evaluate script): lowercase, drop punctuation, drop the
         articles a/an/the, collapse whitespace, then compare.
numeric: the last number in the output (GSM8K-style: "... so the answer is 1,234.") equals the
         answer's last number; commas between digits are thousands separators.
"""

from __future__ import annotations

import math
import re
import string

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def exact_match(output: str, answer: str) -> bool:
    return normalize_answer(output) == normalize_answer(answer)


def last_number(s: str) -> float | None:
    """The last number written in s, or None. "1,234.5" -> 1234.5; "-3" -> -3.0."""
    found = _NUMBER.findall(s)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:  # "1,,2" -> "12" is fine, but guard odd matches anyway
        return None


def numeric_match(output: str, answer: str | float) -> bool:
    want = float(answer) if isinstance(answer, int | float) else last_number(answer)
    got = last_number(output)
    return want is not None and got is not None and math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-9)


def is_number(answer: str | float) -> bool:
    """Whether an answer is a plain number (then the numeric verifier is the default)."""
    if isinstance(answer, int | float):
        return True
    try:
        float(answer.strip().replace(",", ""))
        return True
    except ValueError:
        return False


VERIFIERS = {"exact": exact_match, "numeric": numeric_match}
