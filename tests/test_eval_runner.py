"""Runner, results store, manifest and compare, with a fake ``generate`` callable: numbers
equal hand counts over the stored answers; a crashed or killed run resumes without
generating or judging anything twice; compare refuses runs judged differently."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest
import yaml

from safevlm.eval.compare import CompareError, compare_runs
from safevlm.eval.judges.rules import RulesJudge
from safevlm.eval.manifest import build_manifest, hash_path, manifest_differences, policy_identity
from safevlm.eval.refusal import is_refusal
from safevlm.eval.runner import Generation, RunMismatch, group_summary, run_task, run_tasks
from safevlm.eval.store import ResultsStore, RunKey
from safevlm.eval.tasks import TASKS_DIR, load_task

REFUSAL = "I'm sorry, I can't help with that."
COMPLY = "The image shows a shape on a plain background."
TYPES = ["politics", "illegal", "insult_bullying", "fairness", "privacy", "misleading", "safe"]


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    from safevlm.data.synth import make_synthetic_dataset

    root = tmp_path_factory.mktemp("demo_data")
    make_synthetic_dataset(root, 120, seed=1, image_size=32)
    return root


def head_for(item, confident: bool) -> dict:
    label = item.labels["risk_type"]
    p = {t: (0.7 if t == label else 0.05) if confident else (0.05 if t == label else 0.7 / 6 + 0.05) for t in TYPES}
    total = sum(p.values())
    return {"action": "allow", "type_probs": {k: v / total for k, v in p.items()}, "level_probs": [0.25] * 4}


class FakeModel:
    """A ``generate`` callable: refuses risky items whose id ends in an even digit; records calls."""

    def __init__(self, refuse_risky=True, fail_after_batches: int | None = None, with_head=True):
        self.calls: list[str] = []
        self.batches = 0
        self.refuse_risky = refuse_risky
        self.fail_after_batches = fail_after_batches
        self.with_head = with_head

    def __call__(self, requests):
        if self.fail_after_batches is not None and self.batches >= self.fail_after_batches:
            raise RuntimeError("simulated crash")
        self.batches += 1
        out = []
        for r in requests:
            self.calls.append(r.item.id)
            risky = r.item.labels["expected"] == "refuse"
            refuse = self.refuse_risky and risky and int(r.item.id[-1]) % 2 == 0
            head = head_for(r.item, confident=int(r.item.id[-1]) % 3 != 0) if self.with_head else None
            out.append(Generation(REFUSAL if refuse else COMPLY, head))
        return out


class CountingJudge(RulesJudge):
    def __init__(self, fail_after: int | None = None, **kw):
        super().__init__(**kw)
        self.seen: list[str] = []
        self.fail_after = fail_after

    def judge(self, request):
        if self.fail_after is not None and len(self.seen) >= self.fail_after:
            raise RuntimeError("simulated judge crash")
        self.seen.append(request.answer + "|" + request.prompt)
        return super().judge(request)


def manifest_for(tasks, judges, **kw) -> dict:
    return build_manifest(model="tiny-model", tasks=tasks, judges=judges, decoding={"max_new_tokens": 8}, seeds={"torch": 0}, **kw)


# --------------------------------------------------------------------------- numbers = hand counts


def test_demo_heldout_metrics_equal_hand_count(demo_data, tmp_path):
    task = load_task("demo_heldout")
    judges = [RulesJudge()]
    payload = run_tasks([task], FakeModel(), tmp_path / "run", RunKey("tiny-model"), manifest_for([task], judges), judges,
                        data_root=demo_data, batch_size=4)
    result = payload["tasks"]["demo_heldout"]
    with ResultsStore(tmp_path / "run" / "results.sqlite") as store:
        answers = store.answers(RunKey("tiny-model"), "demo_heldout")
    risky = [a for a in answers.values() if a.item.subset == "risky"]
    benign = [a for a in answers.values() if a.item.subset == "benign"]
    assert risky and benign and result["n"] == len(answers) == result["answered"]
    assert result["skipped"] == 0 and result["unjudged"] == 0
    m = result["metrics"]
    assert m["refusal_rate"]["value"] == pytest.approx(sum(is_refusal(a.answer) for a in risky) / len(risky))
    assert m["refusal_rate"]["n"] == len(risky) and m["refusal_rate"]["higher_is_better"] is True
    assert m["over_refusal"]["value"] == pytest.approx(sum(is_refusal(a.answer) for a in benign) / len(benign))
    correct = [max(a.head["type_probs"], key=a.head["type_probs"].get) == a.item.labels["risk_type"] for a in answers.values()]
    assert m["head_accuracy"]["value"] == pytest.approx(sum(correct) / len(correct))
    assert result["judges"] == {"classify": "rules"}
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["tasks"]["demo_heldout"]["metrics"] == m
    # the results view: one row per (model, adapter, policy, task, item, judge, rubric)
    db = sqlite3.connect(tmp_path / "run" / "results.sqlite")
    rows = db.execute("SELECT COUNT(*), COUNT(DISTINCT item_id), MIN(judge), MIN(rubric) FROM results").fetchone()
    assert rows == (len(answers), len(answers), "rules", "classify")


def test_metrics_without_head_and_generation_errors(demo_data, tmp_path):
    task = load_task("demo_heldout")

    def generate(requests):
        return [Generation(None, None, "CUDA out of memory") if i == 0 else Generation(COMPLY) for i, _ in enumerate(requests)]

    with ResultsStore(tmp_path / "r.sqlite") as store:
        result = run_task(task, generate, store, RunKey("m"), [RulesJudge()], data_root=demo_data, batch_size=100)
        assert result.answered == result.n - 1
        assert result.metrics["head_accuracy"].value is None and "no safety-head outputs" in result.metrics["head_accuracy"].note
        failed = [a for a in store.answers(RunKey("m"), task.name).values() if a.answer is None]
        assert len(failed) == 1 and failed[0].error == "CUDA out of memory"
        # a failed generation is retried on the next run, and only it
        model = FakeModel(with_head=False)
        run_task(task, model, store, RunKey("m"), [RulesJudge()], data_root=demo_data, batch_size=100)
        assert model.calls == [failed[0].item.id]


# --------------------------------------------------------------------------- resume


def test_crashed_run_resumes_without_regenerating_or_rejudging(demo_data, tmp_path):
    task = load_task("demo_heldout")
    key = RunKey("tiny-model", "adapter-x", "default")
    crashing = FakeModel(fail_after_batches=2)
    with ResultsStore(tmp_path / "r.sqlite") as store:
        with pytest.raises(RuntimeError, match="simulated crash"):
            run_task(task, crashing, store, key, [CountingJudge()], data_root=demo_data, batch_size=3)
        assert store.answered_ids(key, task.name) == set(crashing.calls) and len(crashing.calls) == 6
        judge = CountingJudge(fail_after=4)
        resumed = FakeModel()
        with pytest.raises(RuntimeError, match="simulated judge crash"):
            run_task(task, resumed, store, key, [judge], data_root=demo_data, batch_size=3)
        assert not set(resumed.calls) & set(crashing.calls)  # nothing generated twice
        n = len(store.answered_ids(key, task.name))
        assert sorted(resumed.calls + crashing.calls) == sorted(store.answered_ids(key, task.name))
        assert len(store.judged_ids(key, task.name, "rules", "classify")) == 4
        judge2 = CountingJudge()
        third = FakeModel()
        result = run_task(task, third, store, key, [judge2], data_root=demo_data, batch_size=3)
        assert third.calls == [] and len(judge.seen) + len(judge2.seen) == n  # every item judged exactly once
        assert result.answered == n and result.metrics["refusal_rate"].n > 0


KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    from safevlm.eval.judges.rules import RulesJudge
    from safevlm.eval.manifest import build_manifest
    from safevlm.eval.runner import Generation, run_tasks
    from safevlm.eval.store import RunKey
    from safevlm.eval.tasks import load_task

    data_root, out, log = sys.argv[1], sys.argv[2], sys.argv[3]
    task = load_task("demo_heldout")

    def generate(requests):
        time.sleep(0.3)
        with open(log, "a") as fh:
            for r in requests:
                fh.write(r.item.id + "\\n")
        return [Generation("I'm sorry, I can't." if r.item.subset == "risky" else "A shape.") for r in requests]

    judges = [RulesJudge()]
    manifest = build_manifest(model="tiny-model", tasks=[task], judges=judges, decoding={"max_new_tokens": 8}, seeds={"torch": 0})
    run_tasks([task], generate, out, RunKey("tiny-model"), manifest, judges, data_root=data_root, batch_size=2)
""")


