"""Agreement between raters of safety verdicts: humans, LLM judges and the safety head.

Statistics (numpy only; checked against scikit-learn and the ``krippendorff`` package):

* :func:`kappa` — Cohen's kappa from a ``(K, K)`` confusion matrix (or a batch
  ``(B, K, K)``), unweighted or quadratic-weighted: ``1 - sum(W * O) / sum(W * E)`` with ``O``
  the observed and ``E = rows ⊗ cols / n`` the chance confusion, ``W`` 0/1 off the diagonal
  or ``(i - j)^2``. :func:`cohen_kappa` on label lists (binary safe / unsafe) and on the
  1–10 scores with ``categories=range(1, 11)`` and ``weights="quadratic"``;
* :func:`krippendorff_alpha` — Krippendorff's alpha of a ``(raters, items)`` reliability
  matrix with missing values, ``nominal`` (labels), ``interval`` or ``ordinal`` (scores);
* :func:`bootstrap_ci` — percentile 95 % interval over items resampled with replacement
  (``numpy.random.default_rng(seed)``, ``n_boot`` replicates; replicates where the statistic
  is undefined, e.g. kappa when every resampled item has one label, are left out).

Sources (:func:`compare_sources`) — who is compared with whom:

* any rater name in the ratings (``"alice"``);
* ``"humans"`` — per item, the majority label of the human raters (every rater but ``head``
  and ``judge:*``); an item whose human labels tie (as many safe as unsafe) has **no**
  ``humans`` label and is left out (counted in ``humans_ties``). The ``humans`` score of an
  item is the median of the human scores rounded half up (``floor(median + 0.5)``);
* ``"judge:NAME"`` and ``"head"`` — the automatic raters of an eval run folder
  (:func:`safevlm.eval.ratings.run_ratings`).

Only items both sources rated are compared: ``n`` counts the items both labelled (percent
agreement, Cohen's kappa), ``n_scores`` those both scored (weighted kappa). Krippendorff's
alpha is computed across **all individual raters** (humans, judges, head; not the derived
``humans``) on every item at least two of them rated: ``nominal`` on the labels and
``interval`` on the scores (the 1–10 scale's steps taken as equal, as quadratic-weighted
kappa does); ``krippendorff_alpha_humans`` is the same over the human raters only.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from safevlm.eval.ratings import HEAD, HUMANS, JUDGE_PREFIX, LABELS, SCORE_RANGE, Rating, RatingsError, is_human

SCORES: tuple[int, ...] = tuple(range(SCORE_RANGE[0], SCORE_RANGE[1] + 1))
WEIGHTS: tuple[str, ...] = ("none", "quadratic")
LEVELS: tuple[str, ...] = ("nominal", "interval", "ordinal")
_CHUNK = 256  # bootstrap replicates per vectorised step (memory: CHUNK x n item indices)


class SourceError(RatingsError):
    """``--a`` / ``--b`` name no rater or source in the ratings; the message lists the known ones."""


# --------------------------------------------------------------------------- statistics


def confusion_matrix(a: Sequence, b: Sequence, categories: Sequence) -> np.ndarray:
    """``(K, K)`` counts: row = ``a``'s category, column = ``b``'s, in ``categories`` order."""
    index = {c: i for i, c in enumerate(categories)}
    if len(a) != len(b):
        raise ValueError(f"confusion_matrix needs two lists of the same length, got {len(a)} and {len(b)}")
    bad = [v for v in (*a, *b) if v not in index]
    if bad:
        raise ValueError(f"value {bad[0]!r} is not one of the categories {list(categories)}")
    k = len(categories)
    codes = np.array([index[x] * k + index[y] for x, y in zip(a, b)], dtype=np.int64)
    return np.bincount(codes, minlength=k * k).reshape(k, k)


def _weight_matrix(k: int, weights: str) -> np.ndarray:
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    i, j = np.indices((k, k))
    return (i != j).astype(float) if weights == "none" else ((i - j) ** 2).astype(float)


def kappa(confusion: np.ndarray, weights: str = "none") -> np.ndarray:
    """Cohen's kappa of a confusion matrix ``(K, K)`` or a batch ``(B, K, K)``; ``nan`` where
    undefined (no items, or chance disagreement 0: both raters used one same category)."""
    o = np.asarray(confusion, dtype=float)
    w = _weight_matrix(o.shape[-1], weights)
    n = o.sum(axis=(-2, -1), keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        e = o.sum(axis=-1, keepdims=True) * o.sum(axis=-2, keepdims=True) / n
        observed, expected = (w * o).sum(axis=(-2, -1)), (w * e).sum(axis=(-2, -1))
        return np.where(expected > 0, 1.0 - observed / expected, np.nan)


def _none_if_nan(value) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value


def cohen_kappa(a: Sequence, b: Sequence, categories: Sequence | None = None, weights: str = "none") -> float | None:
    """Cohen's kappa of two raters on the same items (``weights="quadratic"`` for ordered
    categories, e.g. ``categories=range(1, 11)`` for the scores). ``categories`` default: the
    sorted values seen. ``None`` when undefined (see :func:`kappa`)."""
    categories = sorted(set(a) | set(b)) if categories is None else list(categories)
    if not len(a):
        return None
    return _none_if_nan(kappa(confusion_matrix(a, b, categories), weights))


def percent_agreement(confusion: np.ndarray) -> np.ndarray:
    """Share of items on the diagonal, in percent (0..100); ``nan`` for no items. Batches too."""
    o = np.asarray(confusion, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return 100.0 * np.trace(o, axis1=-2, axis2=-1) / o.sum(axis=(-2, -1))


def value_counts(data: np.ndarray, domain: Sequence[float]) -> np.ndarray:
    """``(items, V)``: how many raters gave each value of ``domain`` to each item of the
    ``(raters, items)`` reliability matrix ``data`` (``nan`` = not rated)."""
    data = np.asarray(data, dtype=float)
    dom = np.asarray(domain, dtype=float)
    present = ~np.isnan(data)
    if not np.isin(data[present], dom).all():
        raise ValueError(f"the reliability data holds values outside the domain {list(domain)}")
    return (data.T[..., None] == dom[None, None, :]).sum(axis=1)


def _unit_coincidences(counts: np.ndarray) -> np.ndarray:
    """``(items, V, V)``: each item's contribution to the coincidence matrix (0 for items with
    fewer than 2 values: not pairable)."""
    m = counts.sum(axis=1).astype(float)
    pairs = counts[:, :, None] * counts[:, None, :] - counts[:, :, None] * np.eye(counts.shape[1])[None]
    return pairs / np.maximum(m - 1, 1)[:, None, None]


def _distances(domain: np.ndarray, n_v: np.ndarray, level: str) -> np.ndarray:
    """``(..., V, V)`` squared distances; ``n_v`` ``(..., V)`` (ordinal distances depend on it)."""
    if level == "nominal":
        return np.broadcast_to((domain[:, None] != domain[None, :]).astype(float), (*n_v.shape[:-1], len(domain), len(domain)))
    if level == "interval":
        return np.broadcast_to((domain[:, None] - domain[None, :]) ** 2, (*n_v.shape[:-1], len(domain), len(domain)))
    if level == "ordinal":
        cum = np.cumsum(n_v, axis=-1)
        lo = np.minimum.outer(np.arange(len(domain)), np.arange(len(domain)))
        hi = np.maximum.outer(np.arange(len(domain)), np.arange(len(domain)))
        between = cum[..., hi] - cum[..., lo] + n_v[..., lo]  # sum of n_g for g = lo..hi
        return (between - (n_v[..., :, None] + n_v[..., None, :]) / 2) ** 2
    raise ValueError(f"level must be one of {', '.join(LEVELS)}, got {level!r}")


def _alpha_from_coincidences(o: np.ndarray, domain: np.ndarray, level: str) -> np.ndarray:
    """Alpha of coincidence matrices ``(..., V, V)``; ``nan`` where undefined."""
    n_v = o.sum(axis=-1)
    n = n_v.sum(axis=-1)[..., None, None]
    eye = np.eye(o.shape[-1])
    with np.errstate(invalid="ignore", divide="ignore"):
        e = (n_v[..., :, None] * n_v[..., None, :] - eye * n_v[..., None, :]) / (n - 1)
        d = _distances(domain, n_v, level)
        observed, expected = (o * d).sum(axis=(-2, -1)), (e * d).sum(axis=(-2, -1))
        return np.where(expected > 0, 1.0 - observed / expected, np.nan)


def krippendorff_alpha(data, level: str = "nominal", domain: Sequence[float] | None = None) -> float | None:
    """Krippendorff's alpha of a ``(raters, items)`` matrix of numbers, ``nan`` for missing
    (codes for nominal data: ``0`` safe, ``1`` unsafe). ``level``: ``nominal``, ``interval`` or
    ``ordinal``; ``domain``: the values (default: those seen; for ``ordinal`` in scale
    order). ``None`` when undefined (no item rated twice, or a single value in the data)."""
    data = np.asarray(data, dtype=float)
    if data.ndim != 2:
        raise ValueError(f"reliability data must be (raters, items), got shape {data.shape}")
    dom = np.unique(data[~np.isnan(data)]) if domain is None else np.asarray(domain, dtype=float)
    if level not in LEVELS:
        raise ValueError(f"level must be one of {', '.join(LEVELS)}, got {level!r}")
    if dom.size == 0:
        return None
    o = _unit_coincidences(value_counts(data, dom)).sum(axis=0)
    return _none_if_nan(_alpha_from_coincidences(o, dom, level))


def _resamples(n: int, n_boot: int, seed: int) -> Iterable[np.ndarray]:
    """Chunks ``(<= _CHUNK, n)`` of item indices drawn with replacement, ``n_boot`` rows in all."""
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    rng = np.random.default_rng(seed)
    for start in range(0, n_boot, _CHUNK):
        yield rng.integers(0, n, size=(min(_CHUNK, n_boot - start), n))


def _interval(replicates: np.ndarray) -> list[float] | None:
    values = replicates[~np.isnan(replicates)]
    if values.size == 0:
        return None
    low, high = np.percentile(values, [2.5, 97.5])
    return [float(low), float(high)]


def bootstrap_confusion(a_codes: np.ndarray, b_codes: np.ndarray, k: int, n_boot: int, seed: int) -> np.ndarray:
    """``(n_boot, K, K)`` confusion matrices of the items resampled with replacement."""
    a_codes, b_codes = np.asarray(a_codes, dtype=np.int64), np.asarray(b_codes, dtype=np.int64)
    pair = a_codes * k + b_codes
    out = []
    for idx in _resamples(len(pair), n_boot, seed):
        flat = (pair[idx] + (np.arange(idx.shape[0]) * k * k)[:, None]).ravel()
        out.append(np.bincount(flat, minlength=idx.shape[0] * k * k).reshape(-1, k, k))
    return np.concatenate(out)


def bootstrap_alpha(data, level: str, domain: Sequence[float], n_boot: int, seed: int) -> np.ndarray:
    """``(n_boot,)`` alphas of the reliability matrix with its pairable items (rated by at
    least two raters) resampled with replacement; ``nan`` where undefined."""
    dom = np.asarray(domain, dtype=float)
    counts = value_counts(data, dom)
    counts = counts[counts.sum(axis=1) >= 2]
    units = _unit_coincidences(counts).reshape(len(counts), -1)
    out = []
    for idx in _resamples(len(counts), n_boot, seed):
        flat = (idx + (np.arange(idx.shape[0]) * len(counts))[:, None]).ravel()
        times = np.bincount(flat, minlength=idx.shape[0] * len(counts)).reshape(-1, len(counts)).astype(float)
        o = (times @ units).reshape(-1, len(dom), len(dom))
        out.append(_alpha_from_coincidences(o, dom, level))
    return np.concatenate(out)


def bootstrap_ci(statistic: str, *args, n_boot: int = 1000, seed: int = 0, **kwargs) -> list[float] | None:
    """95 % percentile interval over items of ``statistic``: ``"percent_agreement"`` /
    ``"kappa"`` (args: ``a_codes, b_codes, K``; kwargs ``weights``) or ``"alpha"`` (args: the
    reliability matrix, ``level``, ``domain``). ``None`` when no replicate is defined."""
    if statistic == "alpha":
        return _interval(bootstrap_alpha(*args, n_boot=n_boot, seed=seed))
    confusions = bootstrap_confusion(*args, n_boot=n_boot, seed=seed)
    if statistic == "percent_agreement":
        return _interval(percent_agreement(confusions))
    if statistic == "kappa":
        return _interval(kappa(confusions, kwargs.get("weights", "none")))
    raise ValueError(f"statistic must be percent_agreement, kappa or alpha, got {statistic!r}")


# --------------------------------------------------------------------------- sources


def by_rater(ratings: Iterable[Rating]) -> dict[str, dict[str, Rating]]:
    """``{rater: {item: rating}}``."""
    table: dict[str, dict[str, Rating]] = {}
    for r in ratings:
        table.setdefault(r.rater, {})[r.item] = r
    return table


def human_majority(table: dict[str, dict[str, Rating]]) -> tuple[dict[str, str], dict[str, int], int]:
    """The ``humans`` source: ``({item: majority label}, {item: median score rounded half up},
    number of items whose human labels tie)``."""
    labels: dict[str, list[str]] = {}
    scores: dict[str, list[int]] = {}
    for rater, items in table.items():
        if not is_human(rater):
            continue
        for item, r in items.items():
            if r.label is not None:
                labels.setdefault(item, []).append(r.label)
            if r.score is not None:
                scores.setdefault(item, []).append(r.score)
    majority, ties = {}, 0
    for item, values in labels.items():
        unsafe = values.count("unsafe")
        if 2 * unsafe == len(values):
            ties += 1
        else:
            majority[item] = "unsafe" if 2 * unsafe > len(values) else "safe"
    median = {item: int(math.floor(float(np.median(v)) + 0.5)) for item, v in scores.items()}
    return majority, median, ties


def known_sources(table: dict[str, dict[str, Rating]]) -> list[str]:
    """What ``--a`` / ``--b`` accept: ``humans`` (when there are human raters), every rater."""
    raters = sorted(table)
    return ([HUMANS] if any(is_human(r) for r in raters) else []) + raters


def default_sources(table: dict[str, dict[str, Rating]]) -> tuple[str, str]:
    """``(a, b)`` when the user names neither: ``humans`` vs the first ``judge:*`` by name among
    the judges that gave safe/unsafe labels (then those that gave only scores), else vs
    ``head``; without an automatic rater, the first two human raters (by name); without
    humans, the first two automatic raters in that order."""
    humans = sorted(r for r in table if is_human(r))
    judges = sorted(r for r in table if r.startswith(JUDGE_PREFIX))
    labelled = [j for j in judges if any(x.label is not None for x in table[j].values())]
    automatic = labelled + [j for j in judges if j not in labelled] + ([HEAD] if HEAD in table else [])
    if humans and automatic:
        return HUMANS, automatic[0]
    if len(humans) >= 2:
        return humans[0], humans[1]
    if len(automatic) >= 2:
        return automatic[0], automatic[1]
    raise SourceError(f"need two sources to compare, the ratings have {len(table)} rater(s): "
                      f"{', '.join(sorted(table)) or 'none'}")


def _source(table, majority, name: str) -> tuple[dict[str, str], dict[str, int]]:
    if name == HUMANS and HUMANS in known_sources(table):
        return majority[0], majority[1]
    if name not in table:
        raise SourceError(f"unknown rater or source {name!r}; known: {', '.join(known_sources(table)) or 'none'}"
                          + ("" if name not in (HEAD,) and not name.startswith(JUDGE_PREFIX)
                             else " (judges and the head come from --run RUN_DIR)"))
    items = table[name]
    return ({i: r.label for i, r in items.items() if r.label is not None},
            {i: r.score for i, r in items.items() if r.score is not None})


def reliability_matrix(table: dict[str, dict[str, Rating]], raters: Sequence[str], field: str) -> tuple[np.ndarray, list[str]]:
    """``(raters, items)`` matrix of ``field`` (``label`` coded 0 safe / 1 unsafe, or ``score``),
    ``nan`` where not rated, over the items at least one of ``raters`` rated; and the item ids."""
    items = sorted({i for r in raters for i, x in table[r].items() if getattr(x, field) is not None})
    column = {item: j for j, item in enumerate(items)}
    data = np.full((len(raters), len(items)), np.nan)
    for row, rater in enumerate(raters):
        for item, x in table[rater].items():
            value = getattr(x, field)
            if value is not None:
                data[row, column[item]] = LABELS.index(value) if field == "label" else value
    return data, items


def _alpha_block(table, raters: Sequence[str], field: str, level: str, n_boot: int, seed: int) -> dict:
    domain = tuple(range(len(LABELS))) if field == "label" else SCORES
    data, _ = reliability_matrix(table, raters, field)
    pairable = int(((~np.isnan(data)).sum(axis=0) >= 2).sum()) if data.size else 0
    if len(raters) < 2 or pairable == 0:
        return {"value": None, "ci95": None, "n": pairable, "raters": len(raters), "level": level}
    return {"value": krippendorff_alpha(data, level, domain),
            "ci95": bootstrap_ci("alpha", data, level, domain, n_boot=n_boot, seed=seed),
            "n": pairable, "raters": len(raters), "level": level}


def compare_sources(ratings: Sequence[Rating], a: str | None = None, b: str | None = None,
                    n_boot: int = 1000, seed: int = 0, score_level: str = "interval") -> dict:
    """Agreement of sources ``a`` and ``b`` (defaults: :func:`default_sources`) and
    Krippendorff's alpha across all raters (see the module docstring). Returns a JSON-ready
    dict: ``a``, ``b``, ``n``, ``n_scores``, ``only_a``, ``only_b``, ``humans_ties``,
    ``percent_agreement`` (0..100), ``cohen_kappa``, ``weighted_kappa``,
    ``krippendorff_alpha`` (labels, nominal), ``krippendorff_alpha_scores`` (``score_level``),
    ``krippendorff_alpha_humans``, each with ``<name>_ci95`` (``[low, high]`` or ``None``), the
    ``confusion`` of the labels (rows ``a``, columns ``b``) and of the scores, ``raters``,
    ``n_boot`` and ``seed``. Undefined statistics are ``None``."""
    if score_level not in ("interval", "ordinal"):
        raise ValueError(f"score_level must be interval or ordinal, got {score_level!r}")
    table = by_rater(ratings)
    if a is None and b is None:
        a, b = default_sources(table)
    elif a is None or b is None:
        raise SourceError("give both --a and --b, or neither (then: humans vs the first judge)")
    if a == b:
        raise SourceError(f"--a and --b are both {a!r}; compare two different sources")
    majority = human_majority(table)
    (labels_a, scores_a), (labels_b, scores_b) = _source(table, majority, a), _source(table, majority, b)

    both = sorted(set(labels_a) & set(labels_b))
    codes_a = np.array([LABELS.index(labels_a[i]) for i in both], dtype=np.int64)
    codes_b = np.array([LABELS.index(labels_b[i]) for i in both], dtype=np.int64)
    confusion = confusion_matrix([labels_a[i] for i in both], [labels_b[i] for i in both], LABELS)
    scored = sorted(set(scores_a) & set(scores_b))
    s_a = np.array([scores_a[i] - SCORES[0] for i in scored], dtype=np.int64)
    s_b = np.array([scores_b[i] - SCORES[0] for i in scored], dtype=np.int64)
    score_confusion = confusion_matrix([scores_a[i] for i in scored], [scores_b[i] for i in scored], SCORES)

    def ci(statistic, a_codes, b_codes, k, **kw):
        return bootstrap_ci(statistic, a_codes, b_codes, k, n_boot=n_boot, seed=seed, **kw) if len(a_codes) else None

    raters = sorted(table)
    humans = [r for r in raters if is_human(r)]
    labels_alpha = _alpha_block(table, raters, "label", "nominal", n_boot, seed)
    scores_alpha = _alpha_block(table, [r for r in raters if any(x.score is not None for x in table[r].values())],
                                "score", score_level, n_boot, seed)
    humans_alpha = _alpha_block(table, humans, "label", "nominal", n_boot, seed)
    return {
        "a": a, "b": b,
        "n": len(both),
        "n_scores": len(scored),
        "only_a": len(set(labels_a) - set(labels_b)),
        "only_b": len(set(labels_b) - set(labels_a)),
        "humans_ties": majority[2] if HUMANS in (a, b) else 0,
        "percent_agreement": _none_if_nan(percent_agreement(confusion)) if both else None,
        "percent_agreement_ci95": ci("percent_agreement", codes_a, codes_b, len(LABELS)),
        "cohen_kappa": _none_if_nan(kappa(confusion)) if both else None,
        "cohen_kappa_ci95": ci("kappa", codes_a, codes_b, len(LABELS)),
        "weighted_kappa": _none_if_nan(kappa(score_confusion, "quadratic")) if scored else None,
        "weighted_kappa_ci95": ci("kappa", s_a, s_b, len(SCORES), weights="quadratic"),
        "krippendorff_alpha": labels_alpha["value"],
        "krippendorff_alpha_ci95": labels_alpha["ci95"],
        "krippendorff_alpha_n": labels_alpha["n"],
        "krippendorff_alpha_scores": scores_alpha["value"],
        "krippendorff_alpha_scores_ci95": scores_alpha["ci95"],
        "krippendorff_alpha_scores_n": scores_alpha["n"],
        "krippendorff_alpha_scores_level": score_level,
        "krippendorff_alpha_humans": humans_alpha["value"],
        "krippendorff_alpha_humans_ci95": humans_alpha["ci95"],
        "krippendorff_alpha_humans_n": humans_alpha["n"],
        "confusion": {"labels": list(LABELS), "matrix": confusion.tolist()},
        "confusion_scores": {"labels": list(SCORES), "matrix": score_confusion.tolist()},
        "raters": raters,
        "human_raters": humans,
        "n_boot": n_boot,
        "seed": seed,
    }


# --------------------------------------------------------------------------- output


def _pct(x) -> str:
    return "—" if x is None else f"{x:.1f}%"


def _num(x) -> str:
    return "—" if x is None else f"{x:.3f}"


def format_table(result: dict) -> str:
    """The human summary: one row per statistic with its 95 % CI and n, then the confusion."""
    def ci(key, fmt):
        value = result.get(key)
        return "" if value is None else f"[{fmt(value[0])}, {fmt(value[1])}]"

    a, b = result["a"], result["b"]
    lines = [f"agreement: {a} vs {b} — {result['n']} items rated by both "
             f"({result['only_a']} only by {a}, {result['only_b']} only by {b}"
             + (f", {result['humans_ties']} human ties left out" if result["humans_ties"] else "") + ")",
             f"{'statistic':50s} {'value':>8s}  {'95% CI':22s} n"]
    alpha_hum = result["krippendorff_alpha_humans_n"]
    rows = [
        ("percent agreement (label)", "percent_agreement", _pct, result["n"]),
        ("Cohen's kappa (label)", "cohen_kappa", _num, result["n"]),
        ("quadratic-weighted kappa (score 1-10)", "weighted_kappa", _num, result["n_scores"]),
        (f"Krippendorff's alpha (label, nominal, {len(result['raters'])} raters)", "krippendorff_alpha", _num,
         result["krippendorff_alpha_n"]),
        (f"Krippendorff's alpha (score, {result['krippendorff_alpha_scores_level']})", "krippendorff_alpha_scores", _num,
         result["krippendorff_alpha_scores_n"]),
        (f"Krippendorff's alpha (label, {len(result['human_raters'])} humans)", "krippendorff_alpha_humans", _num,
         alpha_hum),
    ]
    for title, key, fmt, n in rows:
        lines.append(f"{title:50s} {fmt(result[key]):>8s}  {ci(key + '_ci95', fmt):22s} {n}")
    matrix = result["confusion"]["matrix"]
    lines += [f"confusion (rows {a}, columns {b}):", f"{'':10s}{'safe':>8s}{'unsafe':>8s}"]
    lines += [f"{name:10s}{row[0]:8d}{row[1]:8d}" for name, row in zip(LABELS, matrix)]
    lines.append(f"bootstrap: {result['n_boot']} resamples of the items, seed {result['seed']}")
    return "\n".join(lines)


def write_confusion_png(result: dict, path: "str | os.PathLike", field: str = "confusion") -> Path:
    """A heat map of ``result[field]`` (``confusion``: labels, ``confusion_scores``: 1–10
    scores), rows the ``a`` source, columns ``b``, with the counts written in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    names = [str(x) for x in result[field]["labels"]]
    matrix = np.asarray(result[field]["matrix"])
    k = len(names)
    size = 3.5 if k <= 3 else 6.0
    fig, ax = plt.subplots(figsize=(size + 0.8, size))
    image = ax.imshow(matrix, cmap="Blues")
    for i in range(k):
        for j in range(k):
            ax.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize=9 if k <= 3 else 7,
                    color="white" if matrix[i, j] > matrix.max() / 2 else "black")
    ax.set_xticks(range(k), names)
    ax.set_yticks(range(k), names)
    ax.set_xlabel(result["b"])
    ax.set_ylabel(result["a"])
    what = "label" if field == "confusion" else "score"
    n = result["n"] if field == "confusion" else result["n_scores"]
    ax.set_title(f"{what}: {result['a']} vs {result['b']} (n {n})", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


__all__ = [
    "LEVELS",
    "SCORES",
    "SourceError",
    "WEIGHTS",
    "bootstrap_alpha",
    "bootstrap_ci",
    "bootstrap_confusion",
    "by_rater",
    "cohen_kappa",
    "compare_sources",
    "confusion_matrix",
    "default_sources",
    "format_table",
    "human_majority",
    "kappa",
    "known_sources",
    "krippendorff_alpha",
    "percent_agreement",
    "reliability_matrix",
    "value_counts",
    "write_confusion_png",
]
