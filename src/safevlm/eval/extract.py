"""Answer extraction: a model's free text -> the value a metric compares (the task's ``answer.extract``).

Registered by name, like metrics; each is the parsing the benchmark's own scorer applies:

* ``raw``         — the answer unchanged;
* ``mme_yes_no``  — MME's ``calculation.py``: tabs and newlines become spaces (the results
  file is tab-separated), strip, lowercase; ``"yes"``/``"no"`` as is, otherwise ``"yes"`` if
  the first 4 characters contain "yes", elif ``"no"`` if they contain "no", else ``"other"``
  (always wrong);
* ``pope_yes_no`` — POPE's ``evaluate.py`` (= LLaVA ``eval_pope.py``): the text before the
  first ".", commas removed, split on single spaces; ``"no"`` if a word is ``No``, ``no`` or
  ``not``, else ``"yes"``;
* ``vqa``         — VQAv2-style normalisation for exact match: lowercase, punctuation
  removed (a period between digits kept), number words to digits, articles dropped,
  whitespace collapsed (the VQAv2 contraction table is not applied).
"""

from __future__ import annotations

import re
from collections.abc import Callable

EXTRACTORS: dict[str, Callable[[str], str]] = {}


def register_extractor(name: str):
    """Decorator registering an answer extractor ``fn(answer: str) -> str``."""

    def wrap(fn):
        if name in EXTRACTORS:
            raise ValueError(f"answer extractor {name!r} is registered twice")
        EXTRACTORS[name] = fn
        return fn

    return wrap


def extract(name: str, answer: str | None) -> str | None:
    """``EXTRACTORS[name](answer)``; ``None`` stays ``None`` (no answer was generated)."""
    if name not in EXTRACTORS:
        raise ValueError(f"unknown answer extractor {name!r}; known: {', '.join(sorted(EXTRACTORS))}")
    return None if answer is None else EXTRACTORS[name](answer)


@register_extractor("raw")
def raw(answer: str) -> str:
    return answer


@register_extractor("mme_yes_no")
def mme_yes_no(answer: str) -> str:
    """``"yes"``, ``"no"`` or ``"other"`` exactly as MME's scorer parses a response."""
    text = answer.replace("\t", " ").replace("\r", " ").replace("\n", " ").strip().lower()
    if text in ("yes", "no"):
        return text
    prefix = text[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


@register_extractor("pope_yes_no")
def pope_yes_no(answer: str) -> str:
    """``"yes"`` or ``"no"`` exactly as POPE's / LLaVA's scorer parses a response."""
    text = answer
    if text.find(".") != -1:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = re.compile(r"[^\w\s.]")
_LONE_PERIOD = re.compile(r"(?<!\d)\.|\.(?!\d)")


@register_extractor("vqa")
def vqa_normalise(answer: str) -> str:
    """VQAv2-style normal form of a short answer (see the module docstring)."""
    text = answer.replace("\n", " ").replace("\t", " ").strip().lower()
    text = _LONE_PERIOD.sub("", _PUNCTUATION.sub("", text))  # a period between digits (1.5) stays
    words = [_NUMBER_WORDS.get(w, w) for w in text.split() if w not in _ARTICLES]
    return " ".join(words)


__all__ = ["EXTRACTORS", "extract", "mme_yes_no", "pope_yes_no", "raw", "register_extractor", "vqa_normalise"]
