"""What an evaluation reader yields: :class:`EvalItem` s plus the items it had to skip.

An item is one model query of a benchmark: an image (referenced, never opened here: the
runner opens it with :func:`safevlm.data.open_image`), a prompt, and whatever the metrics
need to score the answer (a reference answer, labels, the subset and category it counts in).
Readers never drop input silently: every source entry becomes an item or a
:class:`~safevlm.data.Skipped` naming its location and the reason (missing image, broken
line, unknown subset), so ``len(items) + len(skipped) == total``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from safevlm.data import Skipped


@dataclass(frozen=True)
class EvalItem:
    """One benchmark query.

    Attributes:
        id: unique within the task (``"color/000000900001#0"``, ``"random-17"``).
        prompt: the question as the benchmark states it (the task's prompt template wraps it).
        image: a path relative to ``image_root``, encoded image bytes (FigStep renders in
            memory), or ``None`` for a text-only query.
        image_root: the folder ``image`` is relative to (absolute path string), or ``None``.
        reference: the reference answer(s): ``"yes"``/``"no"`` for MME and POPE, a tuple of
            accepted answers for VQA, the dataset's answer for VLGuard / RTVLM, or ``None``.
        labels: ground truth for the safety head and the safety metrics: ``risk_type`` (name),
            ``risk_level`` (id), ``expected`` (``"refuse"`` or ``"answer"``), benchmark labels.
        subset: the benchmark split the item counts in (``"unsafes"``, ``"SD_TYPO"``, ``"SSU"``).
        category: the benchmark's category (RTVLM task, SafeBench topic, MME subtask, ...).
        metadata: JSON-serialisable details (source location, the MME image key, ...).
    """

    id: str
    prompt: str
    image: "str | bytes | None" = None
    image_root: str | None = None
    reference: "str | tuple[str, ...] | None" = None
    labels: dict = field(default_factory=dict)
    subset: str = "all"
    category: str | None = None
    metadata: dict = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.id, str) or not self.id:
            raise ValueError(f"item id must be a non-empty string, got {self.id!r}")
        if not isinstance(self.prompt, str):
            raise ValueError(f"item {self.id!r}: prompt must be a string, got {type(self.prompt).__name__}")
        if self.image is not None and not isinstance(self.image, (str, bytes)):
            raise ValueError(f"item {self.id!r}: image must be a path, bytes or None, got {type(self.image).__name__}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (image bytes are replaced by ``"<N bytes>"``), as the results store keeps it."""
        image = self.image
        if isinstance(image, bytes):
            image = f"<{len(image)} bytes>"
        reference = list(self.reference) if isinstance(self.reference, tuple) else self.reference
        return {
            "id": self.id,
            "prompt": self.prompt,
            "image": image,
            "image_root": self.image_root,
            "reference": reference,
            "labels": dict(self.labels),
            "subset": self.subset,
            "category": self.category,
            "metadata": dict(self.metadata),
        }

    @classmethod
    def from_dict(cls, data: dict) -> "EvalItem":
        """Inverse of :meth:`to_dict` (an image stored as ``"<N bytes>"`` comes back as ``None``)."""
        image = data.get("image")
        if isinstance(image, str) and image.startswith("<") and image.endswith(" bytes>"):
            image = None
        reference = data.get("reference")
        if isinstance(reference, list):
            reference = tuple(reference)
        return cls(
            id=data["id"],
            prompt=data["prompt"],
            image=image,
            image_root=data.get("image_root"),
            reference=reference,
            labels=dict(data.get("labels") or {}),
            subset=data.get("subset") or "all",
            category=data.get("category"),
            metadata=dict(data.get("metadata") or {}),
        )


@dataclass
class ReadReport:
    """What a reader returns: ``items`` and every ``skipped`` entry, for one data source."""

    source: str
    reader: str
    items: list[EvalItem] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.items) + len(self.skipped)

    def extend(self, other: "ReadReport") -> None:
        self.items.extend(other.items)
        self.skipped.extend(other.skipped)

    def by_subset(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for item in self.items:
            counts[item.subset] = counts.get(item.subset, 0) + 1
        return counts

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "reader": self.reader,
            "total": self.total,
            "items": len(self.items),
            "skipped": len(self.skipped),
            "by_subset": self.by_subset(),
            "skipped_items": [{"location": s.location, "reason": s.reason} for s in self.skipped],
        }


__all__ = ["EvalItem", "ReadReport", "Skipped"]
