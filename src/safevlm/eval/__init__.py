"""Evaluation: tasks as YAML, benchmark readers, metrics, judges, results store, manifests.

* ``safevlm.eval.tasks``    — :func:`list_tasks`, :func:`load_task` (shipped YAML files in ``eval/tasks/``);
* ``safevlm.eval.readers``  — MME, POPE, MM-SafetyBench, HoliSafe, VQA readers (+ ``safevlm.data`` formats);
* ``safevlm.eval.metrics``  — benchmark metrics, head metrics, bootstrap CIs, judge agreement;
* ``safevlm.eval.judges``   — ``rules``, ``semantic``, ``openai`` judges behind one interface;
* ``safevlm.eval.store``    — the SQLite results store; ``safevlm.eval.manifest`` — ``manifest.json``;
* ``safevlm.eval.runner``   — :func:`run_task` / :func:`run_tasks` over a ``generate`` callable;
* ``safevlm.eval.compare``  — :func:`compare_runs`, the paper-style table with deltas;
* ``safevlm.eval.refusal``  — the refusal phrase rules;
* ``safevlm.eval.generation`` — the systems evaluated (base, base + adapter, + policy): :func:`load_system`;
* ``safevlm.eval.evaluate`` — :func:`run_evaluation` (what ``safevlm eval run`` does), judges from flags;
* ``safevlm.eval.report``   — ``report.md`` / ``report.html`` of a run folder;
* ``safevlm.eval.sweep``    — refuse-threshold sweeps and a policy for a target over-refusal;
* ``safevlm.eval.calibrate`` — temperature scaling of the safety head, written into the adapter;
* ``safevlm.eval.demo_section`` — the demo's evaluation (demo_heldout, FigStep, benign control);
* ``safevlm.eval.ratings``  — human / judge / head ratings (JSONL, annotate store, run folders);
* ``safevlm.eval.agreement`` — kappa, weighted kappa, Krippendorff's alpha with bootstrap CIs.

See ``docs/eval.md``. Submodules are imported on first use.
"""

from __future__ import annotations

from safevlm.eval.refusal import RefusalRules, is_refusal

_LAZY = {
    "calibrate": "safevlm.eval.calibrate",
    "compare_runs": "safevlm.eval.compare",
    "list_tasks": "safevlm.eval.tasks",
    "load_system": "safevlm.eval.generation",
    "load_task": "safevlm.eval.tasks",
    "make_judge": "safevlm.eval.judges",
    "ResultsStore": "safevlm.eval.store",
    "RunKey": "safevlm.eval.store",
    "run_evaluation": "safevlm.eval.evaluate",
    "run_task": "safevlm.eval.runner",
    "run_tasks": "safevlm.eval.runner",
    "write_report": "safevlm.eval.report",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'safevlm.eval' has no attribute {name!r}")


__all__ = [
    "RefusalRules",
    "ResultsStore",
    "RunKey",
    "calibrate",
    "compare_runs",
    "is_refusal",
    "list_tasks",
    "load_system",
    "load_task",
    "make_judge",
    "run_evaluation",
    "run_task",
    "run_tasks",
    "write_report",
]