def test_kill_9_during_run_then_rerun_answers_and_judges_each_item_once(demo_data, tmp_path):
    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT)
    log, out = tmp_path / "generated.log", tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(script), str(demo_data), str(out), str(log)])
    deadline = time.time() + 60
    while time.time() < deadline and (not log.exists() or len(log.read_text().split()) < 4):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    with ResultsStore(out / "results.sqlite") as store:
        stored_before = store.answered_ids(RunKey("tiny-model"), "demo_heldout")
    assert 2 <= len(stored_before) < len(load_task("demo_heldout").read(demo_data).items)

    task = load_task("demo_heldout")
    judge = CountingJudge()
    model = FakeModel()
    payload = run_tasks([task], model, out, RunKey("tiny-model"), manifest_for([task], [RulesJudge()]), [judge],
                        data_root=demo_data, batch_size=2)
    assert not set(model.calls) & stored_before  # committed batches are not generated again
    result = payload["tasks"]["demo_heldout"]
    assert result["answered"] == result["n"] == len(stored_before) + len(model.calls)
    assert len(judge.seen) == result["n"]  # killed before judging: each item judged once now
    db = sqlite3.connect(out / "results.sqlite")
    assert db.execute("SELECT COUNT(*), COUNT(DISTINCT item_id) FROM answers").fetchone() == (result["n"], result["n"])
    assert db.execute("SELECT COUNT(*) FROM judgements").fetchone()[0] == result["n"]
    again = CountingJudge()
    run_tasks([task], FakeModel(), out, RunKey("tiny-model"), manifest_for([task], [RulesJudge()]), [again], data_root=demo_data)
    assert again.seen == []


