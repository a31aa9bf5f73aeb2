"""The evaluation loop: read a task, generate what is missing, judge what is missing, score.

The model side is one callable, so the loop knows nothing about models::

    generate(requests: Sequence[GenerationRequest]) -> Sequence[Generation]

A request carries the item (its image is referenced, and opened by the callable with
:func:`safevlm.data.open_image`), the prompt rendered from the task's template and the
task's decoding overrides; a :class:`Generation` is the answer text, the safety head's
output (``None`` for a base model) and an error (the answer is then ``None``). The
``safevlm eval run`` command builds this callable from a base model, an adapter and a
policy (batched guarded generation); tests pass a fake.

:func:`run_task` stores every batch of answers and every verdict as it arrives in the
:class:`~safevlm.eval.store.ResultsStore`, so a killed run resumes where it stopped:
items with a stored answer are not generated again, verdicts already stored are not
asked again. Metrics take each rubric's verdicts from the first judge that supports it
(``[rules, openai]``: refusals from the rules, 1–10 scores from the LLM); with two judges
giving the same rubric, their agreement is reported ("judge the judge").
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from safevlm.data import Skipped
from safevlm.eval.items import EvalItem
from safevlm.eval.judges.base import Judge, Judgement, JudgeRequest
from safevlm.eval.manifest import (
    MANIFEST_NAME,
    manifest_differences,
    merge_manifests,
    read_manifest,
    write_json_atomic,
)
from safevlm.eval.metrics import MetricResult, Outcome, compute_metrics, judge_agreement
from safevlm.eval.store import ResultsStore, RunKey
from safevlm.eval.tasks import Task, task_groups

RESULTS_NAME = "results.sqlite"
METRICS_NAME = "metrics.json"


@dataclass(frozen=True)
class GenerationRequest:
    """One query for the model: the ``item``, the rendered ``prompt``, decoding overrides."""

    item: EvalItem
    prompt: str
    generation: dict = field(default_factory=dict)


@dataclass
class Generation:
    """The model's result for one request: ``text`` (``None`` if it failed: ``error``) and
    the safety head's output (``{"action", "risk_level", "risk_type", "level_probs",
    "type_probs", ...}`` as ``GuardedResult.to_dict()`` gives it, or ``None``)."""

    text: str | None
    head: dict | None = None
    error: str | None = None


GenerateFn = Callable[[Sequence[GenerationRequest]], Sequence[Generation]]


class RunMismatch(ValueError):
    """The run folder holds a run of another model / adapter / policy / decoding / judge / task file."""


@dataclass
class TaskResult:
    """A task's outcome: items read (``n``), ``answered``, ``skipped`` by the reader,
    ``unjudged`` (items with a verdict the metrics could not use), the metrics, the judges
    that gave each rubric, and the agreement between judges."""

    task: str
    n: int
    answered: int
    skipped: int
    unjudged: int
    metrics: dict[str, MetricResult]
    metric_specs: dict = field(default_factory=dict)
    judges: dict[str, str] = field(default_factory=dict)
    agreement: dict = field(default_factory=dict)
    skipped_items: list[Skipped] = field(default_factory=list)

    def to_dict(self, skipped_limit: int = 50) -> dict:
        metrics = {}
        for key, result in self.metrics.items():
            d = result.to_dict()
            d["metric"], d["higher_is_better"] = self.metric_specs.get(key, (key, None))
            metrics[key] = d
        return {
            "n": self.n, "answered": self.answered, "skipped": self.skipped, "unjudged": self.unjudged,
            "metrics": metrics, "judges": dict(self.judges), "agreement": self.agreement,
            "skipped_items": [{"location": s.location, "reason": s.reason} for s in self.skipped_items[:skipped_limit]],
        }


def _batches(items: Sequence, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _judge_prompt(item: EvalItem, prompt: str) -> str:
    """What the judge sees as the request: the model's prompt plus, where the request was
    carried by the image (FigStep, MM-SafetyBench), the text the image holds."""
    context = item.metadata.get("judge_context")
    return f"{prompt}\n\n[Context for the judge: {context}]" if context else prompt


def _reference_text(item: EvalItem) -> str | None:
    ref = item.reference
    return ref[0] if isinstance(ref, tuple) and ref else (ref if isinstance(ref, str) else None)


def run_task(task: Task, generate: GenerateFn, store: ResultsStore, key: RunKey, judges: Sequence[Judge] = (), *,
             data_root: "str | os.PathLike | None" = None, batch_size: int = 8, limit: int | None = None,
             subsets: Sequence[str] | None = None, retry_unjudged: bool = False,
             progress: Callable[[str, int, int], None] | None = None) -> TaskResult:
    """Evaluate one task, resuming whatever ``store`` already holds for ``key``.

    Args:
        task: the loaded task.
        generate: the model callable (see the module docstring).
        store: the results store; ``key``: which model / adapter / policy the answers are from.
        judges: judges in priority order (each rubric's verdicts come from the first that supports it).
        data_root: the folder the task's data paths are relative to.
        batch_size: requests per ``generate`` call (one stored transaction each).
        limit: evaluate only the first ``limit`` items read.
        subsets: evaluate only these subsets (default: the task's).
        retry_unjudged: ask again for stored ``unjudged`` verdicts (failed / unparseable).
        progress: ``progress(stage, done, total)`` callback (``stage``: ``generate`` or ``judge:<id>``).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    report = task.read(data_root, tuple(subsets) if subsets else None)
    items = report.items[:limit] if limit is not None else report.items
    store.replace_skipped(key, task.name, report.skipped)

    # ---- generation: only items without a stored answer
    done = store.answered_ids(key, task.name)
    todo = [item for item in items if item.id not in done]
    finished = len(items) - len(todo)
    for batch in _batches(todo, batch_size):
        requests = [GenerationRequest(item, task.render_prompt(item), dict(task.generation)) for item in batch]
        results = list(generate(requests))
        if len(results) != len(requests):
            raise RuntimeError(f"generate returned {len(results)} results for {len(requests)} requests")
        store.put_answers(key, task.name, [
            (r.item, r.prompt, g.text if g.error is None else None, g.head, g.error) for r, g in zip(requests, results)
        ])
        finished += len(batch)
        if progress:
            progress("generate", finished, len(items))

    stored = store.answers(key, task.name)
    wanted = {item.id for item in items}
    answers = {i: a for i, a in stored.items() if i in wanted}

    # ---- judging: only (item, rubric) pairs without a stored verdict
    needed = task.rubrics_needed()
    for judge in judges:
        for rubric, rubric_subsets in needed.items():
            if not judge.supports(rubric):
                continue
            have = store.judged_ids(key, task.name, judge.id, rubric, include_unjudged=not retry_unjudged)
            pending = [a for i, a in answers.items() if a.answer is not None and i not in have
                       and (rubric_subsets is None or a.item.subset in rubric_subsets)]
            if rubric == "helpfulness":
                pending = [a for a in pending if _reference_text(a.item)]
            requests = [
                JudgeRequest(rubric, _judge_prompt(a.item, a.prompt), a.answer, a.item.category, _reference_text(a.item),
                             task.judge.criteria, task.judge.rules)
                for a in pending
            ]
            for count, (index, verdict) in enumerate(judge.judge_many(requests), start=1):
                store.put_judgement(key, task.name, pending[index].item.id, judge.id, rubric, verdict)
                if progress:
                    progress(f"judge:{judge.id}", count, len(requests))

    # ---- metrics: each rubric from the first judge supporting it
    verdicts = {judge.id: store.judgements(key, task.name, judge.id) for judge in judges}
    primary = {rubric: next((j.id for j in judges if j.supports(rubric)), None) for rubric in needed}
    outcomes = []
    unjudged_items = set()
    for item_id, a in answers.items():
        judged: dict[str, Judgement] = {}
        for rubric, judge_id in primary.items():
            verdict = verdicts.get(judge_id, {}).get((item_id, rubric)) if judge_id else None
            if verdict is not None:
                judged[rubric] = verdict
                if verdict.status != "ok":
                    unjudged_items.add(item_id)
        outcomes.append(Outcome(a.item, a.answer, judged, a.head, a.error))
    metrics = compute_metrics(task, outcomes)

    agreement = {}
    for rubric in needed:
        givers = [j for j in judges if j.supports(rubric)]
        for i, first in enumerate(givers):
            for second in givers[i + 1:]:
                mine = {k[0]: v for k, v in verdicts[first.id].items() if k[1] == rubric and k[0] in answers}
                theirs = {k[0]: v for k, v in verdicts[second.id].items() if k[1] == rubric and k[0] in answers}
                field_name = "refused" if rubric == "classify" else "score"
                agreement[f"{rubric}: {first.id} vs {second.id}"] = judge_agreement(mine, theirs, field_name)

    return TaskResult(
        task=task.name, n=len(items), answered=sum(a.answer is not None for a in answers.values()),
        skipped=len(report.skipped), unjudged=len(unjudged_items), metrics=metrics,
        metric_specs={s.key: (s.metric, s.higher_is_better) for s in task.metrics},
        judges={r: j for r, j in primary.items() if j}, agreement=agreement, skipped_items=list(report.skipped),
    )


def group_summary(tasks: Sequence[Task], results: dict[str, dict]) -> dict[str, dict]:
    """Per task group (e.g. ``rtvlm``): the unweighted mean over member tasks of each
    single-valued metric every member reports (RTVLM's overall score)."""
    out = {}
    for group, members in task_groups(tasks).items():
        present = [m for m in members if m in results]
        if not present:
            continue
        keys = set.intersection(*(set(results[m]["metrics"]) for m in present))
        metrics = {}
        for k in sorted(keys):
            values = [results[m]["metrics"][k].get("value") for m in present]
            if any(v is None for v in values) or "value" not in results[present[0]]["metrics"][k]:
                continue
            first = results[present[0]]["metrics"][k]
            metrics[k] = {"value": sum(values) / len(values), "n": len(values), "unjudged": 0,
                          "metric": first.get("metric", k), "higher_is_better": first.get("higher_is_better")}
        out[group] = {"tasks": present, "metrics": metrics}
    return out


def run_tasks(tasks: Sequence[Task], generate: GenerateFn, out_dir: "str | os.PathLike", key: RunKey, manifest: dict,
              judges: Sequence[Judge] = (), **options) -> dict:
    """Evaluate several tasks into one run folder: ``manifest.json``, ``results.sqlite``,
    ``metrics.json``. A folder holding a different run (:func:`manifest_differences`) is
    refused with :class:`RunMismatch`; the same run resumes. ``options`` go to :func:`run_task`.

    Returns the ``metrics.json`` payload: ``{"run", "tasks": {name: {n, answered, skipped,
    unjudged, metrics, ...}}, "groups": {...}}``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / MANIFEST_NAME
    if manifest_path.exists():
        old = read_manifest(out)
        diffs = manifest_differences(old, manifest)
        if diffs:
            raise RunMismatch(f"{out} holds another run; choose another --out or remove it. Differences: " + "; ".join(diffs))
        manifest = merge_manifests(old, manifest)
    write_json_atomic(manifest_path, manifest)
    payload_path = out / METRICS_NAME
    previous = {}
    if payload_path.exists():
        import json

        previous = json.loads(payload_path.read_text(encoding="utf-8")).get("tasks", {})
    results = dict(previous)
    payload = {"run": {"model": key.model, "adapter": key.adapter, "policy": key.policy}, "tasks": results,
               "groups": group_summary(tasks, results)}
    with ResultsStore(out / RESULTS_NAME) as store:
        for task in tasks:
            results[task.name] = run_task(task, generate, store, key, judges, **options).to_dict()
            payload = {"run": {"model": key.model, "adapter": key.adapter, "policy": key.policy}, "tasks": results,
                       "groups": group_summary(tasks, results)}
            write_json_atomic(payload_path, payload)
    return payload


__all__ = [
    "GenerateFn",
    "Generation",
    "GenerationRequest",
    "METRICS_NAME",
    "RESULTS_NAME",
    "RunMismatch",
    "TaskResult",
    "group_summary",
    "run_task",
    "run_tasks",
]
