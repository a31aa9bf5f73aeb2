"""The files a scan writes, how they are appended, read back and summarised.

``scan.jsonl`` (one row per item with a result: ``status`` ``scanned`` or ``duplicate``) and
``failed.jsonl`` (one row per item that could not be used, with ``reason`` and ``error``) are
appended **once per batch, with one write() each** (``O_APPEND``): a process killed with
``kill -9`` leaves whole batches behind it, never half a batch or a line cut short by the
kill. A line cut short anyway (a power cut, a full disk) is dropped when the scan resumes, and
its item is scanned again. An item's id is in exactly one of the two files, once.

Every reader here streams the files (memory grows with the number of distinct images, not
with rows): :func:`read_state` for ``--resume``, :func:`summarize` for ``summary.json`` and
the report.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import math
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from safevlm.errors import UsageError

SCAN_FILE = "scan.jsonl"
FAILED_FILE = "failed.jsonl"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "scan_config.json"
REPORT_FILE = "report.html"
REMOVED_FILE = "removed.jsonl"
HISTOGRAM_BINS = 20

# the fields a duplicate copies from the row of the item it duplicates
RESULT_FIELDS = ("action", "risk_level", "risk_level_name", "risk_type", "risk_score", "flagged", "decided_by",
                 "score", "level_probs", "type_probs", "error")


def dedupe_key(sha256: str | None, prompt: str | None) -> bytes:
    """Items with the same image bytes and the same prompt are one scan (the head reads both)."""
    return hashlib.sha256(json.dumps([sha256, prompt]).encode("utf-8")).digest()


def write_json_atomic(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# -- appending ---------------------------------------------------------------------------------------
class AppendFile:
    """A JSON-lines file appended a batch at a time with a single ``write()``; ``size`` is its
    length in bytes, so a caller knows the offset each row lands at."""

    def __init__(self, path: Path):
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.size = os.fstat(self.fd).st_size

    def append(self, rows: list[dict]) -> list[int]:
        """Append ``rows``; returns the byte offset of each row's line."""
        if not rows:
            return []
        lines = [(json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8") for row in rows]
        offsets, at = [], self.size
        for line in lines:
            offsets.append(at)
            at += len(line)
        data = memoryview(b"".join(lines))
        while data:  # a regular file takes it all at once; loop in case the OS says otherwise
            written = os.write(self.fd, data)
            data = data[written:]
        self.size = at
        return offsets

    def close(self) -> None:
        os.close(self.fd)


def read_row_at(path: Path, offset: int) -> dict:
    with open(path, "rb") as fh:
        fh.seek(offset)
        return json.loads(fh.readline())


def iter_rows(path: Path, repair: bool = False) -> Iterator[tuple[int, dict]]:
    """``(byte offset, row)`` per line of a JSON-lines output file.

    A last line without its newline is a write cut short: with ``repair`` the file is
    truncated before it (its item is scanned again), else it is skipped. A malformed line
    elsewhere is an error naming ``file:line``.
    """
    if not path.is_file():
        return
    with open(path, "rb") as fh:
        offset, lineno = 0, 0
        for raw in fh:
            lineno += 1
            if not raw.endswith(b"\n"):
                if repair:
                    os.truncate(path, offset)
                return
            try:
                row = json.loads(raw)
            except json.JSONDecodeError as err:
                raise UsageError(f"{path}:{lineno}: not a JSON line ({err.msg}); the scan output is damaged") from None
            if not isinstance(row, dict) or "id" not in row:
                raise UsageError(f"{path}:{lineno}: not a scan row (no 'id')")
            yield offset, row
            offset += len(raw)


@dataclass
class ScanState:
    """What an output folder already holds: ids done, and for each (image, prompt) key the
    offset of its scanned row in ``scan.jsonl`` (duplicates copy that row's result)."""

    done: set[str] = field(default_factory=set)
    originals: dict[bytes, int] = field(default_factory=dict)


def read_state(out: Path) -> ScanState:
    """The state of a scan in ``out`` (empty when nothing is there); repairs cut-short lines."""
    state = ScanState()
    for offset, row in iter_rows(out / SCAN_FILE, repair=True):
        _check_new(state, row, out / SCAN_FILE)
        if row.get("status") == "scanned":
            state.originals.setdefault(dedupe_key(row.get("sha256"), row.get("prompt")), offset)
    for _, row in iter_rows(out / FAILED_FILE, repair=True):
        _check_new(state, row, out / FAILED_FILE)
    return state


def _check_new(state: ScanState, row: dict, path: Path) -> None:
    if row["id"] in state.done:
        raise UsageError(f"{path}: item {row['id']!r} appears twice in the scan output; the folder is damaged")
    state.done.add(row["id"])


# -- summary ---------------------------------------------------------------------------------------------
def _blank_source() -> dict:
    return {"total": 0, "scanned": 0, "duplicates": 0, "failed": 0, "flagged": 0}


def summarize(out: Path, taxonomy, top_k: int = 12, listing: dict | None = None) -> tuple[dict, dict]:
    """(summary, report data) from the rows in ``out``, streamed.

    ``summary``: ``total`` = ``scanned + duplicates + failed``; ``flagged`` (rows the clean
    copy would drop); ``by_type`` / ``by_level`` / ``by_action`` over every row with a result
    (scanned and duplicates: a duplicate is still a risky record in the dataset); ``per_source``
    per input; ``failed_by_reason``. Report data: the type x level table, the risk-score
    histogram, the ``top_k`` rows per risk type by that type's score, the first failed rows.
    """
    type_names, level_names = list(taxonomy.type_names), list(taxonomy.level_names)
    counts = Counter()
    by_type = {t: 0 for t in type_names}
    by_level = {str(i): 0 for i in range(len(level_names))}
    by_action = {"allow": 0, "hint": 0, "refuse": 0}
    heat = {t: [0] * len(level_names) for t in type_names}
    histogram = [0] * HISTOGRAM_BINS
    per_source: dict[str, dict] = {}
    tops: dict[str, list] = {t: [] for t in taxonomy.risk_type_names}
    unknown = 0
    for _, row in iter_rows(out / SCAN_FILE):
        status = "duplicates" if row.get("status") == "duplicate" else "scanned"
        counts[status] += 1
        source = per_source.setdefault(row.get("input", ""), _blank_source())
        source[status] += 1
        source["total"] += 1
        if row.get("flagged"):
            counts["flagged"] += 1
            source["flagged"] += 1
        by_action[row["action"]] = by_action.get(row["action"], 0) + 1
        rtype, level = row.get("risk_type"), row.get("risk_level")
        if rtype in by_type and isinstance(level, int) and 0 <= level < len(level_names):
            by_type[rtype] += 1
            by_level[str(level)] += 1
            heat[rtype][level] += 1
        else:
            unknown += 1  # the head failed on this item (fail-closed decision)
        score = row.get("risk_score")
        if isinstance(score, (int, float)) and math.isfinite(score):
            histogram[min(int(score * HISTOGRAM_BINS), HISTOGRAM_BINS - 1)] += 1
        if rtype in tops and row.get("status") == "scanned":
            type_score = type_risk_score(row, rtype, taxonomy)
            entry = (type_score, -row["index"], row)
            heap = tops[rtype]
            if len(heap) < top_k:
                heapq.heappush(heap, entry)
            elif entry[:2] > heap[0][:2]:
                heapq.heapreplace(heap, entry)
    failed_by_reason: Counter = Counter()
    failed_rows = []
    for _, row in iter_rows(out / FAILED_FILE):
        counts["failed"] += 1
        failed_by_reason[row.get("reason", "unknown")] += 1
        source = per_source.setdefault(row.get("input", ""), _blank_source())
        source["failed"] += 1
        source["total"] += 1
        if len(failed_rows) < 200:
            failed_rows.append(row)
    summary = {
        "total": counts["scanned"] + counts["duplicates"] + counts["failed"],
        "scanned": counts["scanned"],
        "duplicates": counts["duplicates"],
        "failed": counts["failed"],
        "flagged": counts["flagged"],
        "head_errors": unknown,
        "by_type": by_type,
        "by_level": by_level,
        "by_action": by_action,
        "failed_by_reason": dict(sorted(failed_by_reason.items())),
        "per_source": {k: per_source[k] for k in sorted(per_source)},
    }
    if listing:
        for name, facts in listing.items():
            summary["per_source"].setdefault(name, _blank_source())["ignored_files"] = facts.get("ignored_files", 0)
        summary["ignored_files"] = sum(f.get("ignored_files", 0) for f in listing.values())
    report = {
        "heat": heat,
        "histogram": histogram,
        "top": {t: [e[2] for e in sorted(h, key=lambda e: e[:2], reverse=True)] for t, h in tops.items()},
        "failed_rows": failed_rows,
    }
    return summary, report


def type_risk_score(row: dict, risk_type: str, taxonomy) -> float:
    """p(type, >= level 1) = P(level >= 1) * P(type | not safe): the policy's quantity at the
    lowest risky level, the score the report ranks a type's images by."""
    level_probs, type_probs = row.get("level_probs") or [], row.get("type_probs") or {}
    if not level_probs or not type_probs:
        return 0.0
    risky = 1.0 - float(type_probs.get(taxonomy.safe_type) or 0.0)
    p_type = float(type_probs.get(risk_type) or 0.0)
    return (1.0 - float(level_probs[0])) * (p_type / risky if risky > 1e-12 else 0.0)


__all__ = [
    "CONFIG_FILE",
    "FAILED_FILE",
    "REMOVED_FILE",
    "REPORT_FILE",
    "RESULT_FIELDS",
    "SCAN_FILE",
    "SUMMARY_FILE",
    "AppendFile",
    "ScanState",
    "dedupe_key",
    "iter_rows",
    "read_row_at",
    "read_state",
    "summarize",
    "type_risk_score",
    "write_json_atomic",
]
