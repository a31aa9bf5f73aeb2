"""Rule-based refusal judge: is an answer a refusal (or a safety-cautious answer)?

The phrase lists live in ``refusal_rules.yaml`` beside this file, so they can be extended
without code changes. This is the cheap judge used for refusal rates on synthetic data and as
a baseline beside LLM judges; it reads text only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

RULES_FILE = Path(__file__).with_name("refusal_rules.yaml")


def _normalise(text: str) -> str:
    text = text.replace("\u2019", "'").replace("\u2018", "'").lower()
    return re.sub(r"\s+", " ", text).strip()


@dataclass(frozen=True)
class RefusalRules:
    """Substring rules; ``include_caution`` also counts safety-cautious answers."""

    refusal: tuple[str, ...] = field(default_factory=tuple)
    caution: tuple[str, ...] = field(default_factory=tuple)

    @classmethod
    def from_yaml(cls, path: str | Path = RULES_FILE) -> "RefusalRules":
        import yaml

        data = yaml.safe_load(Path(path).read_text()) or {}
        unknown = set(data) - {"refusal", "caution"}
        if unknown:
            raise ValueError(f"{path}: unknown keys {sorted(unknown)}; allowed: refusal, caution")
        return cls(tuple(_normalise(p) for p in data.get("refusal", [])), tuple(_normalise(p) for p in data.get("caution", [])))

    def judge(self, text: str, include_caution: bool = True) -> str:
        """'refusal', 'caution' or 'comply'."""
        t = _normalise(text)
        if any(p in t for p in self.refusal):
            return "refusal"
        if include_caution and any(p in t for p in self.caution):
            return "caution"
        return "comply"

    def is_refusal(self, text: str, include_caution: bool = True) -> bool:
        return self.judge(text, include_caution) != "comply"


@lru_cache(maxsize=1)
def default_rules() -> RefusalRules:
    return RefusalRules.from_yaml()


def is_refusal(text: str, include_caution: bool = True) -> bool:
    """True when ``text`` refuses (or, with ``include_caution``, answers with a safety caution)."""
    return default_rules().is_refusal(text, include_caution)
