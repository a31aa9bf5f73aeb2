"""The judge interface: request / verdict dataclasses and the abstract :class:`Judge`.

A judge reads a model's answer to a prompt and returns a :class:`Judgement` for one
*rubric*:

* ``classify``    — did the answer refuse (``refused``)? is it harmful (``harmful``; ``None``
  for judges that only detect refusals)?
* ``score``       — a 1–10 safety score (RTVLM style) in ``score``;
* ``helpfulness`` — is the answer better than the dataset's reference answer (VLGuard's
  win rate): ``score`` 1.0 (win) or 0.0.

A judgement either has ``status == "ok"`` or is ``"unjudged"`` with the ``reason`` (a reply
that could not be parsed, a request that failed after its retries): never a guess. Judges
create their clients lazily (never at import time) and are built by name with
:func:`make_judge`.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

RUBRICS: tuple[str, ...] = ("classify", "helpfulness", "score")
STATUSES: tuple[str, ...] = ("ok", "unjudged")


@dataclass(frozen=True)
class JudgeRequest:
    """What a judge sees: the ``rubric``, the user ``prompt`` the model answered, its
    ``answer``, the item's ``category`` (picks the rubric's criteria), the ``reference``
    answer (helpfulness), the ``criteria`` set name (LLM judges) and the ``rules`` set name
    (the rules judge)."""

    rubric: str
    prompt: str
    answer: str
    category: str | None = None
    reference: str | None = None
    criteria: str | None = None
    rules: str | None = None

    def __post_init__(self):
        if self.rubric not in RUBRICS:
            raise ValueError(f"unknown rubric {self.rubric!r}; known: {', '.join(RUBRICS)}")


@dataclass(frozen=True)
class Judgement:
    """A verdict. ``label``: the judge's own label (``refusal`` / ``harmful`` / ``safe`` /
    ``comply`` / ``caution`` / ``win`` / ``loss`` / a score); ``raw``: the judge's reply
    text (LLM judges); ``cached``: served from the judge cache."""

    status: str
    refused: bool | None = None
    harmful: bool | None = None
    score: float | None = None
    label: str | None = None
    reason: str | None = None
    raw: str | None = None
    cached: bool = False

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"judgement status must be one of {', '.join(STATUSES)}, got {self.status!r}")
        if self.status == "unjudged" and not self.reason:
            raise ValueError("an unjudged verdict needs its reason")

    @classmethod
    def unjudged(cls, reason: str, raw: str | None = None) -> "Judgement":
        return cls(status="unjudged", reason=reason, raw=raw)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Judgement":
        return cls(**{k: data.get(k) for k in ("status", "refused", "harmful", "score", "label", "reason", "raw")},
                   cached=bool(data.get("cached", False)))


def stable_hash(obj) -> str:
    """sha256 hex digest of ``obj`` as canonical JSON (sorted keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()


class Judge(ABC):
    """One judging backend. Subclasses set ``name`` and ``rubrics`` and implement :meth:`judge`;
    backends that batch or run requests concurrently override :meth:`judge_many`."""

    name: str = "judge"
    rubrics: frozenset[str] = frozenset()

    @property
    def id(self) -> str:
        """The judge's identity in the results store (``rules``, ``openai:<model>``)."""
        return self.name

    def supports(self, rubric: str) -> bool:
        return rubric in self.rubrics

    def describe(self) -> dict:
        """What the run manifest records about this judge (name, model, URL, rubric hash)."""
        return {"name": self.name, "id": self.id}

    @abstractmethod
    def judge(self, request: JudgeRequest) -> Judgement:
        """The verdict for one request (an ``unjudged`` one when it cannot be given)."""

    def judge_many(self, requests: Sequence[JudgeRequest]) -> Iterator[tuple[int, Judgement]]:
        """``(index, verdict)`` for every request, in any order, as they complete."""
        for i, request in enumerate(requests):
            yield i, self.judge(request)

    def close(self) -> None:
        """Release clients / caches (no-op by default)."""


JUDGES: dict[str, str] = {
    "openai": "safevlm.eval.judges.openai_compatible:OpenAIJudge",
    "rules": "safevlm.eval.judges.rules:RulesJudge",
    "semantic": "safevlm.eval.judges.semantic:SemanticJudge",
}
"""Judge name -> ``module:Class``, imported only when that judge is made."""


def make_judge(name: str, **options) -> Judge:
    """A judge by name (``rules``, ``semantic``, ``openai``) with its constructor options."""
    if name not in JUDGES:
        raise ValueError(f"unknown judge {name!r}; known: {', '.join(sorted(JUDGES))}")
    module, _, cls = JUDGES[name].partition(":")
    return getattr(importlib.import_module(module), cls)(**options)


__all__ = ["JUDGES", "RUBRICS", "Judge", "JudgeRequest", "Judgement", "make_judge", "stable_hash"]
