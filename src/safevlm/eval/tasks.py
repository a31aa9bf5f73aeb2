"""Evaluation tasks as YAML files (the lm-evaluation-harness way) and their registry.

A task file says where the data is and how to read it, how to prompt, how to extract the
answer, how to judge it and which metrics to report (``docs/eval.md`` has the full format)::

    # safevlm eval run --model MODEL --task pope --data-root DATA
    name: pope
    description: POPE object hallucination (COCO), yes/no
    data:
      reader: pope                       # safevlm.eval.readers.READERS
      path: pope/coco_pope_{subset}.json # relative to --data-root; {subset} -> one file per subset
      image_root: coco/val2014           # relative to --data-root (optional)
      options: {}                        # reader options
    subsets: [random, popular, adversarial]
    prompt: "{prompt}\\nAnswer the question using a single word or phrase."
    answer: {extract: pope_yes_no}       # safevlm.eval.extract.EXTRACTORS
    judge: {default: none}               # none | rules | semantic | openai; rules / criteria sets
    generation: {max_new_tokens: 16}     # decoding overrides for this task
    metrics:
      - {metric: pope, higher_is_better: true, group_by: subset}

Shipped tasks live in ``safevlm/eval/tasks/``; :func:`list_tasks` names them and
:func:`load_task` loads one by name or any YAML path. Every mistake in a file is a
:class:`TaskError` naming the file and the field.
"""

from __future__ import annotations

import hashlib
import os
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safevlm.eval.extract import EXTRACTORS
from safevlm.eval.items import EvalItem, ReadReport
from safevlm.eval.judges.base import JUDGES
from safevlm.eval.metrics import METRICS
from safevlm.eval.readers import READERS, reader_subsets

TASKS_DIR = Path(__file__).with_name("tasks")
PACKAGE_DATA_DIR = Path(__file__).with_name("controls")
PACKAGE_PREFIX = "package:"
"""A data path starting with ``package:`` is relative to ``safevlm/eval/controls/`` (data safevlm ships)."""
DATA_ROOT_ENV = "SAFEVLM_DATA_ROOT"
PROMPT_FIELDS = ("prompt", "subset", "category")
GROUP_BY = ("subset", "category")
_TOP_KEYS = ("name", "description", "group", "data", "subsets", "prompt", "answer", "judge", "generation", "metrics")


