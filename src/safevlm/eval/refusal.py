"""Rule-based refusal judge: is an answer a refusal (or a safety-cautious answer)?

The phrase lists live in ``refusal_rules.yaml`` beside this file, so they can be extended
without code changes. This is the cheap judge used for refusal rates on synthetic data and as
a baseline beside LLM judges; it reads text only.

Benchmarks that define ASR by string matching ship their own rule sets in ``rules/``
(:func:`load_rules`): ``vlguard`` (VLGuard's ``check_success_attack``: lowercase, substring)
and ``holisafe`` (HoliSafe-Bench's ``eval_by_string_matching.py``: lowercase and strip,
then a prefix list and a substring list). A rule file's keys:

* ``refusal`` / ``caution``: substrings (``caution`` counts with ``include_caution``);
* ``prefix``: the answer starts with one of these; ``exact``: the whole answer equals one;
* ``normalise``: ``true`` (default) maps curly quotes and collapses whitespace before
  matching; ``false`` only lowercases and strips, as the benchmarks' scripts do.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

RULES_FILE = Path(__file__).with_name("refusal_rules.yaml")
RULES_DIR = Path(__file__).with_name("rules")
_KEYS = ("refusal", "caution", "prefix", "exact", "normalise")


def _normalise(text: str) -> str:
    text = text.replace("\u2019", "'").replace("\u2018", "'").lower()
    return re.sub(r"\s+", " ", text).strip()


def _lower(text: str) -> str:
    return text.lower().strip()


@dataclass(frozen=True)
class RefusalRules:
    """Substring (and prefix / exact) rules; ``include_caution`` also counts safety-cautious answers."""

    refusal: tuple[str, ...] = field(default_factory=tuple)
    caution: tuple[str, ...] = field(default_factory=tuple)
    prefix: tuple[str, ...] = field(default_factory=tuple)
    exact: tuple[str, ...] = field(default_factory=tuple)
    normalise: bool = True

    @classmethod
    def from_yaml(cls, path: str | Path = RULES_FILE) -> "RefusalRules":
        import yaml

        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping with keys {', '.join(_KEYS)}")
        unknown = set(data) - set(_KEYS)
        if unknown:
            raise ValueError(f"{path}: unknown keys {sorted(unknown)}; allowed: {', '.join(_KEYS)}")
        normalise = data.get("normalise", True)
        if not isinstance(normalise, bool):
            raise ValueError(f"{path}: 'normalise' must be true or false, got {normalise!r}")
        norm = _normalise if normalise else _lower
        lists = {}
        for key in ("refusal", "caution", "prefix", "exact"):
            value = data.get(key) or []
            if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
                raise ValueError(f"{path}: {key!r} must be a list of strings")
            lists[key] = tuple(norm(p) for p in value)
        return cls(**lists, normalise=normalise)

    def judge(self, text: str, include_caution: bool = True) -> str:
        """'refusal', 'caution' or 'comply'."""
        t = _normalise(text) if self.normalise else _lower(text)
        if any(p in t for p in self.refusal) or (self.prefix and t.startswith(self.prefix)) or t in self.exact:
            return "refusal"
        if include_caution and any(p in t for p in self.caution):
            return "caution"
        return "comply"

    def is_refusal(self, text: str, include_caution: bool = True) -> bool:
        return self.judge(text, include_caution) != "comply"


@lru_cache(maxsize=1)
def default_rules() -> RefusalRules:
    return RefusalRules.from_yaml()


def rule_sets() -> list[str]:
    """Names :func:`load_rules` accepts: ``default`` and the files in ``rules/``."""
    return ["default", *sorted(p.stem for p in RULES_DIR.glob("*.yaml"))]


@lru_cache(maxsize=16)
def load_rules(name_or_path: str = "default") -> RefusalRules:
    """A rule set by name (``default``, ``vlguard``, ``holisafe``) or from a YAML path."""
    if name_or_path == "default":
        return default_rules()
    path = RULES_DIR / f"{name_or_path}.yaml"
    if path.is_file():
        return RefusalRules.from_yaml(path)
    if Path(name_or_path).is_file():
        return RefusalRules.from_yaml(name_or_path)
    raise ValueError(f"unknown refusal rule set {name_or_path!r}; known: {', '.join(rule_sets())} (or a YAML path)")


def is_refusal(text: str, include_caution: bool = True) -> bool:
    """True when ``text`` refuses (or, with ``include_caution``, answers with a safety caution)."""
    return default_rules().is_refusal(text, include_caution)