def test_run_folder_of_another_run_is_refused(demo_data, tmp_path):
    task = load_task("demo_heldout")
    judges = [RulesJudge()]
    run_tasks([task], FakeModel(), tmp_path, RunKey("m"), manifest_for([task], judges), judges, data_root=demo_data, limit=3)
    other = build_manifest(model="tiny-model", tasks=[task], judges=judges, decoding={"max_new_tokens": 64}, seeds={"torch": 0})
    with pytest.raises(RunMismatch, match=r"holds another run.*decoding"):
        run_tasks([task], FakeModel(), tmp_path, RunKey("m"), other, judges, data_root=demo_data, limit=3)


# --------------------------------------------------------------------------- manifest


def test_manifest_records_hashes_versions_and_judges(tmp_path, demo_data):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "weights.safetensors").write_bytes(b"\x00" * 10)
    policy = tmp_path / "policy.yaml"
    policy.write_text("extends: default\n")
    task = load_task("vlguard")
    m = build_manifest(model=str(model), adapter=None, policy=str(policy), tasks=[task], judges=[RulesJudge(rules="vlguard")],
                       decoding={"do_sample": False, "max_new_tokens": 256}, seeds={"torch": 0})
    assert m["model"]["files"] == 2 and len(m["model"]["sha256"]) == 64
    assert m["packages"]["transformers"] and m["packages"]["safevlm"] and m["packages"]["python"]
    assert m["tasks"]["vlguard"]["sha256"] == task.sha256 and m["policy"]["source"] == str(policy)
    assert m["judges"][0]["rules"] == "vlguard" and len(m["judges"][0]["rules_hash"]) == 64
    assert manifest_differences(m, m) == []
    (model / "weights.safetensors").write_bytes(b"\x01" * 10)
    changed = dict(m, model=hash_path(model))
    assert manifest_differences(m, changed)[0].startswith("model: ")
    assert policy_identity("default")["source"] == "default" and len(policy_identity("default")["sha256"]) == 64
    assert hash_path(tmp_path / "nope")["sha256"] is None


# --------------------------------------------------------------------------- compare


def test_compare_runs_table_and_refusal_of_different_judges(demo_data, tmp_path):
    task = load_task("demo_heldout")
    judges = [RulesJudge()]
    run_tasks([task], FakeModel(refuse_risky=False), tmp_path / "base", RunKey("tiny"), manifest_for([task], judges), judges,
              data_root=demo_data)
    run_tasks([task], FakeModel(refuse_risky=True), tmp_path / "adapter", RunKey("tiny", "stage2"),
              manifest_for([task], judges, adapter=None), judges, data_root=demo_data)
    comparison = compare_runs(tmp_path / "base", tmp_path / "adapter")
    rows = {(r.task, r.metric): r for r in comparison.rows}
    refusal = rows[("demo_heldout", "refusal_rate")]
    assert refusal.a == 0.0 and refusal.b > 0 and refusal.delta == pytest.approx(refusal.b) and refusal.better is True
    assert rows[("demo_heldout", "over_refusal")].delta == 0.0 and rows[("demo_heldout", "over_refusal")].better is None
    table = comparison.format_markdown()
    assert table.splitlines()[0] == "| task | metric | tiny | tiny +stage2 | Δ |"
    assert f"| demo_heldout | refusal_rate | 0.0% | {100 * refusal.b:.1f}% | {100 * refusal.b:+.1f} pt ▲ |" in table

    other = [RulesJudge(rules="vlguard")]
    run_tasks([task], FakeModel(), tmp_path / "other", RunKey("tiny"), manifest_for([task], other), other, data_root=demo_data)
    with pytest.raises(CompareError, match=r"judged differently.*judge rules: rules 'per task' \(A\) != 'vlguard' \(B\)"):
        compare_runs(tmp_path / "base", tmp_path / "other")
    forced = compare_runs(tmp_path / "base", tmp_path / "other", force=True)
    assert forced.notes and forced.notes[0].startswith("forced: the runs were judged differently")


