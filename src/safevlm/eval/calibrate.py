"""Temperature scaling of the safety head (Guo et al. 2017), fitted on a validation task.

The head's probabilities are ``softmax(logits / T)`` with one temperature for the level
classifier and one for the type classifier (buffers ``level_temperature`` and
``type_temperature`` of :class:`~safevlm.modules.head.SafetyHead`, saved in the adapter's
``safety_model.safetensors``). Calibration:

1. runs the guard (:func:`safevlm.guarded.classify`: one vision pass, the head; the LLM
   never runs) on the labelled items of a validation task and recovers the logits up to
   a constant from the probabilities, ``logits = T_now · log p`` (a softmax does not change
   when a constant is added to every logit, so this is exact for temperature scaling;
   probabilities below float32's range are clamped to 1e-45);
2. fits each temperature by minimising the negative log-likelihood of the labels — a
   convex problem in ``1/T``, solved by golden-section search on ``log T`` in [1e-2, 1e2];
3. reports the expected calibration error (:func:`safevlm.eval.metrics.expected_calibration_error`,
   the ``head_ece`` metric: top-class confidence, 15 bins) before and after, on the fitting
   items and, when given, on a held-out task;
4. writes the two temperatures into the adapter's ``safety_model.safetensors`` (every other
   tensor and the file's metadata kept; written to a temporary file and renamed) and a
   ``calibration.json`` beside it saying what was fitted on what.

Temperature scaling never changes the head's top prediction (accuracy and AUROC stay the
same); it changes how confident the probabilities are, which is what policy thresholds read.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from safevlm.errors import UsageError

CALIBRATION_NAME = "calibration.json"
TEMPERATURE_KEYS = {"level": "safety_head.level_temperature", "type": "safety_head.type_temperature"}
_MIN_PROB = 1e-45
_LOG_T_RANGE = (math.log(1e-2), math.log(1e2))


@dataclass
class HeadLogits:
    """Recovered logits and labels of labelled items: ``level`` (n, num_levels), ``type``
    (n, num_types), ``level_labels`` / ``type_labels`` (n,) ids; ``skipped`` counts items
    without labels or whose image could not be opened."""

    level: np.ndarray
    type: np.ndarray
    level_labels: np.ndarray
    type_labels: np.ndarray
    ids: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of ``labels`` under ``softmax(logits / temperature)``."""
    return float(-_log_softmax(logits / temperature)[np.arange(len(labels)), labels].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray, iterations: int = 100) -> float:
    """The temperature minimising :func:`nll` (golden-section search on ``log T`` in [1e-2, 1e2])."""
    if len(labels) == 0:
        raise ValueError("cannot fit a temperature on no items")
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    lo, hi = _LOG_T_RANGE
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = nll(logits, labels, math.exp(a)), nll(logits, labels, math.exp(b))
    for _ in range(iterations):
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = nll(logits, labels, math.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = nll(logits, labels, math.exp(b))
    return float(math.exp((lo + hi) / 2))


def ece(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0, bins: int = 15) -> float | None:
    """ECE of the top-class confidence of ``softmax(logits / temperature)`` (the ``head_ece`` metric)."""
    from safevlm.eval.metrics import expected_calibration_error

    if len(labels) == 0:
        return None
    probs = np.exp(_log_softmax(np.asarray(logits, dtype=np.float64) / temperature))
    return expected_calibration_error(probs.max(axis=1).tolist(), (probs.argmax(axis=1) == labels).tolist(), bins)


def head_temperatures(model) -> dict[str, float]:
    """The head's current ``{"level": T, "type": T}``."""
    head = model.safety_head
    return {"level": float(head.level_temperature), "type": float(head.type_temperature)}


def collect_logits(model, processor, items, prompts, batch_size: int = 16) -> HeadLogits:
    """Guard-mode logits (recovered from the head's probabilities) and labels of the
    labelled ``items`` (``labels.risk_level`` and ``labels.risk_type``); ``prompts``: the
    text given with each item (the task's prompt template)."""
    from safevlm.eval.generation import _open
    from safevlm.guarded import classify
    from safevlm.policy import load_policy

    taxonomy = model.config.taxonomy
    temps = head_temperatures(model)
    policy = load_policy("default", taxonomy)
    level, type_, level_labels, type_labels, ids, skipped = [], [], [], [], [], []
    chosen = []
    for item, prompt in zip(items, prompts):
        labels = item.labels
        if labels.get("risk_level") is None or labels.get("risk_type") is None:
            skipped.append(f"{item.id}: no risk_level / risk_type label")
            continue
        chosen.append((item, prompt))
    for start in range(0, len(chosen), batch_size):
        batch, images = [], []
        for item, prompt in chosen[start:start + batch_size]:
            try:
                images.append(_open(item))
                batch.append((item, prompt))
            except (ValueError, OSError) as err:
                skipped.append(f"{item.id}: {err}")
        if not batch:
            continue
        decisions = classify(model, processor, images, [p for _, p in batch], policy)
        for (item, _), d in zip(batch, decisions):
            if d.error is not None:
                skipped.append(f"{item.id}: head output unusable ({d.error})")
                continue
            level.append(temps["level"] * np.log(np.maximum(np.asarray(d.level_probs, dtype=np.float64), _MIN_PROB)))
            type_.append(temps["type"] * np.log(np.maximum(np.asarray([p for _, p in d.type_probs], dtype=np.float64), _MIN_PROB)))
            level_labels.append(taxonomy.level_id(item.labels["risk_level"]))
            type_labels.append(taxonomy.type_id(item.labels["risk_type"]))
            ids.append(item.id)
    if not ids:
        raise UsageError("no labelled items to calibrate on (items need risk_level and risk_type labels)"
                         + (f"; {len(skipped)} skipped, e.g. {skipped[0]}" if skipped else ""))
    return HeadLogits(np.stack(level), np.stack(type_), np.asarray(level_labels), np.asarray(type_labels), ids, skipped)


@dataclass
class CalibrationResult:
    """Fitted temperatures, the previous ones, and ECE / NLL before and after, on the fitting
    items (``fit``) and on held-out items (``heldout``, when given)."""

    temperatures: dict[str, float]
    previous: dict[str, float]
    fit: dict
    heldout: dict | None = None
    task: str | None = None
    heldout_task: str | None = None
    adapter: str | None = None
    written: bool = False
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _scores(data: HeadLogits, before: dict[str, float], after: dict[str, float]) -> dict:
    """ECE and NLL per classifier at the ``before`` and ``after`` temperatures."""
    out: dict = {"n": len(data)}
    for name, logits, labels in (("level", data.level, data.level_labels), ("type", data.type, data.type_labels)):
        out[name] = {
            "ece_before": ece(logits, labels, before[name]),
            "ece_after": ece(logits, labels, after[name]),
            "nll_before": nll(logits, labels, before[name]),
            "nll_after": nll(logits, labels, after[name]),
        }
    return out


def fit(model, fit_data: HeadLogits, heldout: HeadLogits | None = None) -> CalibrationResult:
    """Fit both temperatures on ``fit_data`` (the head's raw logits, up to a constant per row)."""
    previous = head_temperatures(model)
    temps = {"level": fit_temperature(fit_data.level, fit_data.level_labels),
             "type": fit_temperature(fit_data.type, fit_data.type_labels)}
    return CalibrationResult(
        temperatures=temps, previous=previous, fit=_scores(fit_data, previous, temps),
        heldout=None if heldout is None else _scores(heldout, previous, temps),
    )


def write_temperatures(adapter_dir: "str | os.PathLike", temperatures: dict[str, float], info: dict | None = None) -> Path:
    """Write ``temperatures`` (``{"level", "type"}``) into ``adapter_dir/safety_model.safetensors``
    (other tensors and metadata unchanged; atomic) and ``calibration.json`` beside it."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from safevlm.model import WEIGHTS_NAME

    path = Path(adapter_dir) / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in the adapter folder {adapter_dir}")
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    state = load_file(str(path))
    for name, key in TEMPERATURE_KEYS.items():
        if key not in state:
            raise ValueError(f"{path}: no {key} tensor (an adapter saved without temperature buffers)")
        value = float(temperatures[name])
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"temperature {name} must be a positive number, got {value}")
        state[key] = torch.tensor(value, dtype=state[key].dtype)
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    record = {"temperatures": dict(temperatures), "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **(info or {})}
    json_tmp = path.with_name(CALIBRATION_NAME + ".tmp")
    json_tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    os.replace(json_tmp, path.with_name(CALIBRATION_NAME))
    return path


def calibrate(model, processor, task, *, adapter_dir: "str | os.PathLike | None" = None, data_root=None,
              limit: int | None = None, heldout_task=None, heldout_root=None, batch_size: int = 16,
              write: bool = True) -> CalibrationResult:
    """Fit the head's temperatures on ``task``'s labelled items, measure ECE before / after
    (and on ``heldout_task``), and write them into ``adapter_dir`` (with ``write``); the
    model's head takes the new temperatures too."""
    import torch

    def gather(t, root):
        report = t.read(root)
        items = report.items[:limit] if limit is not None else report.items
        return collect_logits(model, processor, items, [t.render_prompt(i) for i in items], batch_size)

    fit_data = gather(task, data_root)
    held = gather(heldout_task, heldout_root if heldout_root is not None else data_root) if heldout_task is not None else None
    result = fit(model, fit_data, held)
    result.task, result.heldout_task = task.name, None if heldout_task is None else heldout_task.name
    for name, value in result.temperatures.items():
        if abs(math.log(value) - _LOG_T_RANGE[1]) < 0.01:
            result.notes.append(f"the {name} temperature reached the search bound {math.exp(_LOG_T_RANGE[1]):g}: on "
                                f"{task.name} the head's {name} predictions are no better than a uniform guess")
        elif abs(math.log(value) - _LOG_T_RANGE[0]) < 0.01:
            result.notes.append(f"the {name} temperature reached the search bound {math.exp(_LOG_T_RANGE[0]):g}")
    if write:
        if adapter_dir is None:
            raise UsageError("writing the temperatures needs the adapter folder")
        write_temperatures(adapter_dir, result.temperatures, {
            "task": task.name, "task_sha256": task.sha256, "n": len(fit_data), "previous": result.previous,
            "fit": result.fit, "heldout_task": result.heldout_task, "heldout": result.heldout,
        })
        result.adapter, result.written = str(adapter_dir), True
    head = model.safety_head
    with torch.no_grad():
        head.level_temperature.fill_(result.temperatures["level"])
        head.type_temperature.fill_(result.temperatures["type"])
    return result


__all__ = [
    "CALIBRATION_NAME",
    "CalibrationResult",
    "HeadLogits",
    "calibrate",
    "collect_logits",
    "ece",
    "fit",
    "fit_temperature",
    "head_temperatures",
    "nll",
    "write_temperatures",
]
