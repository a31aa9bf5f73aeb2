"""Label mapping tables: YAML files under ``safevlm/data/mappings/``, one per source format.

Readers never branch on a source's label names in code; they look the label up in the
table and skip the record (with the reason) when it is not there. Each table is validated
against the taxonomy when it is loaded, so a typo in a type name fails loudly, naming the
file and the entry.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from safevlm.taxonomy import DEFAULT_TAXONOMY, Taxonomy

MAPPINGS_DIR = Path(__file__).with_name("mappings")
MAPPING_NAMES: tuple[str, ...] = ("llava", "psavlm", "rtvlm", "safebench", "vlguard")


def mapping_path(name: str) -> Path:
    """Path of the shipped table ``name`` (one of ``MAPPING_NAMES``)."""
    if name not in MAPPING_NAMES:
        raise ValueError(f"unknown mapping table {name!r}; known: {', '.join(MAPPING_NAMES)}")
    return MAPPINGS_DIR / f"{name}.yaml"


@functools.lru_cache(maxsize=32)
def _read_yaml(path: str, mtime: float) -> dict:
    import yaml

    with open(path, encoding="utf-8") as fh:
        data = yaml.safe_load(fh)
    if not isinstance(data, dict):
        raise ValueError(f"mapping table {path} must be a YAML mapping, got {type(data).__name__}")
    return data


def load_mapping(name_or_path: "str | os.PathLike") -> dict:
    """Read a mapping table: a shipped one by name (``"vlguard"``) or any YAML file by path.

    The returned dict is shared (cached): do not modify it.
    """
    path = (
        Path(name_or_path) if Path(str(name_or_path)).suffix in (".yaml", ".yml") else mapping_path(str(name_or_path))
    )
    if not path.is_file():
        raise FileNotFoundError(f"mapping table not found: {path}")
    return _read_yaml(str(path), path.stat().st_mtime)


def resolve_label(entry: dict, taxonomy: Taxonomy = DEFAULT_TAXONOMY, where: str = "") -> tuple[int, int]:
    """``(risk_type id, risk_level id)`` for a table entry ``{type: name, level: n}``.

    Raises ``ValueError`` naming ``where`` (the table and key) when the entry is malformed or
    names a type or level the taxonomy does not have.
    """
    if not isinstance(entry, dict) or "type" not in entry or "level" not in entry:
        raise ValueError(f"mapping entry {where} must be {{type: <name>, level: <0..3>}}, got {entry!r}")
    try:
        return taxonomy.type_id(entry["type"]), taxonomy.level_id(entry["level"])
    except ValueError as err:
        raise ValueError(f"mapping entry {where}: {err}") from None


def iter_label_entries(name_or_path: "str | os.PathLike") -> list[tuple[str, dict]]:
    """Every ``(key, {type, level})`` entry of a table, for validation and tests."""
    table = load_mapping(name_or_path)
    name = Path(str(name_or_path)).stem
    entries: list[tuple[str, dict]] = []
    if name == "llava":
        entries.append(("label", table["label"]))
    elif name == "vlguard":
        entries.append(("safe", table["safe"]))
        entries.extend((f"unsafe/{k}", v) for k, v in table["unsafe"].items())
        entries.append(("safe_image_unsafe_instruction", table["safe_image_unsafe_instruction"]))
    elif name == "safebench":
        entries.extend((f"categories/{k}", v) for k, v in table["categories"].items())
    elif name == "rtvlm":
        for task, spec in table["tasks"].items():
            levels = [spec["level"]] if "level" in spec else list(table["refusal_levels"].values())
            entries.extend(
                (f"tasks/{task}", {"type": spec["type"], "level": max(lvl, table.get("min_level", 0))})
                for lvl in levels
            )
    elif name == "psavlm":
        entries.extend((f"types/{k}", {"type": v, "level": 0}) for k, v in table["types"].items())
    else:
        raise ValueError(
            f"cannot tell which format the table {name_or_path} is for; name it one of "
            f"{', '.join(n + '.yaml' for n in MAPPING_NAMES)}"
        )
    return entries


def validate_mapping(name_or_path: "str | os.PathLike", taxonomy: Taxonomy = DEFAULT_TAXONOMY) -> int:
    """Check every label entry of a table against ``taxonomy``; returns the number checked."""
    entries = iter_label_entries(name_or_path)
    for key, entry in entries:
        resolve_label(entry, taxonomy, where=f"{Path(str(name_or_path)).stem}:{key}")
    return len(entries)


__all__ = [
    "MAPPINGS_DIR",
    "MAPPING_NAMES",
    "iter_label_entries",
    "load_mapping",
    "mapping_path",
    "resolve_label",
    "validate_mapping",
]
