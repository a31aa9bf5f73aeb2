"""The demo's evaluation section (`safevlm.eval.demo_section.run_demo_evaluation`): demo_heldout,
FigStep on SafeBench questions rendered with the exact renderer, and the benign control in
the same layout; its numbers are counts over the stored results, and it stays under a minute
on the tiny default model."""

from __future__ import annotations

import csv
import time
from types import SimpleNamespace

import pytest
from eval_fixtures import SHARED_SAFEBENCH, eval_env, load_env_model  # noqa: F401  (fixture)

from safevlm.eval import demo_section
from safevlm.eval.store import ResultsStore

needs_safebench = pytest.mark.skipif(not SHARED_SAFEBENCH.is_file(),
                                     reason=f"SafeBench's CSV is not at {SHARED_SAFEBENCH} (../shared/data, a source checkout)")
SETTINGS = SimpleNamespace(max_new_tokens=8, batch_size=16, seed=0, threads=None)


def _heads(run_dir, task):
    with ResultsStore(run_dir / "results.sqlite") as store:
        key = next(k for k in store.keys() if task in store.tasks(k))
        return store.answers(key, task)


@needs_safebench
def test_subset_takes_the_first_questions_of_every_topic(tmp_path):
    n = demo_section.write_safebench_subset(SHARED_SAFEBENCH, tmp_path / "s.csv", 2)
    rows = list(csv.DictReader((tmp_path / "s.csv").open(encoding="utf-8")))
    assert n == len(rows) == 20 and {r["task_id"] for r in rows} == {"1", "2"}
    assert len({r["category_name"] for r in rows}) == 10
    assert list(rows[0]) == ["dataset", "category_id", "task_id", "category_name", "question", "instruction"]


@needs_safebench
def test_demo_evaluation_numbers_are_counts_over_the_stored_results(eval_env, tmp_path):  # noqa: F811
    model, processor = load_env_model(eval_env)
    result = demo_section.run_demo_evaluation(
        model, processor, tmp_path, eval_env["data"], SETTINGS, model_label=eval_env["base"],
        adapter_label=eval_env["adapter"], heldout_limit=12, figstep_per_topic=1)
    run = tmp_path / "eval"
    assert result["run_dir"] == str(run) and (run / "report.html").is_file() and (run / "report.md").is_file()
    figstep, benign = _heads(run, "figstep"), _heads(run, "figstep_benign")
    assert len(figstep) == result["figstep"]["n"] == 10 and len(benign) == result["figstep_benign"]["n"] == 50
    assert {a.item.category for a in figstep.values()} == {
        "Illegal Activity", "Hate Speech", "Malware Generation", "Physical Harm", "Fraud", "Adult Content",
        "Privacy Violation", "Legal Opinion", "Financial Advice", "Health Consultation"}
    assert all(isinstance(a.item.metadata.get("instruction"), str) for a in figstep.values())
    for name, answers in (("figstep", figstep), ("figstep_benign", benign)):
        flags = [max(a.head["type_probs"], key=a.head["type_probs"].get) != "safe" for a in answers.values()]
        refusals = [a.head["action"] == "refuse" for a in answers.values()]
        assert result[name]["head_flag_rate"] == pytest.approx(sum(flags) / len(flags))
        assert result[name]["policy_refusal_rate"] == pytest.approx(sum(refusals) / len(refusals))
    from safevlm.eval.refusal import is_refusal

    assert result["figstep"]["asr"] == pytest.approx(sum(not is_refusal(a.answer) for a in figstep.values()) / 10)
    assert result["figstep_benign"]["over_refusal"] == pytest.approx(sum(is_refusal(a.answer) for a in benign.values()) / 50)
    assert result["demo_heldout"]["n"] == 12 and result["demo_heldout"]["head_accuracy"] is not None
    heldout = _heads(run, "demo_heldout").values()
    n_risky = sum(a.item.labels["risk_level"] > 0 for a in heldout)
    assert (result["demo_heldout"]["n_risky"], result["demo_heldout"]["n_benign"]) == (n_risky, 12 - n_risky)
    assert result["demo_heldout"]["refusal_rate"] == pytest.approx(
        sum(is_refusal(a.answer) for a in heldout if a.item.labels["risk_level"] > 0) / n_risky)
    md = result["markdown"]
    assert (f"refusal on risky {100 * result['demo_heldout']['refusal_rate']:.1f}% (of {n_risky}), over-refusal on benign "
            f"{100 * result['demo_heldout']['over_refusal']:.1f}% (of {12 - n_risky})") in md
    assert ("Under the `default` policy the policy itself refuses only what the head judges "
            "high-risk; a low- or medium-risk request gets a hint") in md
    assert md.startswith("## Evaluation (`safevlm eval`)")
    assert f"| FigStep (SafeBench, 10 questions) | 10 | {100 * result['figstep']['head_flag_rate']:.1f}% |" in md
    assert "The head flags " in md and result["notes"] == []
    # per-category bar charts (FigStep's ASR per topic), inline in the HTML and as files beside report.md
    charts = sorted(p.name for p in (run / "report_files").iterdir())
    assert "figstep__asr.png" in charts and "figstep_benign__over_refusal.png" in charts
    assert "![figstep: asr](report_files/figstep__asr.png)" in (run / "report.md").read_text()
    assert (run / "report.html").read_text().count("data:image/png;base64,") == len(charts)
    # the manifest names the demo's model and adapter, hashed
    import json

    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["model"]["path"] == eval_env["base"] and manifest["adapter"]["sha256"]
    assert set(manifest["tasks"]) == {"demo_heldout", "figstep", "figstep_benign"}


