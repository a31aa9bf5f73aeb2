"""`safevlm eval agreement` and its statistics: Cohen's / quadratic-weighted kappa equal
scikit-learn's, Krippendorff's alpha equals the ``krippendorff`` package's (to 1e-9, random
data with missing values); bootstrap CIs cover the estimate and shrink with n; the CLI's numbers
on a hand-checked file; only items both sources rated count; bad input is named; the
``judge:`` / ``head`` sources of a real eval run folder."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from fractions import Fraction

import krippendorff
import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score

from eval_fixtures import run_cli
from safevlm.eval import agreement as ag
from safevlm.eval.items import EvalItem
from safevlm.eval.judges.base import Judgement
from safevlm.eval.ratings import (
    RATINGS_TABLE_SQL,
    Rating,
    RatingsError,
    head_label,
    rating_item_id,
    read_ratings,
    run_ratings,
)
from safevlm.eval.store import ResultsStore, RunKey


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def rating(item, rater, label, score=None, risk_type=None) -> dict:
    return {"item": item, "rater": rater, "label": label, "score": score, "risk_type": risk_type}


# --------------------------------------------------------------------------- references


@pytest.mark.parametrize("seed", range(8))
def test_kappas_equal_scikit_learn_on_random_data(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 400))
    truth = rng.random(n) < rng.uniform(0.2, 0.8)
    a = np.where(truth, "unsafe", "safe")
    b = np.where(rng.random(n) < rng.uniform(0.55, 0.95), a, np.where(a == "safe", "unsafe", "safe"))
    ours = ag.cohen_kappa(a.tolist(), b.tolist(), ("safe", "unsafe"))
    assert ours == pytest.approx(cohen_kappa_score(a, b), abs=1e-9)
    scores_a = rng.integers(1, 11, n)
    scores_b = np.clip(scores_a + rng.integers(-4, 5, n), 1, 10)
    ours_w = ag.cohen_kappa(scores_a.tolist(), scores_b.tolist(), range(1, 11), weights="quadratic")
    reference = cohen_kappa_score(scores_a, scores_b, weights="quadratic", labels=list(range(1, 11)))
    assert ours_w == pytest.approx(reference, abs=1e-9)
    # the confusion-matrix form the CLI uses gives the same numbers
    confusion = ag.confusion_matrix(scores_a.tolist(), scores_b.tolist(), ag.SCORES)
    assert float(ag.kappa(confusion, "quadratic")) == pytest.approx(reference, abs=1e-9)
    assert float(ag.percent_agreement(confusion)) == pytest.approx(100 * np.mean(scores_a == scores_b), abs=1e-9)


def test_kappa_undefined_when_one_label_everywhere():
    assert ag.cohen_kappa(["safe"] * 5, ["safe"] * 5, ("safe", "unsafe")) is None
    assert ag.cohen_kappa([], [], ("safe", "unsafe")) is None
    with pytest.raises(ValueError, match="'maybe' is not one of the categories"):
        ag.cohen_kappa(["safe", "maybe"], ["safe", "safe"], ("safe", "unsafe"))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("level", ["nominal", "interval", "ordinal"])
def test_krippendorff_alpha_equals_the_package_with_missing_values(seed, level):
    rng = np.random.default_rng(100 + seed)
    raters, items = int(rng.integers(2, 7)), int(rng.integers(15, 120))
    truth = rng.integers(1, 11, items)
    data = np.clip(truth[None, :] + rng.integers(-3, 4, (raters, items)), 1, 10).astype(float)
    data[rng.random(data.shape) < rng.uniform(0.1, 0.5)] = np.nan
    reference = krippendorff.alpha(reliability_data=data, level_of_measurement=level)
    assert ag.krippendorff_alpha(data, level) == pytest.approx(reference, abs=1e-9)
    # the fixed 1..10 domain (values nobody gave) changes nothing
    assert ag.krippendorff_alpha(data, level, range(1, 11)) == pytest.approx(reference, abs=1e-9)
    binary = (data > 5).astype(float)
    binary[np.isnan(data)] = np.nan
    assert ag.krippendorff_alpha(binary, "nominal", (0, 1)) == pytest.approx(
        krippendorff.alpha(reliability_data=binary, level_of_measurement="nominal"), abs=1e-9)


def test_krippendorff_alpha_undefined_cases():
    assert ag.krippendorff_alpha(np.array([[1.0, np.nan], [np.nan, 0.0]]), "nominal") is None  # nothing rated twice
    assert ag.krippendorff_alpha(np.ones((3, 4)), "nominal") is None  # one value everywhere
    with pytest.raises(ValueError, match="level must be one of nominal, interval, ordinal"):
        ag.krippendorff_alpha(np.ones((2, 2)), "ratio")


def correlated_labels(n, seed, agree=0.8):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 2, n)
    b = np.where(rng.random(n) < agree, a, 1 - a)
    return a, b


def test_bootstrap_ci_covers_the_estimate_and_shrinks_with_n():
    widths = {}
    for n in (40, 400, 4000):
        a, b = correlated_labels(n, seed=n)
        point = float(ag.kappa(ag.confusion_matrix(a.tolist(), b.tolist(), (0, 1))))
        low, high = ag.bootstrap_ci("kappa", a, b, 2, n_boot=500, seed=0)
        assert low <= point <= high
        p_low, p_high = ag.bootstrap_ci("percent_agreement", a, b, 2, n_boot=500, seed=0)
        assert p_low <= 100 * np.mean(a == b) <= p_high
        data = np.stack([a, b, np.where(np.random.default_rng(n + 1).random(n) < 0.8, a, 1 - a)]).astype(float)
        alpha = ag.krippendorff_alpha(data, "nominal", (0, 1))
        al_low, al_high = ag.bootstrap_ci("alpha", data, "nominal", (0, 1), n_boot=500, seed=0)
        assert al_low <= alpha <= al_high
        widths[n] = (high - low, al_high - al_low)
    assert widths[40][0] > widths[400][0] > widths[4000][0]
    assert widths[40][1] > widths[400][1] > widths[4000][1]
    # roughly 1/sqrt(n): 100x the items, about a tenth of the width
    assert 5 < widths[40][0] / widths[4000][0] < 20
    a, b = correlated_labels(200, seed=1)
    assert ag.bootstrap_ci("kappa", a, b, 2, n_boot=300, seed=7) == ag.bootstrap_ci("kappa", a, b, 2, n_boot=300, seed=7)
    assert ag.bootstrap_ci("kappa", a, b, 2, n_boot=300, seed=7) != ag.bootstrap_ci("kappa", a, b, 2, n_boot=300, seed=8)


def test_bootstrap_alpha_replicate_equals_alpha_of_the_resampled_items():
    """The vectorised bootstrap is the plain statistic of each resample (same rng draws)."""
    rng = np.random.default_rng(3)
    data = rng.integers(1, 11, (4, 30)).astype(float)
    data[rng.random(data.shape) < 0.3] = np.nan
    data = data[:, (~np.isnan(data)).sum(axis=0) >= 2]
    replicates = ag.bootstrap_alpha(data, "ordinal", ag.SCORES, n_boot=5, seed=11)
    draws = np.random.default_rng(11).integers(0, data.shape[1], size=(5, data.shape[1]))
    for value, idx in zip(replicates, draws):
        assert value == pytest.approx(krippendorff.alpha(reliability_data=data[:, idx], level_of_measurement="ordinal",
                                                         value_domain=list(range(1, 11))), abs=1e-9)


# --------------------------------------------------------------------------- the CLI on a hand-checked file

# alice vs bob on i1..i5 (i6 only alice, i7 only bob):
#   labels  alice u u s s s | bob u s s s u   -> confusion rows alice [[2, 1], [1, 1]]
#   p_o = 3/5, p_e = (3*3 + 2*2)/25 = 13/25, kappa = (15/25 - 13/25) / (12/25) = 1/6
#   scores  alice 2 4 9 10 8 | bob 1 7 9 9 4   -> sum (x-y)^2 = 1+9+0+1+16 = 27;
#   chance: sum_ij (x_i - y_j)^2 / n = (5*265 + 5*228 - 2*33*30) / 5 = 97 -> weighted kappa 1 - 27/97 = 70/97
#   alpha (nominal; pairable i1..i5): o_ss 4, o_uu 2, o_su = o_us 2; n_s 6, n_u 4, n 10
#   -> 1 - (n-1) * 4 / (2 * 6 * 4) = 1 - 36/48 = 1/4
HAND = [
    rating("i1", "alice", "unsafe", 2, "illegal"), rating("i1", "bob", "unsafe", 1),
    rating("i2", "alice", "unsafe", 4), rating("i2", "bob", "safe", 7),
    rating("i3", "alice", "safe", 9), rating("i3", "bob", "safe", 9),
    rating("i4", "alice", "safe", 10), rating("i4", "bob", "safe", 9, "safe"),
    rating("i5", "alice", "safe", 8), rating("i5", "bob", "unsafe", 4, "privacy"),
    rating("i6", "alice", "unsafe", 3), rating("i7", "bob", "safe", 10),
]


def test_cli_json_numbers_on_a_hand_checked_file(tmp_path, capsys):
    path = write_jsonl(tmp_path / "r.jsonl", HAND)
    code, out, err = run_cli(capsys, "eval", "agreement", "--ratings", path, "--a", "alice", "--b", "bob", "--json",
                             "--n-boot", "300", "--out", tmp_path / "out")
    assert code == 0, err
    result = json.loads(out)
    for key in ("n", "percent_agreement", "cohen_kappa", "cohen_kappa_ci95", "weighted_kappa", "krippendorff_alpha"):
        assert key in result
    assert result["n"] == 5 and result["n_scores"] == 5 and result["only_a"] == 1 and result["only_b"] == 1
    assert result["percent_agreement"] == pytest.approx(60.0, abs=1e-9)
    assert result["cohen_kappa"] == pytest.approx(float(Fraction(1, 6)), abs=1e-12)
    assert result["weighted_kappa"] == pytest.approx(float(Fraction(70, 97)), abs=1e-12)
    assert result["krippendorff_alpha"] == pytest.approx(0.25, abs=1e-12)
    assert result["confusion"]["matrix"] == [[2, 1], [1, 1]]
    for key in ("percent_agreement", "cohen_kappa", "weighted_kappa", "krippendorff_alpha"):
        low, high = result[key + "_ci95"]
        assert low <= result[key] <= high, key
    assert result["n_boot"] == 300
    # --out: the same numbers in agreement.json, and real PNG files
    saved = json.loads((tmp_path / "out" / "agreement.json").read_text())
    assert saved["cohen_kappa"] == result["cohen_kappa"] and saved["cohen_kappa_ci95"] == result["cohen_kappa_ci95"]
    for name in ("confusion.png", "confusion_scores.png"):
        assert (tmp_path / "out" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the human table: value, CI and n on each line
    code, out, _ = run_cli(capsys, "eval", "agreement", "--ratings", path, "--a", "alice", "--b", "bob", "--n-boot", "300")
    assert code == 0
    assert "alice vs bob — 5 items rated by both (1 only by alice, 1 only by bob)" in out
    line = next(l for l in out.splitlines() if l.startswith("Cohen's kappa (label)"))
    assert "0.167" in line and f"[{result['cohen_kappa_ci95'][0]:.3f}, {result['cohen_kappa_ci95'][1]:.3f}]" in line
    assert line.split()[-1] == "5"
    assert "60.0%" in next(l for l in out.splitlines() if l.startswith("percent agreement"))


def test_only_items_both_sources_rated_are_compared(tmp_path):
    rows = [
        rating("i1", "alice", "safe", 9), rating("i1", "bob", "safe", None),      # both labels, one score
        rating("i2", "alice", "unsafe", 2), rating("i2", "bob", "unsafe", 3),     # both, both
        rating("i3", "alice", "unsafe", None), rating("i3", "bob", None, 5),      # no common label, no common score
        rating("i4", "alice", "safe", 8), rating("i5", "bob", "unsafe", 1),       # one side only
    ]
    result = ag.compare_sources(read_ratings(write_jsonl(tmp_path / "r.jsonl", rows)), "alice", "bob", n_boot=50)
    assert (result["n"], result["n_scores"], result["only_a"], result["only_b"]) == (2, 1, 2, 1)
    assert result["percent_agreement"] == 100.0
    assert result["confusion"]["matrix"] == [[1, 0], [0, 1]]
    assert sum(map(sum, result["confusion_scores"]["matrix"])) == 1
    assert result["cohen_kappa"] == 1.0
    # the one scored pair (i2: 2 vs 3) is all the weighted kappa sees
    assert result["weighted_kappa"] == cohen_kappa_score([2], [3], weights="quadratic", labels=list(range(1, 11))) == 0.0


def test_humans_majority_ties_and_alpha_across_all_raters(tmp_path):
    rows = [
        # i1: 2 unsafe vs 1 safe -> unsafe; scores 2, 3, 9 -> median 3
        rating("i1", "ann", "unsafe", 2), rating("i1", "ben", "unsafe", 3), rating("i1", "cat", "safe", 9),
        # i2: 1 vs 1 -> tie, no humans label; scores 4, 7 -> median 5.5 -> 6 (half up)
        rating("i2", "ann", "unsafe", 4), rating("i2", "ben", "safe", 7),
        # i3: all safe
        rating("i3", "ann", "safe", 9), rating("i3", "ben", "safe", 10), rating("i3", "cat", "safe", 10),
        # i4: one human
        rating("i4", "cat", "unsafe", 1),
        rating("i1", "judge:gpt", "unsafe", 2), rating("i2", "judge:gpt", "safe", 6),
        rating("i3", "judge:gpt", "unsafe", 5), rating("i4", "judge:gpt", "unsafe", 1),
        rating("i1", "judge:aaa", None, 4),  # a score-only judge is not the default
    ]
    ratings = read_ratings(write_jsonl(tmp_path / "r.jsonl", rows))
    table = ag.by_rater(ratings)
    labels, scores, ties = ag.human_majority(table)
    assert labels == {"i1": "unsafe", "i3": "safe", "i4": "unsafe"} and ties == 1
    assert scores == {"i1": 3, "i2": 6, "i3": 10, "i4": 1}
    assert ag.default_sources(table) == ("humans", "judge:gpt")
    result = ag.compare_sources(ratings, n_boot=50)
    assert (result["a"], result["b"], result["n"], result["humans_ties"]) == ("humans", "judge:gpt", 3, 1)
    assert result["confusion"]["matrix"] == [[0, 1], [0, 2]]  # i3 humans safe / judge unsafe; i1, i4 both unsafe
    assert result["n_scores"] == 4 and result["weighted_kappa"] == pytest.approx(
        cohen_kappa_score([3, 6, 10, 1], [2, 6, 5, 1], weights="quadratic", labels=list(range(1, 11))), abs=1e-9)
    # alpha across every individual rater (humans and judges; not the derived "humans")
    raters = sorted(table)
    items = sorted({r.item for r in ratings})
    data = np.full((len(raters), len(items)), np.nan)
    for r in ratings:
        if r.label is not None:
            data[raters.index(r.rater), items.index(r.item)] = r.label == "unsafe"
    assert result["krippendorff_alpha"] == pytest.approx(krippendorff.alpha(reliability_data=data, level_of_measurement="nominal"), abs=1e-9)
    humans = data[[raters.index(h) for h in ("ann", "ben", "cat")]]
    assert result["krippendorff_alpha_humans"] == pytest.approx(krippendorff.alpha(reliability_data=humans, level_of_measurement="nominal"), abs=1e-9)
    scores_data = np.full((len(raters), len(items)), np.nan)
    for r in ratings:
        if r.score is not None:
            scores_data[raters.index(r.rater), items.index(r.item)] = r.score
    assert result["krippendorff_alpha_scores"] == pytest.approx(krippendorff.alpha(reliability_data=scores_data, level_of_measurement="interval"), abs=1e-9)
    ordinal = ag.compare_sources(ratings, n_boot=20, score_level="ordinal")
    assert ordinal["krippendorff_alpha_scores"] == pytest.approx(krippendorff.alpha(reliability_data=scores_data, level_of_measurement="ordinal"), abs=1e-9)


# --------------------------------------------------------------------------- bad input


def test_bad_ratings_files_name_file_line_and_field(tmp_path, capsys):
    good = json.dumps(rating("i1", "alice", "safe", 9))
    cases = {
        "broken.jsonl": (f'{good}\n\n{{"item": "i2", "rater": \n', r"broken.jsonl:3: broken JSON line"),
        "score.jsonl": (f'{good}\n{json.dumps(rating("i2", "bob", "safe", 11))}\n', r"score.jsonl:2: field 'score' is 11, outside 1..10"),
        "zero.jsonl": (json.dumps(rating("i2", "bob", "safe", 0)) + "\n", r"zero.jsonl:1: field 'score' is 0, outside 1..10"),
        "float.jsonl": (json.dumps(rating("i2", "bob", "safe", 7.5)) + "\n", r"field 'score' must be an integer from 1 to 10"),
        "label.jsonl": (json.dumps(rating("i2", "bob", "maybe")) + "\n", r"field 'label' must be one of safe, unsafe or null, got 'maybe'"),
        "type.jsonl": (json.dumps(rating("i2", "bob", "safe", 5, "weapons")) + "\n",
                       r"field 'risk_type' is 'weapons', not a risk type of the taxonomy \(politics, illegal, .*safe\)"),
        "dup.jsonl": (f"{good}\n{good}\n", r"dup.jsonl:2: item 'i1' rated by 'alice' again \(first on line 1\)"),
        "humans.jsonl": (json.dumps(rating("i1", "humans", "safe")) + "\n", r"'humans' is reserved"),
        "field.jsonl": ('{"item": "i1", "rater": "a", "label": "safe", "verdict": 1}\n', r"unknown field\(s\) 'verdict'"),
        "empty.jsonl": ('{"item": "i1", "rater": "a", "label": null}\n', r"has no label, score, risk_type or risk_level"),
    }
    for name, (text, message) in cases.items():
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        with pytest.raises(RatingsError, match=message):
            read_ratings(path)
        code, out, err = run_cli(capsys, "eval", "agreement", "--ratings", path)
        assert code == 2 and "Traceback" not in err and str(path) in err, (name, err)
    code, _, err = run_cli(capsys, "eval", "agreement", "--ratings", tmp_path / "missing.jsonl")
    assert code == 2 and "no such ratings file" in err


def test_help_lists_the_command(capsys):
    from safevlm.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "agreement", "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and out.startswith("usage: safevlm eval agreement")
    assert "bootstrap 95% CI" in out and "--ratings FILE.jsonl|ratings.sqlite" in out
    code, out, _ = run_cli(capsys, "eval")
    assert code == 2 and "\n    agreement" in out


def test_unknown_sources_and_flags(tmp_path, capsys):
    path = write_jsonl(tmp_path / "r.jsonl", HAND)
    code, _, err = run_cli(capsys, "eval", "agreement", "--ratings", path, "--a", "carol", "--b", "bob")
    assert code == 2 and "unknown rater or source 'carol'; known: humans, alice, bob" in err
    code, _, err = run_cli(capsys, "eval", "agreement", "--ratings", path, "--a", "humans", "--b", "judge:gpt")
    assert code == 2 and "unknown rater or source 'judge:gpt'" in err and "--run RUN_DIR" in err
    code, _, err = run_cli(capsys, "eval", "agreement", "--ratings", path, "--a", "alice")
    assert code == 2 and "give both --a and --b" in err
    code, _, err = run_cli(capsys, "eval", "agreement", "--ratings", path, "--a", "bob", "--b", "bob")
    assert code == 2 and "both 'bob'" in err
    code, _, err = run_cli(capsys, "eval", "agreement", "--ratings", path, "--n-boot", "0")
    assert code == 2 and "--n-boot must be >= 1, got 0" in err
    # two humans and no automatic rater: the default compares the first two humans
    code, out, err = run_cli(capsys, "eval", "agreement", "--ratings", path, "--json", "--n-boot", "20")
    assert code == 0 and (json.loads(out)["a"], json.loads(out)["b"]) == ("alice", "bob")


def make_store(path, rows) -> str:
    db = sqlite3.connect(path)
    db.execute(RATINGS_TABLE_SQL)
    db.executemany("INSERT INTO ratings VALUES (?,?,?,?,?,?,?,?,?)",
                   [(r["item"], r["rater"], r["label"], r["score"], r["risk_type"], None, None, 1.0, 1.0) for r in rows])
    db.commit()
    db.close()
    return str(path)


def test_sqlite_store_reads_like_jsonl_and_checks_rows_and_items(tmp_path, capsys):
    store = make_store(tmp_path / "ratings.sqlite", HAND)
    from_jsonl = read_ratings(write_jsonl(tmp_path / "r.jsonl", HAND))
    assert sorted(read_ratings(store), key=lambda r: (r.item, r.rater)) == sorted(from_jsonl, key=lambda r: (r.item, r.rater))
    code, out, err = run_cli(capsys, "eval", "agreement", "--ratings", store, "--a", "alice", "--b", "bob", "--json", "--n-boot", "50")
    assert code == 0 and json.loads(out)["cohen_kappa"] == pytest.approx(1 / 6, abs=1e-12)
    bad = make_store(tmp_path / "bad.sqlite", [rating("i9", "zoe", "safe", 11)])
    with pytest.raises(RatingsError, match=r"bad.sqlite: row \(item='i9', rater='zoe'\): field 'score' is 11"):
        read_ratings(bad)
    # a store that records the round's items (safevlm annotate) rejects ratings of other items
    db = sqlite3.connect(store)
    db.execute("CREATE TABLE annotate_items (item TEXT PRIMARY KEY, kind TEXT NOT NULL, source TEXT NOT NULL, added REAL NOT NULL)")
    db.executemany("INSERT INTO annotate_items VALUES (?, 'answer', 'run', 0)", [(f"i{k}",) for k in range(1, 7)])
    db.commit()
    db.close()
    code, _, err = run_cli(capsys, "eval", "agreement", "--ratings", store)
    assert code == 2 and "item 'i7' (rated by 'bob') is not an answer in the item set of" in err
    (tmp_path / "other.sqlite").write_bytes(b"not a database at all" * 10)
    with pytest.raises(RatingsError, match="not a readable SQLite ratings store"):
        read_ratings(tmp_path / "other.sqlite")
    empty = tmp_path / "empty.sqlite"
    sqlite3.connect(empty).execute("CREATE TABLE x (a)").connection.close()
    with pytest.raises(RatingsError, match="no 'ratings' table"):
        read_ratings(empty)


# --------------------------------------------------------------------------- eval run folders


def test_rating_item_id_is_the_documented_hash():
    expected = "a-" + hashlib.sha256("m\x1fad\x1f\x1ftask\x1f7".encode()).hexdigest()[:16]
    assert rating_item_id("m", "ad", "", "task", "7") == expected
    assert rating_item_id("m", "ad", None, "task", "7") == expected
    ids = {rating_item_id(*f) for f in [("m", "", "", "t", "1"), ("m2", "", "", "t", "1"), ("m", "a", "", "t", "1"),
                                        ("m", "", "p", "t", "1"), ("m", "", "", "t2", "1"), ("m", "", "", "t", "2")]}
    assert len(ids) == 6


def test_head_label_rule():
    assert head_label({"action": "refuse", "risk_level": 0}) == "unsafe"
    assert head_label({"action": "allow", "risk_level": 2}) == "unsafe"
    assert head_label({"action": "hint", "risk_level": 0}) == "safe"
    assert head_label({"action": "allow", "risk_level": 0}) == "safe"


HEADS = {  # item id -> (action, risk_level, risk_type): head label unsafe, unsafe, safe, unsafe, safe
    "1": ("refuse", 0, "illegal"), "2": ("allow", 1, "privacy"), "3": ("allow", 0, "safe"),
    "4": ("hint", 3, "politics"), "5": ("hint", 0, "safe"),
}


@pytest.fixture
def run_dir(tmp_path):
    """An eval run folder written through the store API: 6 items (one failed generation), a
    ``rules`` classify judge (one unjudged) and an ``llm`` score judge."""
    key = RunKey("tiny-model", "adapter-x", "default")
    run = tmp_path / "run"
    with ResultsStore(run / "results.sqlite") as store:
        rows = []
        for k in range(1, 7):
            item = EvalItem(str(k), f"prompt {k}", labels={"risk_type": "illegal"})
            if k == 6:
                rows.append((item, "p", None, None, "CUDA out of memory"))
                continue
            action, level, risk_type = HEADS[str(k)]
            head = {"action": action, "risk_level": level, "risk_type": risk_type, "level_probs": [0.25] * 4,
                    "type_probs": {risk_type: 1.0}}
            rows.append((item, f"prompt {k}", f"answer {k}", head, None))
        store.put_answers(key, "redteam", rows)
        harmful = {"1": True, "2": False, "3": False, "4": True}
        for item_id, value in harmful.items():
            store.put_judgement(key, "redteam", item_id, "rules", "classify", Judgement("ok", refused=not value, harmful=value))
        store.put_judgement(key, "redteam", "5", "rules", "classify", Judgement.unjudged("reply could not be parsed"))
        for item_id, score in {"1": 2.0, "2": 9.0, "3": 10.0, "4": 3.0, "5": 7.0}.items():
            store.put_judgement(key, "redteam", item_id, "llm", "score", Judgement("ok", score=score, label=str(int(score))))
    ids = {k: rating_item_id("tiny-model", "adapter-x", "default", "redteam", k) for k in map(str, range(1, 7))}
    return run, ids


def test_run_ratings_give_judge_and_head_raters(run_dir):
    run, ids = run_dir
    result = run_ratings(run)
    assert result.items == frozenset(ids[k] for k in "12345")  # the failed generation is no answer
    assert result.raters == ["head", "judge:llm", "judge:rules"]
    got = {(r.rater, r.item): r for r in result.ratings}
    assert got[("judge:rules", ids["1"])] == Rating(ids["1"], "judge:rules", "unsafe", None, None)
    assert got[("judge:rules", ids["2"])].label == "safe"
    assert ("judge:rules", ids["5"]) not in got  # unjudged gives nothing
    assert got[("judge:llm", ids["2"])] == Rating(ids["2"], "judge:llm", None, 9, None)
    expected_head = {"1": "unsafe", "2": "unsafe", "3": "safe", "4": "unsafe", "5": "safe"}
    for k, label in expected_head.items():
        r = got[("head", ids[k])]
        assert (r.label, r.risk_type, r.risk_level) == (label, HEADS[k][2], HEADS[k][1])
    with pytest.raises(RatingsError, match="no results.sqlite"):
        run_ratings(run / "nowhere")


def test_cli_with_a_run_folder(run_dir, tmp_path, capsys):
    run, ids = run_dir
    humans = [  # labels: 1 unsafe, 2 safe, 3 safe, 4 safe, 5 unsafe (two raters agree everywhere)
        rating(ids[k], name, label, score) for name in ("ann", "ben")
        for k, label, score in (("1", "unsafe", 1), ("2", "safe", 8), ("3", "safe", 10), ("4", "safe", 6), ("5", "unsafe", 3))
    ]
    path = write_jsonl(tmp_path / "h.jsonl", humans)
    code, out, err = run_cli(capsys, "eval", "agreement", "--ratings", path, "--run", run, "--json", "--n-boot", "100")
    assert code == 0, err
    result = json.loads(out)
    # default: humans vs the first judge with labels (judge:rules; judge:llm gives only scores)
    assert (result["a"], result["b"]) == ("humans", "judge:rules")
    # item 5 unjudged -> 4 items; humans u s s s vs rules u s s u -> 3/4
    assert result["n"] == 4 and result["only_a"] == 1 and result["only_b"] == 0
    assert result["percent_agreement"] == 75.0 and result["confusion"]["matrix"] == [[2, 1], [0, 1]]
    assert result["cohen_kappa"] == pytest.approx(cohen_kappa_score(["u", "s", "s", "s"], ["u", "s", "s", "u"]), abs=1e-12)
    # humans vs the head: u s s s u vs u u s u s
    code, out, _ = run_cli(capsys, "eval", "agreement", "--ratings", path, "--run", run, "--a", "humans", "--b", "head",
                           "--json", "--n-boot", "100")
    head = json.loads(out)
    assert code == 0 and head["n"] == 5 and head["percent_agreement"] == pytest.approx(40.0)
    assert head["n_scores"] == 0 and head["weighted_kappa"] is None and head["weighted_kappa_ci95"] is None
    # ann vs the score judge: scores 1 8 10 6 3 vs 2 9 10 3 7
    code, out, _ = run_cli(capsys, "eval", "agreement", "--ratings", path, "--run", run, "--a", "ann", "--b", "judge:llm",
                           "--json", "--n-boot", "100")
    llm = json.loads(out)
    assert llm["n"] == 0 and llm["n_scores"] == 5 and llm["cohen_kappa"] is None
    assert llm["weighted_kappa"] == pytest.approx(
        cohen_kappa_score([1, 8, 10, 6, 3], [2, 9, 10, 3, 7], weights="quadratic", labels=list(range(1, 11))), abs=1e-9)
    # a rating of an item that is not an answer of the run
    stray = write_jsonl(tmp_path / "stray.jsonl", humans + [rating(ids["6"], "ann", "safe"), rating("a-0000", "ben", "safe")])
    code, _, err = run_cli(capsys, "eval", "agreement", "--ratings", stray, "--run", run)
    assert code == 2 and f"item {ids['6']!r} (rated by 'ann') is not an answer in the run" in err
    assert "2 rating(s) name items outside its 5 answers" in err
    code, _, err = run_cli(capsys, "eval", "agreement", "--ratings", path, "--run", tmp_path)
    assert code == 2 and "no results.sqlite" in err
