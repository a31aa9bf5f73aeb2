"""Tables in the docs generated from tests: check that the docs hold the current table, or
rewrite it there when ``SAFEVLM_WRITE_DOCS=1`` (how: the command that regenerates it)."""

from __future__ import annotations

import os
from pathlib import Path


def check_generated_table(path: Path, begin: str, end: str, table: str, how: str) -> None:
    """Assert ``path`` holds ``begin + table + end``; with ``SAFEVLM_WRITE_DOCS=1`` write it first."""
    text = path.read_text()
    if os.environ.get("SAFEVLM_WRITE_DOCS") == "1":
        start, stop = text.index(begin) + len(begin), text.index(end)
        path.write_text(text[:start] + table + text[stop:])
        text = path.read_text()
    assert begin + table + end in text, f"{path.name}'s table is stale: run {how}"


__all__ = ["check_generated_table"]
