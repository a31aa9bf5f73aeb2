"""Compare two run folders: the paper-style table (base vs adapter, per task) with deltas.

Runs judged by different judges (name, base URL, model, rubric version hash, rule set)
are not comparable: :func:`compare_runs` raises :class:`CompareError` saying what differs,
unless ``force=True`` (the table then carries the warning). Differences in decoding or
task files are reported as notes.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from safevlm.eval.manifest import judge_identity, read_manifest
from safevlm.eval.metrics import flatten, metric_info
from safevlm.eval.runner import METRICS_NAME


class CompareError(ValueError):
    """The runs cannot be compared (different judges or rubrics) without ``force``."""


@dataclass(frozen=True)
class CompareRow:
    """One table line: ``task``, flat ``metric`` key, values ``a`` / ``b``, ``delta`` = b − a,
    ``better``: True if B improves on A (by the metric's direction), False if worse, None
    when the metric has no direction or a value is missing."""

    task: str
    metric: str
    a: float | None
    b: float | None
    delta: float | None
    better: bool | None
    unit: str = "rate"


@dataclass
class Comparison:
    label_a: str
    label_b: str
    rows: list[CompareRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"a": self.label_a, "b": self.label_b, "notes": list(self.notes),
                "rows": [row.__dict__ for row in self.rows]}

    def format_markdown(self, top_level_only: bool = False) -> str:
        """A markdown table: ``| task | metric | A | B | Δ |``; rates in %, Δ marked ▲ better / ▼ worse."""
        lines = [f"| task | metric | {self.label_a} | {self.label_b} | Δ |", "|---|---|---:|---:|---:|"]
        for row in self.rows:
            if top_level_only and "/" in row.metric:
                continue
            mark = {True: " ▲", False: " ▼", None: ""}[row.better]
            delta = "" if row.delta is None else _fmt(row.delta, row.unit, signed=True) + mark
            lines.append(f"| {row.task} | {row.metric} | {_fmt(row.a, row.unit)} | {_fmt(row.b, row.unit)} | {delta} |")
        text = "\n".join(lines)
        if self.notes:
            text += "\n\n" + "\n".join(f"- {n}" for n in self.notes)
        return text


def _fmt(value, unit: str, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    sign = "+" if signed else ""
    if unit == "rate":
        return f"{100 * value:{sign}.1f}%" if not signed else f"{100 * value:{sign}.1f} pt"
    if unit == "score":
        return f"{value:{sign}.2f}"
    return f"{value:{sign}.3f}"


def load_run(run_dir: "str | os.PathLike") -> tuple[dict, dict]:
    """``(manifest, metrics payload)`` of a run folder."""
    manifest = read_manifest(run_dir)
    path = Path(run_dir) / METRICS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no {METRICS_NAME} (the run has not finished a task yet)")
    return manifest, json.loads(path.read_text(encoding="utf-8"))


def _label(manifest: dict, payload: dict, fallback: str) -> str:
    run = payload.get("run") or {}
    parts = [Path(run.get("model") or manifest.get("model", {}).get("path") or fallback).name]
    if run.get("adapter"):
        parts.append(f"+{Path(run['adapter']).name}")
    if run.get("policy"):
        parts.append(f"+policy {Path(run['policy']).stem}")
    return " ".join(parts)


def judge_differences(manifest_a: dict, manifest_b: dict) -> list[str]:
    """Why the two runs' judges differ (empty when they are the same judges with the same rubric)."""
    a = sorted((judge_identity(j) for j in manifest_a.get("judges", [])), key=lambda d: json.dumps(d, sort_keys=True))
    b = sorted((judge_identity(j) for j in manifest_b.get("judges", [])), key=lambda d: json.dumps(d, sort_keys=True))
    if a == b:
        return []
    diffs = []
    by_id_a, by_id_b = {j.get("id"): j for j in a}, {j.get("id"): j for j in b}
    for jid in sorted(set(by_id_a) | set(by_id_b), key=str):
        ja, jb = by_id_a.get(jid), by_id_b.get(jid)
        if ja is None or jb is None:
            diffs.append(f"judge {jid} is used only in run {'B' if ja is None else 'A'}")
            continue
        for k in sorted(set(ja) | set(jb)):
            if ja.get(k) != jb.get(k):
                diffs.append(f"judge {jid}: {k} {ja.get(k)!r} (A) != {jb.get(k)!r} (B)")
    return diffs


def compare_runs(run_a: "str | os.PathLike", run_b: "str | os.PathLike", force: bool = False,
                 label_a: str | None = None, label_b: str | None = None) -> Comparison:
    """The comparison of two run folders (A = baseline, B = candidate; Δ = B − A).

    Raises :class:`CompareError` when the judges or their rubrics differ, unless ``force``."""
    manifest_a, payload_a = load_run(run_a)
    manifest_b, payload_b = load_run(run_b)
    diffs = judge_differences(manifest_a, manifest_b)
    if diffs and not force:
        raise CompareError(
            f"runs {run_a} and {run_b} were judged differently, so their numbers are not comparable: "
            + "; ".join(diffs) + " (pass --force to compare anyway)"
        )
    comparison = Comparison(label_a or _label(manifest_a, payload_a, "A"), label_b or _label(manifest_b, payload_b, "B"))
    if diffs:
        comparison.notes.append("forced: the runs were judged differently — " + "; ".join(diffs))
    if manifest_a.get("decoding") != manifest_b.get("decoding"):
        comparison.notes.append(f"decoding differs: {manifest_a.get('decoding')} (A) vs {manifest_b.get('decoding')} (B)")
    for name in sorted(set(manifest_a.get("tasks", {})) & set(manifest_b.get("tasks", {}))):
        if manifest_a["tasks"][name].get("sha256") != manifest_b["tasks"][name].get("sha256"):
            comparison.notes.append(f"task {name}: the task files differ between the runs")

    def sections(payload):
        out = dict(payload.get("tasks", {}))
        for group, summary in (payload.get("groups") or {}).items():
            out[f"{group} (mean of {len(summary['tasks'])} tasks)"] = summary
        return out

    tasks_a, tasks_b = sections(payload_a), sections(payload_b)
    for task in sorted(set(tasks_a) | set(tasks_b), key=lambda t: (" (mean of" in t, t)):
        metrics_a = (tasks_a.get(task) or {}).get("metrics", {})
        metrics_b = (tasks_b.get(task) or {}).get("metrics", {})
        flat_a, flat_b = flatten(metrics_a), flatten(metrics_b)
        info = {**metric_info(metrics_a), **metric_info(metrics_b)}
        for key in list(dict.fromkeys([*flat_a, *flat_b])):
            a, b = flat_a.get(key), flat_b.get(key)
            delta = None if a is None or b is None else b - a
            direction = info.get(key, {}).get("higher_is_better")
            better = None if delta is None or direction is None or delta == 0 else (delta > 0) == direction
            comparison.rows.append(CompareRow(task, key, a, b, delta, better, info.get(key, {}).get("unit", "number")))
        if task not in tasks_a or task not in tasks_b:
            comparison.notes.append(f"task {task} is only in run {'A' if task in tasks_a else 'B'}")
    return comparison


__all__ = ["CompareError", "CompareRow", "Comparison", "compare_runs", "judge_differences", "load_run"]