def test_the_benign_control_ships_with_safevlm_in_the_figstep_layout():
    from safevlm.data.figstep import FIGSTEP_PROMPT, render_figstep_png
    from safevlm.eval.readers import read_items
    from safevlm.eval.tasks import PACKAGE_DATA_DIR, load_task

    task = load_task("figstep_benign")
    report = task.read(None)  # no data root: the data is in the package
    assert len(report.items) == 50 and report.skipped == []
    assert {i.category for i in report.items} == {"Cooking", "Gardening", "Home Repair", "Fitness", "Budgeting", "Travel",
                                                  "Study Skills", "Crafts", "Pet Care", "Computing"}
    item = report.items[0]
    assert item.labels == {"risk_type": "safe", "risk_level": 0, "expected": "answer"} and item.prompt == FIGSTEP_PROMPT
    assert item.image == render_figstep_png(item.metadata["instruction"])  # FigStep's exact renderer
    # the same CSV read without the control's label table: its topics are not SafeBench's
    plain = read_items("figstep", PACKAGE_DATA_DIR / "figstep_benign.csv", None, {}, None)
    assert plain.items == [] and "unknown SafeBench category 'Cooking'" in plain.skipped[0].reason
    with pytest.raises(ValueError, match="data option 'mapping' must be a .yaml label table path"):
        read_items("figstep", PACKAGE_DATA_DIR / "figstep_benign.csv", None, {"mapping": 3}, None)


def test_without_safebench_the_figstep_part_is_skipped_and_said(eval_env, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setattr(demo_section, "SHARED_SAFEBENCH", tmp_path / "nowhere.csv")
    monkeypatch.delenv("SAFEVLM_DATA_ROOT", raising=False)
    model, processor = load_env_model(eval_env)
    result = demo_section.run_demo_evaluation(model, processor, tmp_path, eval_env["data"], SETTINGS, heldout_limit=4)
    assert result["figstep"] is None and result["figstep_benign"]["n"] == 50
    assert "FigStep skipped: SafeBench's CSV was not found" in result["markdown"]
    assert "Transfer to FigStep was not measured" in result["markdown"]
    with pytest.raises(FileNotFoundError, match="SafeBench CSV not found"):
        demo_section.find_safebench_csv(tmp_path / "missing.csv")


@pytest.mark.slow
@needs_safebench
def test_demo_evaluation_runs_in_under_a_minute_on_the_tiny_default_model(tmp_path):
    import torch

    from safevlm.data.synth import make_synthetic_dataset
    from safevlm.demo import DemoSettings
    from safevlm.loading import load_model_and_processor

    settings = DemoSettings()
    torch.set_num_threads(settings.threads)
    # a test split of HELDOUT_LIMIT items, as in the demo (10 % of the samples)
    make_synthetic_dataset(tmp_path / "data", 10 * demo_section.HELDOUT_LIMIT, settings.seed, image_size=112, font_variety=1)
    model, processor = load_model_and_processor("tiny:default", None, device="cpu", dtype="float32", **settings.safety)
    start = time.time()
    result = demo_section.run_demo_evaluation(model, processor, tmp_path, tmp_path / "data", settings)
    seconds = time.time() - start
    assert result["demo_heldout"]["n"] == demo_section.HELDOUT_LIMIT and result["figstep"]["n"] == 50
    assert seconds < 60, f"the demo's evaluation took {seconds:.0f} s"
