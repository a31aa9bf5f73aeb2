"""Calibration (temperature scaling written into the adapter) and threshold sweeps on the tiny
model: ECE falls on a held-out split and the temperatures reload; the sweep curve is monotone;
a written policy reproduces the target over-refusal on the validation data."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from eval_fixtures import eval_env, last_json, load_env_model, run_cli  # noqa: F401  (fixture)

from safevlm.eval import sweep as sw
from safevlm.eval.tasks import load_task
from safevlm.policy import load_policy


@pytest.fixture(scope="module")
def overconfident_adapter(eval_env, tmp_path_factory):  # noqa: F811
    """The env's adapter with both classifiers' weights scaled by 40: same predictions, probabilities near 0 / 1."""
    model, _ = load_env_model(eval_env)
    with torch.no_grad():
        for layer in (model.safety_head.level_classifier, model.safety_head.type_classifier):
            layer.weight.mul_(40)
            layer.bias.mul_(40)
    path = tmp_path_factory.mktemp("overconfident") / "adapter"
    model.save_pretrained(path)
    return path


def test_calibration_lowers_ece_on_held_out_items_and_the_temperatures_reload(eval_env, overconfident_adapter, tmp_path):  # noqa: F811
    from safetensors.torch import load_file

    from safevlm.eval.calibrate import CALIBRATION_NAME, calibrate, collect_logits, ece

    model, processor = load_env_model(eval_env, str(overconfident_adapter))
    fit_task, held_task = load_task("demo_val"), load_task("demo_heldout")
    held = held_task.read(eval_env["data"]).items
    data = collect_logits(model, processor, held, [held_task.render_prompt(i) for i in held])
    probs = np.exp(data.type - data.type.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    assert probs.max(axis=1).mean() > 0.9  # over-confident...
    assert (probs.argmax(axis=1) == data.type_labels).mean() < 0.5  # ...and mostly wrong
    before = load_file(str(overconfident_adapter / "safety_model.safetensors"))

    result = calibrate(model, processor, fit_task, adapter_dir=overconfident_adapter, data_root=eval_env["data"],
                       heldout_task=held_task)
    assert result.written and result.previous == {"level": 1.0, "type": 1.0}
    assert result.temperatures["type"] > 5 and result.temperatures["level"] > 5  # softened
    for name in ("level", "type"):
        h = result.heldout[name]
        assert h["ece_after"] < 0.5 * h["ece_before"], (name, h)  # calibration transfers to held-out items
        assert h["nll_after"] < h["nll_before"]
        assert result.fit[name]["nll_after"] <= result.fit[name]["nll_before"]
    assert result.heldout["type"]["ece_before"] == pytest.approx(ece(data.type, data.type_labels, 1.0))
    # written into the adapter: the two buffers change, nothing else does, and they reload
    after = load_file(str(overconfident_adapter / "safety_model.safetensors"))
    assert set(after) == set(before)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"safety_head.level_temperature", "safety_head.type_temperature"}
    reloaded, _ = load_env_model(eval_env, str(overconfident_adapter))
    assert float(reloaded.safety_head.type_temperature) == pytest.approx(result.temperatures["type"], rel=1e-6)
    assert float(reloaded.safety_head.level_temperature) == pytest.approx(result.temperatures["level"], rel=1e-6)
    info = json.loads((overconfident_adapter / CALIBRATION_NAME).read_text())
    assert info["task"] == "demo_val" and info["n"] == result.fit["n"] == len(fit_task.read(eval_env["data"]).items)
    # the reloaded head's ECE on the held-out items is the one calibration predicted
    again = collect_logits(reloaded, processor, held, [held_task.render_prompt(i) for i in held])
    assert ece(again.type, again.type_labels, result.temperatures["type"]) == pytest.approx(
        result.heldout["type"]["ece_after"], abs=1e-4)


def test_calibrate_command_prints_ece_before_and_after_and_dry_run_writes_nothing(eval_env, overconfident_adapter, capsys):  # noqa: F811
    weights = (overconfident_adapter / "safety_model.safetensors").read_bytes()
    code, out, _ = run_cli(capsys, "calibrate", "--model", eval_env["base"], "--adapter", overconfident_adapter,
                           "--task", "demo_val", "--eval-task", "demo_heldout", "--data-root", eval_env["data"], "--dry-run")
    assert code == 0 and "ECE type  on held out (demo_heldout): " in out and "dry run: the adapter was not changed" in out
    assert (overconfident_adapter / "safety_model.safetensors").read_bytes() == weights
    code, out, _ = run_cli(capsys, "calibrate", "--model", eval_env["base"], "--adapter", overconfident_adapter,
                           "--task", "demo_val", "--data-root", eval_env["data"], "--json", "--dry-run")
    result = json.loads(out)
    assert code == 0 and result["fit"]["n"] == 30 and result["written"] is False and result["heldout"] is None


def test_fit_temperature_recovers_the_temperature_labels_were_drawn_with():
    from safevlm.eval.calibrate import fit_temperature, nll

    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, size=(4000, 5))
    for true_t in (0.5, 2.5):
        p = np.exp(logits / true_t)
        p /= p.sum(axis=1, keepdims=True)
        labels = np.array([rng.choice(5, p=row) for row in p])
        t = fit_temperature(logits, labels)
        assert t == pytest.approx(true_t, rel=0.08)
        assert nll(logits, labels, t) <= min(nll(logits, labels, t * f) for f in (0.98, 1.02))


# --------------------------------------------------------------------------- sweep


@pytest.fixture(scope="module")
def val_rows(eval_env):  # noqa: F811
    model, processor = load_env_model(eval_env)
    rows, problems = sw.rows_from_model(model, processor, load_task("demo_val"), load_policy("default"),
                                        data_root=eval_env["data"])
    assert problems == [] and len(rows) == 30
    return rows


def test_sweep_curve_is_monotone_and_spans_all_to_none(val_rows):
    policy = load_policy("default")
    thresholds = [0.0001, *np.round(np.arange(0.02, 1.0001, 0.02), 4)]
    points = sw.sweep_points(val_rows, policy, thresholds, refuse_level="low")
    risky = [p["risky_refusal"] for p in points]
    over = [p["over_refusal"] for p in points]
    assert all(a >= b for a, b in zip(risky, risky[1:])) and all(a >= b for a, b in zip(over, over[1:]))
    assert risky[0] == over[0] == 1.0 and risky[-1] == over[-1] == 0.0
    assert len(set(risky)) > 2  # the curve moves through intermediate values
    # each point is Policy.decide's own count
    p = points[10]
    chosen = sw.policy_at(policy, p["threshold"], "low")
    refused = [r for r in val_rows if chosen.decide(r.level_probs, r.type_probs).action == "refuse"]
    assert p["risky_refusal"] == sum(r.risky for r in refused) / sum(r.risky for r in val_rows)


def test_written_policy_reproduces_the_target_over_refusal_on_the_validation_data(eval_env, tmp_path, capsys):  # noqa: F811
    from safevlm.data import open_image
    from safevlm.guarded import classify

    policy_file = tmp_path / "tuned.yaml"
    code, out, _ = run_cli(capsys, "eval", "sweep", "--model", eval_env["base"], "--adapter", eval_env["adapter"],
                           "--task", "demo_val", "--data-root", eval_env["data"], "--refuse-level", "low",
                           "--target-over-refusal", "0.4", "--write-policy", policy_file, "--out", tmp_path / "sweep",
                           "--json")
    assert code == 0
    result = last_json(out)
    chosen = result["chosen"]
    assert chosen["over_refusal"] <= 0.4 and result["policy_file"] == str(policy_file)
    assert {p.name for p in (tmp_path / "sweep").iterdir()} == {"sweep.json", "sweep.md", "sweep.png"}
    assert (tmp_path / "sweep" / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the written policy, loaded as a deployment loads it, on the validation items through the guard
    written = load_policy(str(policy_file))
    assert written.rule("illegal").refuse_threshold == chosen["threshold"] and written.rule("illegal").refuse_level == 1
    model, processor = load_env_model(eval_env)
    task = load_task("demo_val")
    items = task.read(eval_env["data"]).items
    decisions = classify(model, processor, [open_image(i.image, i.image_root) for i in items],
                         [task.render_prompt(i) for i in items], written)
    benign = [d.action == "refuse" for i, d in zip(items, decisions) if i.labels["expected"] == "answer"]
    risky = [d.action == "refuse" for i, d in zip(items, decisions) if i.labels["expected"] == "refuse"]
    assert sum(benign) / len(benign) == chosen["over_refusal"] <= 0.4
    assert sum(risky) / len(risky) == chosen["risky_refusal"]
    # and it is the lowest such threshold: a little lower refuses one benign item too many
    lower = sw.policy_at(load_policy("default"), chosen["threshold"] - 0.00012, "low")
    decisions = classify(model, processor, [open_image(i.image, i.image_root) for i in items],
                         [task.render_prompt(i) for i in items], lower)
    over = sum(d.action == "refuse" for i, d in zip(items, decisions) if i.labels["expected"] == "answer") / len(benign)
    assert over > 0.4


def test_sweep_of_a_run_counts_the_answers_too_and_lands_in_its_report(eval_env, tmp_path, capsys):  # noqa: F811
    run = tmp_path / "run"
    assert run_cli(capsys, "eval", "run", "--model", eval_env["base"], "--adapter", eval_env["adapter"], "--task", "demo_val",
                   "--data-root", eval_env["data"], "--max-new-tokens", "2", "--out", run)[0] == 0
    code, out, _ = run_cli(capsys, "eval", "sweep", "--run", run, "--task", "demo_val", "--thresholds", "0.1:0.5:0.1",
                           "--refuse-level", "low", "--json")
    assert code == 0
    result = last_json(out)
    assert result["basis"] == "policy + answers" and [p["threshold"] for p in result["points"]] == [0.1, 0.2, 0.3, 0.4, 0.5]
    rows, facts = sw.rows_from_run(run, "demo_val")
    assert facts["basis"] == "policy + answers" and all(r.answer_refused is not None for r in rows)
    point = result["points"][2]
    chosen = sw.policy_at(load_policy("default"), 0.3, "low")
    refused = [r for r in rows if chosen.decide(r.level_probs, r.type_probs).action == "refuse" or r.answer_refused]
    assert point["over_refusal"] == sum(not r.risky for r in refused) / sum(not r.risky for r in rows)
    html = (run / "report.html").read_text()
    assert "<h2>Threshold sweep</h2>" in html and "data:image/png;base64," in html
    assert "## Threshold sweep" in (run / "report.md").read_text()


def test_choose_threshold_exact_counts_and_unreachable_targets():
    from safevlm.errors import UsageError

    policy = load_policy("default")
    # all risk on one type, so the refusal score is P(level >= low): the level mass above 0
    rows = [sw.HeadRow(f"b{i}", False, [1 - s, s, 0.0, 0.0], [0, 1, 0, 0, 0, 0, 0]) for i, s in
            enumerate([0.1, 0.2, 0.3, 0.4, 0.5])]
    rows += [sw.HeadRow(f"r{i}", True, [1 - s, s, 0.0, 0.0], [0, 1, 0, 0, 0, 0, 0]) for i, s in enumerate([0.35, 0.45, 0.6])]
    swept = sw.policy_at(policy, 0.5, "low")
    assert [round(sw.refusal_score(swept, r.level_probs, r.type_probs), 6) for r in rows[:2]] == [0.1, 0.2]
    chosen = sw.choose_threshold(rows, policy, 0.4, "low")  # 2 of 5 benign may be refused: above 0.3
    assert chosen["threshold"] == 0.3001 and chosen["over_refusal"] == 0.4 and chosen["risky_refusal"] == 1.0
    assert sw.choose_threshold(rows, policy, 0.0, "low")["threshold"] == 0.5001
    assert sw.choose_threshold(rows, policy, 1.0, "low")["threshold"] == 0.0001
    # the model's own answers already refuse benign items: they count first
    answered = [sw.HeadRow(r.id, r.risky, r.level_probs, r.type_probs, r.id in ("b0", "b1")) for r in rows]
    assert sw.choose_threshold(answered, policy, 0.4, "low")["threshold"] == 0.5001
    with pytest.raises(UsageError, match="already refuse 2 of 5 benign"):
        sw.choose_threshold(answered, policy, 0.2, "low")
    certain = [sw.HeadRow("b", False, [0, 1, 0, 0], [0, 1, 0, 0, 0, 0, 0]), sw.HeadRow("r", True, [0, 1, 0, 0], [0, 1, 0, 0, 0, 0, 0])]
    with pytest.raises(UsageError, match="out of reach: 1 benign items have a refusal score of 1.00000"):
        sw.choose_threshold(certain, policy, 0.0, "low")
    with pytest.raises(UsageError, match="never refuses"):
        sw.policy_at(load_policy("hint_only"), 0.5)
    assert sw.parse_thresholds("0.1:0.3:0.1") == (0.1, 0.2, 0.3) and sw.parse_thresholds("0.5,0.2") == (0.2, 0.5)
    with pytest.raises(UsageError, match=r"in \(0, 1\]; got \[1.5\]"):
        sw.parse_thresholds("0.5,1.5")
    assert math.isinf(sw.refusal_score(swept, [float("nan")] * 4, [0, 1, 0, 0, 0, 0, 0]))
