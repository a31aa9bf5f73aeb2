"""Per-head metrics of the safety head: accuracy and macro-F1 for risk level and risk type."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def accuracy(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """Fraction of exact matches; 0.0 for empty input."""
    t, p = _arrays(y_true, y_pred)
    return float((t == p).mean()) if t.size else 0.0


def macro_f1(y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[int] | None = None) -> float:
    """Unweighted mean of per-class F1.

    ``labels`` default: the classes that occur in ``y_true`` or ``y_pred`` (as scikit-learn
    does), so a class absent from both does not count as a perfect or a zero score. A class
    with no true and no predicted samples among ``labels`` scores 0.
    """
    t, p = _arrays(y_true, y_pred)
    if not t.size:
        return 0.0
    classes = np.unique(np.concatenate([t, p])) if labels is None else np.asarray(list(labels))
    scores = []
    for c in classes:
        tp = int(((p == c) & (t == c)).sum())
        fp = int(((p == c) & (t != c)).sum())
        fn = int(((p != c) & (t == c)).sum())
        denom = 2 * tp + fp + fn
        scores.append(2 * tp / denom if denom else 0.0)
    return float(np.mean(scores))


def head_metrics(
    level_true: Sequence[int], level_pred: Sequence[int], type_true: Sequence[int], type_pred: Sequence[int]
) -> dict[str, float]:
    """``{"level_accuracy", "level_macro_f1", "type_accuracy", "type_macro_f1"}`` for the two heads."""
    return {
        "level_accuracy": accuracy(level_true, level_pred),
        "level_macro_f1": macro_f1(level_true, level_pred),
        "type_accuracy": accuracy(type_true, type_pred),
        "type_macro_f1": macro_f1(type_true, type_pred),
    }


def _arrays(y_true, y_pred) -> tuple[np.ndarray, np.ndarray]:
    t = np.asarray(_flat(y_true), dtype=np.int64).reshape(-1)
    p = np.asarray(_flat(y_pred), dtype=np.int64).reshape(-1)
    if t.shape != p.shape:
        raise ValueError(f"got {t.size} true labels but {p.size} predictions")
    return t, p


def _flat(values):
    if hasattr(values, "detach"):  # torch tensor
        return values.detach().cpu().numpy()
    return values


__all__ = ["accuracy", "head_metrics", "macro_f1"]
