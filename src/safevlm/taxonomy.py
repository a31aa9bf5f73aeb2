"""Risk taxonomy: risk types and risk levels.

The default follows PSA-VLM (DESIGN.md): seven types, the last one ``safe``, and four
levels (0 safe, 1 may contain risk, 2 contains risk, 3 serious risk). Mappings from other
benchmarks' labels to this taxonomy live in YAML data files (``safevlm/data/mappings``),
never in code branches.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_TYPE_NAMES: tuple[str, ...] = (
    "politics",
    "illegal",
    "insult_bullying",
    "fairness",
    "privacy",
    "misleading",
    "safe",
)
DEFAULT_LEVEL_NAMES: tuple[str, ...] = ("safe", "low", "medium", "high")
LEVEL_DESCRIPTIONS: tuple[str, ...] = (
    "safe",
    "may contain risk",
    "contains risk",
    "serious risk",
)


@dataclass(frozen=True)
class Taxonomy:
    """Names of risk types and risk levels; indices are the class ids the head predicts."""

    type_names: tuple[str, ...] = DEFAULT_TYPE_NAMES
    level_names: tuple[str, ...] = DEFAULT_LEVEL_NAMES
    safe_type: str = "safe"
    _type_index: dict = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "type_names", tuple(self.type_names))
        object.__setattr__(self, "level_names", tuple(self.level_names))
        if len(self.type_names) < 2:
            raise ValueError(f"a taxonomy needs at least 2 risk types, got {list(self.type_names)}")
        if len(set(self.type_names)) != len(self.type_names):
            raise ValueError(f"risk type names must be unique, got {list(self.type_names)}")
        if len(self.level_names) < 2:
            raise ValueError(f"a taxonomy needs at least 2 risk levels, got {list(self.level_names)}")
        if len(set(self.level_names)) != len(self.level_names):
            raise ValueError(f"risk level names must be unique, got {list(self.level_names)}")
        bad = [n for n in (*self.type_names, *self.level_names) if not isinstance(n, str) or not n.strip()]
        if bad:
            raise ValueError(f"risk type and level names must be non-empty strings, got {bad}")
        if self.safe_type not in self.type_names:
            raise ValueError(
                f"safe_type {self.safe_type!r} is not one of the risk types {list(self.type_names)}"
            )
        object.__setattr__(self, "_type_index", {n: i for i, n in enumerate(self.type_names)})

    @property
    def num_types(self) -> int:
        return len(self.type_names)

    @property
    def num_levels(self) -> int:
        return len(self.level_names)

    @property
    def safe_type_id(self) -> int:
        return self._type_index[self.safe_type]

    @property
    def risk_type_names(self) -> tuple[str, ...]:
        """The type names other than ``safe_type``, in id order."""
        return tuple(n for n in self.type_names if n != self.safe_type)

    def type_id(self, name_or_id: str | int) -> int:
        """Type id for a name or an id; raises ``ValueError`` naming the allowed values."""
        if isinstance(name_or_id, bool):
            raise ValueError(f"risk type must be a name or an id, got {name_or_id!r}")
        if isinstance(name_or_id, int):
            if 0 <= name_or_id < self.num_types:
                return name_or_id
            raise ValueError(
                f"risk type id {name_or_id} is out of range 0..{self.num_types - 1} "
                f"({', '.join(self.type_names)})"
            )
        key = str(name_or_id).strip()
        if key in self._type_index:
            return self._type_index[key]
        if key.isdigit():
            return self.type_id(int(key))
        raise ValueError(f"unknown risk type {name_or_id!r}; allowed: {', '.join(self.type_names)}")

    def type_name(self, type_id: int) -> str:
        return self.type_names[self.type_id(int(type_id))]

    def level_id(self, level: str | int) -> int:
        """Level id for a level number or name; raises ``ValueError`` naming the allowed values."""
        if isinstance(level, bool):
            raise ValueError(f"risk level must be a name or an id, got {level!r}")
        if isinstance(level, int):
            if 0 <= level < self.num_levels:
                return level
            raise ValueError(f"risk level {level} is out of range 0..{self.num_levels - 1}")
        key = str(level).strip()
        if key.lstrip("-").isdigit():
            return self.level_id(int(key))
        if key in self.level_names:
            return self.level_names.index(key)
        raise ValueError(
            f"unknown risk level {level!r}; allowed: 0..{self.num_levels - 1} or {', '.join(self.level_names)}"
        )

    def to_dict(self) -> dict:
        return {
            "type_names": list(self.type_names),
            "level_names": list(self.level_names),
            "safe_type": self.safe_type,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Taxonomy":
        return cls(**d)


DEFAULT_TAXONOMY = Taxonomy()

__all__ = ["DEFAULT_LEVEL_NAMES", "DEFAULT_TAXONOMY", "DEFAULT_TYPE_NAMES", "LEVEL_DESCRIPTIONS", "Taxonomy"]