class TaskError(ValueError):
    """A task file that cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class DataSpec:
    """``reader`` name, data ``path`` and ``image_root`` (relative to the data root unless
    absolute; ``{subset}`` in ``path`` reads one file per subset), reader ``options``."""

    reader: str
    path: str
    image_root: str | None = None
    options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class JudgeSpec:
    """``default`` judge (``none`` for tasks scored without one), the ``rules`` set of the
    rules judge and the ``criteria`` set of LLM-judge rubrics."""

    default: str = "rules"
    rules: str | None = None
    criteria: str | None = None


@dataclass(frozen=True)
class MetricSpec:
    """One metric line: the registered ``metric``, ``higher_is_better`` (``None``: no
    direction), the ``subsets`` it counts (``None``: all), ``group_by`` (``subset`` /
    ``category`` / ``None``), metric ``options`` and an optional ``name`` (default: the metric)."""

    metric: str
    higher_is_better: bool | None
    subsets: tuple[str, ...] | None = None
    group_by: str | None = None
    options: dict = field(default_factory=dict)
    name: str | None = None

    @property
    def key(self) -> str:
        return self.name or self.metric


@dataclass(frozen=True)
class Task:
    """A loaded task file (see the module docstring); ``source`` is the file, ``sha256`` its hash."""

    name: str
    description: str
    data: DataSpec
    metrics: tuple[MetricSpec, ...]
    prompt: str = "{prompt}"
    extract: str = "raw"
    judge: JudgeSpec = field(default_factory=JudgeSpec)
    subsets: tuple[str, ...] | None = None
    group: str | None = None
    generation: dict = field(default_factory=dict)
    source: str = ""
    sha256: str = ""

    # ----------------------------------------------------------------- data

    def data_paths(self, data_root: "str | os.PathLike | None" = None) -> tuple[list[tuple[str | None, Path]], Path | None]:
        """``([(subset or None, data path)], image root)`` resolved against ``data_root``
        (default ``$SAFEVLM_DATA_ROOT`` or the current folder)."""
        root = Path(data_root if data_root is not None else os.environ.get(DATA_ROOT_ENV, "."))

        def resolve(p: str) -> Path:
            if p.startswith(PACKAGE_PREFIX):  # data shipped with safevlm (e.g. the FigStep benign control set)
                return PACKAGE_DATA_DIR / p[len(PACKAGE_PREFIX):]
            p = os.path.expanduser(p)
            return Path(p) if os.path.isabs(p) else root / p

        image_root = resolve(self.data.image_root) if self.data.image_root else None
        if "{subset}" in self.data.path:
            return [(s, resolve(self.data.path.replace("{subset}", s))) for s in (self.subsets or ())], image_root
        return [(None, resolve(self.data.path))], image_root

    def read(self, data_root: "str | os.PathLike | None" = None, subsets: "tuple[str, ...] | None" = None) -> ReadReport:
        """Read the task's items (every skipped entry kept in the report).

        Raises ``FileNotFoundError`` naming the task, its file and the data path when the
        data is not there."""
        from safevlm.eval.readers import read_items

        selected = tuple(subsets) if subsets else self.subsets
        paths, image_root = self.data_paths(data_root)
        report = ReadReport(source=", ".join(str(p) for _, p in paths), reader=self.data.reader)
        for subset, path in paths:
            if subset is not None and selected is not None and subset not in selected:
                continue
            if not path.exists():
                raise FileNotFoundError(
                    f"task {self.name!r} ({self.source}): data not found: {path} (data.path {self.data.path!r}; "
                    f"set --data-root or ${DATA_ROOT_ENV}, or copy the task file and edit data.path)"
                )
            if image_root is not None and not image_root.is_dir():
                raise FileNotFoundError(
                    f"task {self.name!r} ({self.source}): image folder not found: {image_root} (data.image_root {self.data.image_root!r})"
                )
            part = read_items(self.data.reader, path, image_root, self.data.options, (subset,) if subset else selected)
            report.extend(part)
        return report

    def render_prompt(self, item: EvalItem) -> str:
        """The text given to the model for ``item`` (the task's prompt template)."""
        return self.prompt.format_map({"prompt": item.prompt, "subset": item.subset, "category": item.category or ""})

    # ----------------------------------------------------------------- judging

    def rubrics_needed(self) -> dict[str, "set[str] | None"]:
        """Judge rubric -> the subsets whose items need it (``None``: every item)."""
        needed: dict[str, set[str] | None] = {}
        for spec in self.metrics:
            rubric = METRICS[spec.metric].rubric
            if rubric is None:
                continue
            if spec.subsets is None or needed.get(rubric, set()) is None:
                needed[rubric] = None
            else:
                needed.setdefault(rubric, set()).update(spec.subsets)
        return needed

    def to_dict(self) -> dict:
        return {
            "name": self.name, "description": self.description, "group": self.group, "source": self.source,
            "sha256": self.sha256, "reader": self.data.reader, "path": self.data.path, "image_root": self.data.image_root,
            "subsets": list(self.subsets) if self.subsets else None, "extract": self.extract,
            "judge": {"default": self.judge.default, "rules": self.judge.rules, "criteria": self.judge.criteria},
            "metrics": [spec.key for spec in self.metrics], "generation": dict(self.generation),
        }


# --------------------------------------------------------------------------- parsing


def _err(source, where: str, message: str) -> TaskError:
    return TaskError(f"{source}: field {where!r}: {message}")


def _str(data: dict, key: str, source, where: str | None = None, required: bool = True, default=None) -> str | None:
    where = where or key
    if key not in data or data[key] is None:
        if required:
            raise _err(source, where, "missing (required)")
        return default
    value = data[key]
    if not isinstance(value, str) or not value.strip():
        raise _err(source, where, f"must be a non-empty string, got {value!r}")
    return value


def _str_list(value, source, where: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise _err(source, where, f"must be a non-empty list of names, got {value!r}")
    if len(set(value)) != len(value):
        raise _err(source, where, f"lists a name twice: {value!r}")
    return tuple(value)


def _mapping(value, source, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _err(source, where, f"must be a mapping, got {type(value).__name__}")
    return dict(value)


def _parse_metric(raw, i: int, source, subsets: tuple[str, ...] | None) -> MetricSpec:
    where = f"metrics[{i}]"
    if not isinstance(raw, dict):
        raise _err(source, where, f"must be a mapping with metric and higher_is_better, got {raw!r}")
    unknown = set(raw) - {"metric", "higher_is_better", "subsets", "group_by", "options", "name"}
    if unknown:
        raise _err(source, where, f"unknown key(s) {sorted(unknown)}; allowed: metric, higher_is_better, subsets, group_by, options, name")
    metric = _str(raw, "metric", source, f"{where}.metric")
    if metric not in METRICS:
        raise _err(source, f"{where}.metric", f"unknown metric {metric!r}; known: {', '.join(sorted(METRICS))}")
    if "higher_is_better" not in raw:
        raise _err(source, f"{where}.higher_is_better", "missing (true, false, or null for no direction)")
    hib = raw["higher_is_better"]
    if hib is not None and not isinstance(hib, bool):
        raise _err(source, f"{where}.higher_is_better", f"must be true, false or null, got {hib!r}")
    metric_subsets = _str_list(raw.get("subsets"), source, f"{where}.subsets")
    if metric_subsets and subsets is not None:
        stray = [s for s in metric_subsets if s not in subsets]
        if stray:
            raise _err(source, f"{where}.subsets", f"{stray} not among the task's subsets {list(subsets)}")
    group_by = raw.get("group_by")
    if group_by is not None and group_by not in GROUP_BY:
        raise _err(source, f"{where}.group_by", f"must be one of {', '.join(GROUP_BY)} (or absent), got {group_by!r}")
    options = _mapping(raw.get("options"), source, f"{where}.options")
    import inspect

    allowed = [p for p in inspect.signature(METRICS[metric].fn).parameters if p != "outcomes"]
    bad = [k for k in options if k not in allowed]
    if bad:
        raise _err(source, f"{where}.options", f"metric {metric!r} takes no option(s) {bad}; allowed: {allowed or 'none'}")
    name = _str(raw, "name", source, f"{where}.name", required=False)
    return MetricSpec(metric, hib, metric_subsets, group_by, options, name)


def parse_task(data: Any, source: "str | os.PathLike", sha256: str = "") -> Task:
    """A :class:`Task` from a parsed YAML mapping; :class:`TaskError` naming ``source`` and the field."""
    if not isinstance(data, dict):
        raise TaskError(f"{source}: a task file must be a YAML mapping, got {type(data).__name__}")
    unknown = set(data) - set(_TOP_KEYS)
    if unknown:
        raise TaskError(f"{source}: unknown field(s) {sorted(unknown)}; allowed: {', '.join(_TOP_KEYS)}")
    name = _str(data, "name", source)
    description = _str(data, "description", source)
    group = _str(data, "group", source, required=False)

    raw_data = _mapping(data.get("data"), source, "data")
    if not raw_data:
        raise _err(source, "data", "missing (required: reader and path)")
    stray = set(raw_data) - {"reader", "path", "image_root", "options"}
    if stray:
        raise _err(source, "data", f"unknown key(s) {sorted(stray)}; allowed: reader, path, image_root, options")
    reader = _str(raw_data, "reader", source, "data.reader")
    if reader not in READERS:
        raise _err(source, "data.reader", f"unknown reader {reader!r}; known: {', '.join(sorted(READERS))}")
    spec = DataSpec(
        reader=reader,
        path=_str(raw_data, "path", source, "data.path"),
        image_root=_str(raw_data, "image_root", source, "data.image_root", required=False),
        options=_mapping(raw_data.get("options"), source, "data.options"),
    )

    subsets = _str_list(data.get("subsets"), source, "subsets")
    known = reader_subsets(reader)
    if subsets and known is not None:
        stray = [s for s in subsets if s not in known]
        if stray:
            raise _err(source, "subsets", f"unknown subset(s) {stray} for reader {reader!r}; known: {', '.join(known)}")
    if "{subset}" in spec.path and not subsets:
        raise _err(source, "data.path", "uses {subset} but the task lists no subsets")

    prompt = data.get("prompt", "{prompt}")
    if not isinstance(prompt, str) or not prompt.strip():
        raise _err(source, "prompt", f"must be a template string, got {prompt!r}")
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(prompt) if f is not None}
    except ValueError as err:
        raise _err(source, "prompt", f"is not a valid template: {err}") from None
    bad = sorted(f for f in fields if f not in PROMPT_FIELDS)
    if bad:
        raise _err(source, "prompt", f"unknown placeholder(s) {bad}; allowed: {', '.join('{' + f + '}' for f in PROMPT_FIELDS)}")
    if "prompt" not in fields:
        raise _err(source, "prompt", "must contain {prompt} (the item's question)")

    answer = _mapping(data.get("answer"), source, "answer")
    if set(answer) - {"extract"}:
        raise _err(source, "answer", f"unknown key(s) {sorted(set(answer) - {'extract'})}; allowed: extract")
    extract = answer.get("extract", "raw")
    if extract not in EXTRACTORS:
        raise _err(source, "answer.extract", f"unknown extractor {extract!r}; known: {', '.join(sorted(EXTRACTORS))}")

    raw_judge = _mapping(data.get("judge"), source, "judge")
    if set(raw_judge) - {"default", "rules", "criteria"}:
        raise _err(source, "judge", f"unknown key(s) {sorted(set(raw_judge) - {'default', 'rules', 'criteria'})}; allowed: default, rules, criteria")
    default_judge = raw_judge.get("default", "rules")
    if default_judge not in (*JUDGES, "none"):
        raise _err(source, "judge.default", f"unknown judge {default_judge!r}; known: none, {', '.join(sorted(JUDGES))}")
    rules = _str(raw_judge, "rules", source, "judge.rules", required=False)
    if rules is not None:
        from safevlm.eval.refusal import rule_sets

        if rules not in rule_sets():
            raise _err(source, "judge.rules", f"unknown rule set {rules!r}; known: {', '.join(rule_sets())}")
    criteria = _str(raw_judge, "criteria", source, "judge.criteria", required=False)
    if criteria is not None:
        from safevlm.eval.judges.openai_compatible import load_rubrics

        sets = load_rubrics()["criteria"]
        if criteria not in sets:
            raise _err(source, "judge.criteria", f"unknown criteria set {criteria!r}; known: {', '.join(sorted(sets))}")

    generation = _mapping(data.get("generation"), source, "generation")
    for k, v in generation.items():
        if not isinstance(v, (int, float, bool, str)) or v is None:
            raise _err(source, f"generation.{k}", f"must be a number, bool or string, got {v!r}")

    raw_metrics = data.get("metrics")
    if not isinstance(raw_metrics, list) or not raw_metrics:
        raise _err(source, "metrics", "must be a non-empty list of {metric, higher_is_better, ...}")
    metrics = tuple(_parse_metric(m, i, source, subsets) for i, m in enumerate(raw_metrics))
    keys = [m.key for m in metrics]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise _err(source, "metrics", f"metric key(s) {dupes} appear twice; give one a distinct 'name'")
    needs_judge = [m.key for m in metrics if METRICS[m.metric].rubric is not None]
    if needs_judge and default_judge == "none":
        raise _err(source, "judge.default", f"is none, but metric(s) {needs_judge} need a judge's verdicts")
    return Task(
        name=name, description=" ".join(description.split()), data=spec, metrics=metrics, prompt=prompt, extract=extract,
        judge=JudgeSpec(default_judge, rules, criteria), subsets=subsets, group=group, generation=generation,
        source=str(source), sha256=sha256,
    )


def load_task_file(path: "str | os.PathLike") -> Task:
    """Load one task YAML file (a :class:`TaskError` for any mistake, naming the file)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise TaskError(f"task file not found: {path}")
    raw = path.read_bytes()
    try:
        data = yaml.safe_load(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise TaskError(f"{path}: not UTF-8 text (byte {err.start})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        raise TaskError(f"{path}{where}: not valid YAML: {getattr(err, 'problem', None) or err}") from None
    return parse_task(data, path, hashlib.sha256(raw).hexdigest())


def list_tasks() -> list[str]:
    """Names of the shipped tasks (``safevlm/eval/tasks/*.yaml``), sorted."""
    return sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))


def load_task(name_or_path: "str | os.PathLike") -> Task:
    """A shipped task by name (``vlguard``, ``rtvlm_celebrity``, ...) or a task YAML by path."""
    text = str(name_or_path)
    if text.endswith((".yaml", ".yml")) or os.sep in text or Path(text).is_file():
        return load_task_file(text)
    shipped = TASKS_DIR / f"{text}.yaml"
    if shipped.is_file():
        return load_task_file(shipped)
    raise TaskError(f"unknown task {text!r}: not a shipped task (known: {', '.join(list_tasks())}) nor a .yaml file")


def describe_tasks() -> list[dict]:
    """One row per shipped task for ``safevlm eval tasks``: name, description, the reader and
    the data layout it expects, the data path / image root under the data root, subsets,
    metrics and the default judge."""
    from safevlm.eval.readers import READER_LAYOUTS

    rows = []
    for name in list_tasks():
        task = load_task(name)
        rows.append({
            "name": task.name, "description": task.description, "group": task.group, "reader": task.data.reader,
            "layout": READER_LAYOUTS[task.data.reader], "path": task.data.path, "image_root": task.data.image_root,
            "subsets": list(task.subsets) if task.subsets else None, "metrics": [m.key for m in task.metrics],
            "judge": task.judge.default,
        })
    return rows


def task_groups(tasks) -> dict[str, list[str]]:
    """Group name -> member task names (e.g. ``rtvlm`` -> every ``rtvlm_<task>``)."""
    groups: dict[str, list[str]] = {}
    for task in tasks:
        if task.group:
            groups.setdefault(task.group, []).append(task.name)
    return groups


__all__ = [
    "DATA_ROOT_ENV",
    "DataSpec",
    "PACKAGE_DATA_DIR",
    "PACKAGE_PREFIX",
    "JudgeSpec",
    "MetricSpec",
    "TASKS_DIR",
    "Task",
    "TaskError",
    "describe_tasks",
    "list_tasks",
    "load_task",
    "load_task_file",
    "parse_task",
    "task_groups",
]