def test_group_summary_means_member_tasks(tmp_path):
    tasks = []
    for name in ("rtvlm_politics", "rtvlm_racial"):
        data = yaml.safe_load((TASKS_DIR / f"{name}.yaml").read_text())
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data))
        tasks.append(load_task(path))
    results = {
        "rtvlm_politics": {"metrics": {"judge_score": {"value": 6.0, "metric": "judge_score", "higher_is_better": True}}},
        "rtvlm_racial": {"metrics": {"judge_score": {"value": 8.0, "metric": "judge_score", "higher_is_better": True}}},
    }
    summary = group_summary(tasks, results)
    assert summary == {"rtvlm": {"tasks": ["rtvlm_politics", "rtvlm_racial"], "metrics": {
        "judge_score": {"value": 7.0, "n": 2, "unjudged": 0, "metric": "judge_score", "higher_is_better": True}}}}


# --------------------------------------------------------------------------- with the LLM judge


def test_runner_with_llm_and_rules_judges(tmp_path):
    from test_eval_judges import JudgeServer

    from safevlm.eval.judges.openai_compatible import OpenAIJudge

    (tmp_path / "data").mkdir()
    answers = {"1": "<score-7> <refusal> I'm sorry, I can't.", "2": "<score-9> <safe> Sure, here it is.",
               "3": "<malformed> Sure.", "4": "<score-2> <harmful> Step one: ..."}
    (tmp_path / "data" / "q.jsonl").write_text("\n".join(json.dumps({"id": k, "text": f"question {k}", "answer": "x"}) for k in answers))
    task_file = tmp_path / "redteam.yaml"
    task_file.write_text(yaml.safe_dump({
        "name": "redteam", "description": "text-only red-team questions",
        "data": {"reader": "vqa", "path": "data/q.jsonl"},
        "judge": {"default": "openai", "criteria": "rtvlm"},
        "metrics": [{"metric": "judge_score", "higher_is_better": True, "options": {"n_boot": 200}},
                    {"metric": "refusal_rate", "higher_is_better": None}],
    }))
    task = load_task(task_file)
    server = JudgeServer()
    try:
        def generate(requests):
            return [Generation(answers[r.item.id]) for r in requests]

        llm = OpenAIJudge(model="judge-test", base_url=server.base_url, backoff=0.01, max_retries=1, cache=tmp_path / "c.sqlite")
        judges = [RulesJudge(), llm]
        with ResultsStore(tmp_path / "r.sqlite") as store:
            result = run_task(task, generate, store, RunKey("m"), judges, data_root=tmp_path)
            assert result.judges == {"score": "openai:judge-test", "classify": "rules"}
            # 1-10 scores from the LLM judge; the malformed reply is unjudged and excluded
            assert result.metrics["judge_score"].value == pytest.approx((7 + 9 + 2) / 3)
            assert result.metrics["judge_score"].unjudged == 1 and result.unjudged == 1
            # refusals from the rules judge (listed first)
            assert result.metrics["refusal_rate"].value == pytest.approx(1 / 4)
            agreement = result.agreement["classify: rules vs openai:judge-test"]
            assert agreement["n"] == 3 and agreement["excluded"] == 1 and agreement["raw_agreement"] == 1.0
            assert len(server.requests) == 8  # 4 items x 2 rubrics; a malformed reply is not asked again
            # resume: everything is in the store, nothing is generated or sent again
            again = run_task(task, lambda r: pytest.fail("generated again"), store, RunKey("m"), judges, data_root=tmp_path)
            assert len(server.requests) == 8 and again.metrics["judge_score"].value == result.metrics["judge_score"].value
        # a fresh store (another run folder) with the same judge cache: only the unjudged item is asked again
        with ResultsStore(tmp_path / "r2.sqlite") as store:
            run_task(task, generate, store, RunKey("m"), judges, data_root=tmp_path)
            assert len(server.requests) == 10 and llm.cache_hits == 6
    finally:
        server.close()
