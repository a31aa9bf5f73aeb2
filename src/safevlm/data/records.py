"""The one record type every reader produces, and the report a load returns.

A :class:`SafetyRecord` is one image-conversation pair with a risk label in the safevlm
taxonomy (``safevlm.taxonomy``). Readers never drop input silently: every source record
either becomes a ``SafetyRecord`` or a :class:`Skipped` entry naming its location
(``file:line`` or ``file[index]``) and the reason, so ``loaded + skipped == total``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from safevlm.taxonomy import DEFAULT_TAXONOMY, Taxonomy

IMAGE_PLACEHOLDER = "<image>"
ROLES: tuple[str, ...] = ("system", "user", "assistant")


class DataFormatError(ValueError):
    """A whole file cannot be read (empty, not JSON, unknown format); names the file and place."""


@dataclass
class Turn:
    """One conversation turn: ``role`` is ``"system"``, ``"user"`` or ``"assistant"``."""

    role: str
    text: str

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"turn role must be one of {', '.join(ROLES)}, got {self.role!r}")
        if not isinstance(self.text, str):
            raise ValueError(f"turn text must be a string, got {type(self.text).__name__}")


def strip_image_placeholder(text: str) -> str:
    """``text`` without the ``<image>`` placeholder and the whitespace around it."""
    if IMAGE_PLACEHOLDER not in text:
        return text.strip()
    parts = [p.strip() for p in text.split(IMAGE_PLACEHOLDER)]
    return "\n".join(p for p in parts if p)


@dataclass
class SafetyRecord:
    """One sample: image, conversation, risk label, provenance.

    Attributes:
        id: identifier, unique within a dataset.
        image: a path relative to an image root (``str``), encoded image bytes, or ``None``
            for a text-only sample. Paths are resolved with :func:`safevlm.data.open_image`,
            which refuses paths that escape the root.
        turns: the conversation; user turns may keep the source's ``<image>`` placeholder.
        risk_level: level id (0 safe, 1 may contain risk, 2 contains risk, 3 serious risk).
        risk_type: type id in the taxonomy (default: 0 politics ... 6 safe).
        source: where the record came from (format name, e.g. ``"vlguard"``).
        metadata: free, JSON-serialisable details (source labels, location, flags).
    """

    id: str
    image: str | bytes | None
    turns: list[Turn]
    risk_level: int
    risk_type: int
    source: str
    metadata: dict = field(default_factory=dict)

    def __post_init__(self):
        self.id = str(self.id)
        self.turns = [t if isinstance(t, Turn) else Turn(**t) for t in self.turns]
        if not any(t.role == "user" for t in self.turns):
            raise ValueError(f"record {self.id!r} has no user turn")
        for name in ("risk_level", "risk_type"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"record {self.id!r}: {name} must be a non-negative int, got {value!r}")
        if self.image is not None and not isinstance(self.image, (str, bytes)):
            raise ValueError(
                f"record {self.id!r}: image must be a relative path, bytes or None, got {type(self.image).__name__}"
            )

    @property
    def prompt(self) -> str:
        """The first user turn's text, without the ``<image>`` placeholder."""
        return strip_image_placeholder(next(t.text for t in self.turns if t.role == "user"))

    @property
    def response(self) -> str | None:
        """The first assistant turn's text, or ``None`` when the record has no answer."""
        return next((t.text for t in self.turns if t.role == "assistant"), None)

    def to_dict(self) -> dict:
        """JSON-friendly dict (bytes images are left as bytes; see ``write_psavlm_jsonl``)."""
        return {
            "id": self.id,
            "image": self.image,
            "turns": [{"role": t.role, "text": t.text} for t in self.turns],
            "risk_level": self.risk_level,
            "risk_type": self.risk_type,
            "source": self.source,
            "metadata": dict(self.metadata),
        }


@dataclass(frozen=True)
class Skipped:
    """A source record that was not loaded: ``location`` (``file:line`` / ``file[i]``) and ``reason``."""

    location: str
    reason: str


@dataclass(frozen=True)
class LoadWarning:
    """Something loaded but worth a look (a label that contradicts itself, a stand-in font):
    ``location`` (``file:line`` / ``file[i]``, or the file) and ``message``."""

    location: str
    message: str


@dataclass
class LoadReport:
    """Result of :func:`safevlm.data.load_records`: loaded records plus every skip, with counts.

    ``total`` is the number of records the source describes (a VLGuard safe image with a
    safe and an unsafe instruction describes two; an RTVLM ``harmful`` line with three
    questions describes three; a line that cannot be parsed counts as one), so
    ``loaded + skipped == total`` always holds. ``warnings`` are about loaded records (they
    are not skipped): labels that contradict themselves, images rendered with a stand-in font.
    """

    path: str
    format: str
    records: list[SafetyRecord] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    taxonomy: Taxonomy = DEFAULT_TAXONOMY
    warnings: list[LoadWarning] = field(default_factory=list)

    @property
    def loaded(self) -> int:
        return len(self.records)

    @property
    def total(self) -> int:
        return len(self.records) + len(self.skipped)

    def by_type(self) -> dict[str, int]:
        """Loaded records per risk type name (every type listed, zeros included)."""
        counts = Counter(r.risk_type for r in self.records)
        return {name: counts.get(i, 0) for i, name in enumerate(self.taxonomy.type_names)}

    def by_level(self) -> dict[str, int]:
        """Loaded records per risk level id (as a string key, every level listed)."""
        counts = Counter(r.risk_level for r in self.records)
        return {str(i): counts.get(i, 0) for i in range(self.taxonomy.num_levels)}

    def to_dict(self) -> dict:
        """The ``safevlm data check --json`` payload."""
        return {
            "path": self.path,
            "format": self.format,
            "total": self.total,
            "loaded": self.loaded,
            "skipped": len(self.skipped),
            "by_type": self.by_type(),
            "by_level": self.by_level(),
            "skipped_records": [{"location": s.location, "reason": s.reason} for s in self.skipped],
            "warnings": len(self.warnings),
            "warning_records": [{"location": w.location, "message": w.message} for w in self.warnings],
        }

    def format_text(self) -> str:
        """Human-readable summary: counts, then every skipped record with location and reason."""
        level_names = self.taxonomy.level_names
        lines = [
            f"{self.path} (format: {self.format})",
            f"  total {self.total}, loaded {self.loaded}, skipped {len(self.skipped)}, warnings {len(self.warnings)}",
            "  by type:  " + ", ".join(f"{k} {v}" for k, v in self.by_type().items()),
            "  by level: " + ", ".join(f"{k} ({level_names[int(k)]}) {v}" for k, v in self.by_level().items()),
        ]
        if self.skipped:
            lines.append(f"  skipped records ({len(self.skipped)}):")
            lines.extend(f"    {s.location}: {s.reason}" for s in self.skipped)
        if self.warnings:
            lines.append(f"  warnings ({len(self.warnings)}, records loaded):")
            lines.extend(f"    {w.location}: {w.message}" for w in self.warnings)
        return "\n".join(lines)


__all__ = [
    "DataFormatError",
    "IMAGE_PLACEHOLDER",
    "LoadReport",
    "LoadWarning",
    "ROLES",
    "SafetyRecord",
    "Skipped",
    "Turn",
    "strip_image_placeholder",
]
