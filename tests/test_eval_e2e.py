"""`safevlm eval run` end to end on the tiny model: numbers equal hand counts over the stored
answers, a run killed with SIGKILL resumes with every item answered and judged exactly once,
reports and comparisons come out of the run folders."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
from eval_fixtures import eval_env, last_json, load_env_model, run_cli  # noqa: F401  (fixture)

from safevlm.eval.refusal import is_refusal
from safevlm.eval.store import ResultsStore, RunKey


@pytest.fixture(scope="module")
def half_refusing_policy(eval_env, tmp_path_factory):  # noqa: F811
    """A policy whose refuse threshold is the median refusal score of demo_heldout's items, so
    the policy refuses about half of them (the fresh head's scores are arbitrary but fixed)."""
    import statistics

    from safevlm.eval.sweep import policy_at, refusal_score, rows_from_model, write_policy
    from safevlm.eval.tasks import load_task
    from safevlm.policy import load_policy

    model, processor = load_env_model(eval_env)
    base = load_policy("default")
    rows, _ = rows_from_model(model, processor, load_task("demo_heldout"), base, data_root=eval_env["data"])
    swept = policy_at(base, 0.5, "low")
    threshold = round(statistics.median(refusal_score(swept, r.level_probs, r.type_probs) for r in rows), 4)
    path = tmp_path_factory.mktemp("policy") / "half.yaml"
    return write_policy(path, base, threshold, "low")


def _stored(run_dir, key: RunKey, task: str):
    with ResultsStore(run_dir / "results.sqlite") as store:
        return store.answers(key, task), store.judgements(key, task, "rules")


def test_demo_heldout_numbers_equal_a_hand_count_over_stored_answers(eval_env, half_refusing_policy, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    code, stdout, _ = run_cli(capsys, "eval", "run", "--model", eval_env["base"], "--adapter", eval_env["adapter"],
                              "--policy", half_refusing_policy, "--task", "demo_heldout", "--data-root", eval_env["data"],
                              "--judge", "rules", "--out", out, "--max-new-tokens", "8", "--batch-size", "4", "--json")
    assert code == 0
    payload = last_json(stdout)
    result = payload["tasks"]["demo_heldout"]
    assert set(result) == {"n", "answered", "skipped", "unjudged", "metrics"}
    answers, verdicts = _stored(out, RunKey(*payload["run"].values()), "demo_heldout")
    assert result["n"] == result["answered"] == len(answers) == 30 and result["skipped"] == result["unjudged"] == 0
    risky = [a for a in answers.values() if a.item.labels["expected"] == "refuse"]
    benign = [a for a in answers.values() if a.item.labels["expected"] == "answer"]
    refused_by_policy = [a for a in answers.values() if a.head["action"] == "refuse"]
    assert 0 < len(refused_by_policy) < len(answers)  # the policy refused some, the LLM answered the rest
    m = result["metrics"]
    assert m["refusal_rate"]["value"] == pytest.approx(sum(is_refusal(a.answer) for a in risky) / len(risky))
    assert m["refusal_rate"]["n"] == len(risky)
    assert m["over_refusal"]["value"] == pytest.approx(sum(is_refusal(a.answer) for a in benign) / len(benign))
    top = {i: max(a.head["type_probs"], key=a.head["type_probs"].get) for i, a in answers.items()}
    assert m["head_accuracy"]["value"] == pytest.approx(
        sum(top[i] == a.item.labels["risk_type"] for i, a in answers.items()) / len(answers))
    # every verdict is the rules judge's on the stored answer, one per item
    assert {i for i, _ in verdicts} == set(answers)
    assert all(v.refused == is_refusal(answers[i].answer) for (i, _), v in verdicts.items())
    # what the policy refused carries the policy's refusal text
    assert all(is_refusal(a.answer) for a in refused_by_policy)
    # the run folder: manifest with the policy's hash, report files
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["policy"]["source"] == str(half_refusing_policy) and manifest["extra"]["mode"] == "guarded"
    assert manifest["decoding"] == {"do_sample": False, "max_new_tokens": 8, "dtype": "float32"}
    md, html = (out / "report.md").read_text(), (out / "report.html").read_text()
    assert "## demo_heldout" in md and f"| refusal_rate ↑ | {100 * m['refusal_rate']['value']:.1f}% |" in md
    assert "Sample answers" in md and "<h2 id=\"task-demo_heldout\">" in html
    assert not re.search(r"""(src|href)=["']https?://""", html)  # self-contained: nothing fetched


def test_base_adapter_compare_and_the_report_of_a_run(eval_env, tmp_path, capsys):  # noqa: F811
    common = ["--task", "demo_heldout", "--data-root", eval_env["data"], "--max-new-tokens", "4", "--limit", "8", "--json"]
    assert run_cli(capsys, "eval", "run", "--model", eval_env["base"], "--out", tmp_path / "base", *common)[0] == 0
    code, stdout, _ = run_cli(capsys, "eval", "run", "--model", eval_env["base"], "--adapter", eval_env["adapter"],
                              "--out", tmp_path / "adapter", *common)
    adapter = last_json(stdout)["tasks"]["demo_heldout"]
    assert code == 0 and adapter["metrics"]["head_accuracy"]["value"] is not None
    base = json.loads((tmp_path / "base" / "metrics.json").read_text())["tasks"]["demo_heldout"]
    assert base["metrics"]["head_accuracy"]["value"] is None and "no safety-head outputs" in base["metrics"]["head_accuracy"]["note"]
    code, stdout, _ = run_cli(capsys, "eval", "compare", tmp_path / "base", tmp_path / "adapter")
    assert code == 0 and "| task | metric | base | base +adapter | Δ |" in stdout
    row = next(line for line in stdout.splitlines() if line.startswith("| demo_heldout | head_accuracy |"))
    assert row.split("|")[3].strip() == "–" and row.split("|")[4].strip() == f"{100 * adapter['metrics']['head_accuracy']['value']:.1f}%"
    code, stdout, _ = run_cli(capsys, "eval", "compare", tmp_path / "base", tmp_path / "adapter", "--json")
    rows = {(r["task"], r["metric"]): r for r in json.loads(stdout)["rows"]}
    assert rows[("demo_heldout", "refusal_rate")]["delta"] == pytest.approx(
        adapter["metrics"]["refusal_rate"]["value"] - base["metrics"]["refusal_rate"]["value"])
    # a run with another judge is not comparable without --force
    assert run_cli(capsys, "eval", "run", "--model", eval_env["base"], "--out", tmp_path / "sem", *common[:-1],
                   "--judge", "semantic")[0] == 0
    code, _, err = run_cli(capsys, "eval", "compare", tmp_path / "base", tmp_path / "sem")
    assert code == 2 and "judged differently" in err and "--force" in err
    assert run_cli(capsys, "eval", "compare", tmp_path / "base", tmp_path / "sem", "--force")[0] == 0
    # the report can be rebuilt from the folder alone
    (tmp_path / "adapter" / "report.md").unlink()
    code, stdout, _ = run_cli(capsys, "eval", "report", tmp_path / "adapter", "--samples", "2")
    assert code == 0 and (tmp_path / "adapter" / "report.md").read_text().count("  - verdicts: ") == 2


KILL_ARGS = ["--max-new-tokens", "40", "--batch-size", "1", "--judge", "rules"]


def test_kill_9_during_eval_run_then_rerun_answers_and_judges_every_item_once(eval_env, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    argv = ["eval", "run", "--model", eval_env["base"], "--adapter", eval_env["adapter"], "--task", "demo_val",
            "--task", "demo_heldout", "--data-root", eval_env["data"], "--limit", "6", "--out", str(out), *KILL_ARGS]
    proc = subprocess.Popen([sys.executable, "-m", "safevlm.cli", *argv], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    db_path = out / "results.sqlite"

    def counts():
        try:
            db = sqlite3.connect(db_path, timeout=5)
            try:
                return (db.execute("SELECT COUNT(*) FROM judgements WHERE task='demo_val'").fetchone()[0],
                        db.execute("SELECT COUNT(*) FROM answers WHERE task='demo_heldout'").fetchone()[0])
            finally:
                db.close()
        except sqlite3.Error:
            return 0, 0

    deadline = time.time() + 240
    # kill once the first task is answered and judged and the second has some answers, not all
    while time.time() < deadline and proc.poll() is None and not (counts()[0] == 6 and counts()[1] >= 2):
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    db = sqlite3.connect(db_path)
    before = dict(((t, i), c) for t, i, c in db.execute("SELECT task, item_id, created FROM answers"))
    judged_before = dict(((t, i), c) for t, i, c in db.execute("SELECT task, item_id, created FROM judgements"))
    db.close()
    assert len(judged_before) == 6 and 8 <= len(before) < 12

    code, stdout, _ = run_cli(capsys, *argv, "--json")
    assert code == 0
    payload = last_json(stdout)
    assert all(payload["tasks"][t]["answered"] == payload["tasks"][t]["n"] == 6 for t in ("demo_val", "demo_heldout"))
    db = sqlite3.connect(db_path)
    after = dict(((t, i), c) for t, i, c in db.execute("SELECT task, item_id, created FROM answers"))
    judged = db.execute("SELECT task, item_id, judge, rubric, created FROM judgements").fetchall()
    assert len(after) == 12 and all(after[k] == v for k, v in before.items())  # nothing answered twice
    assert len(judged) == len({(t, i, j, r) for t, i, j, r, _ in judged}) == 12  # one verdict per item
    assert all(c == judged_before[(t, i)] for t, i, _, _, c in judged if (t, i) in judged_before)  # none judged twice
    # a third run finds everything done: no new answer, no new verdict
    assert run_cli(capsys, *argv)[0] == 0
    snapshot = db.execute("SELECT task, item_id, created FROM answers UNION ALL SELECT task, item_id, created FROM judgements").fetchall()
    assert sorted(snapshot) == sorted([(t, i, c) for (t, i), c in after.items()] + [(t, i, c) for t, i, _, _, c in judged])
