"""`safevlm eval ...` and `safevlm calibrate`: help on every command, and user mistakes end as
one line (`safevlm eval: error: ...`) with exit status 2, before any model is loaded."""

from __future__ import annotations

import json

import pytest
from eval_fixtures import run_cli

from safevlm.cli import main


@pytest.mark.parametrize("argv", [
    ["eval", "--help"], ["eval", "run", "--help"], ["eval", "compare", "--help"], ["eval", "tasks", "--help"],
    ["eval", "sweep", "--help"], ["eval", "report", "--help"], ["calibrate", "--help"],
])
def test_every_eval_command_has_help(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and out.startswith("usage: safevlm " + " ".join(argv[:-1]))
    assert len(out.splitlines()) > 5


def test_eval_without_an_action_prints_help(capsys):
    code, out, _ = run_cli(capsys, "eval")
    assert code == 2 and all(f"    {action} " in out for action in ("run", "compare", "tasks", "sweep", "report"))


def test_eval_tasks_lists_each_shipped_task_with_its_layout(capsys):
    from safevlm.eval.tasks import list_tasks

    code, out, _ = run_cli(capsys, "eval", "tasks")
    assert code == 0 and all(f"{name}: " in out for name in list_tasks())
    assert "figstep_benign: benign control in the FigStep layout" in out and "data:    package:figstep_benign.csv" in out
    code, out, _ = run_cli(capsys, "eval", "tasks", "--json")
    rows = {r["name"]: r for r in json.loads(out)}
    assert rows["pope"]["path"] == "pope/coco_pope_{subset}.json" and rows["demo_val"]["path"] == "val.jsonl"


@pytest.fixture
def files(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "test.jsonl").write_text("")
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "bad_task.yaml").write_text("name: bad\ndescription: d\ndata: {reader: nosuch, path: x}\nmetrics: []\n")
    (tmp_path / "run").mkdir()
    return tmp_path


RUN = ["eval", "run", "--model", "tiny:test", "--out", "{d}/out"]

# (command line, words the one-line error must contain); "{d}" is the fixture folder
CASES = {
    "unknown task": ([*RUN, "--task", "nosuch"], ["unknown task 'nosuch': not a shipped task (known: ", "demo_heldout"]),
    "task file with an unknown reader": ([*RUN, "--task", "{d}/bad_task.yaml"],
                                         ["{d}/bad_task.yaml: field 'data.reader': unknown reader 'nosuch'"]),
    "missing data root": ([*RUN, "--task", "demo_heldout", "--data-root", "{d}/nowhere"],
                          ["--data-root '{d}/nowhere' is not a folder"]),
    "data not under the root": ([*RUN, "--task", "demo_val", "--data-root", "{d}/data"],
                                ["task 'demo_val': data not found: {d}/data/val.jsonl", "safevlm eval tasks"]),
    "bad judge URL": ([*RUN, "--task", "demo_heldout", "--data-root", "{d}/data", "--judge", "openai", "--judge-model", "m",
                       "--judge-base-url", "localhost:8000/v1"],
                      ["--judge-base-url 'localhost:8000/v1' is not an http(s) URL"]),
    "judge URL with a bad port": ([*RUN, "--task", "demo_heldout", "--data-root", "{d}/data", "--judge", "openai",
                                   "--judge-model", "m", "--judge-base-url", "http://localhost:99999/v1"],
                                  ["is not an http(s) URL"]),
    "openai judge without a model": ([*RUN, "--task", "demo_heldout", "--data-root", "{d}/data", "--judge", "openai",
                                      "--judge-base-url", "http://127.0.0.1:9/v1"], ["the openai judge needs --judge-model"]),
    "a task whose default judge needs a URL": ([*RUN, "--task", "rtvlm_celebrity", "--data-root", "{d}"],
                                               ["the openai judge needs --judge-model (the default judge of rtvlm_celebrity"]),
    "judge named twice": ([*RUN, "--task", "demo_heldout", "--data-root", "{d}/data", "--judge", "rules", "--judge", "rules"],
                          ["a judge is named twice"]),
    "policy without adapter": ([*RUN, "--task", "demo_heldout", "--policy", "default"], ["--policy needs --adapter"]),
    "unknown policy": ([*RUN, "--adapter", "{d}/adapter", "--task", "demo_heldout", "--data-root", "{d}/data", "--policy", "nosuch"],
                       ["unknown policy 'nosuch'"]),
    "batch size 0": ([*RUN, "--task", "demo_heldout", "--batch-size", "0"], ["--batch-size must be >= 1, got 0"]),
    "limit 0": ([*RUN, "--task", "demo_heldout", "--limit", "0"], ["--limit must be >= 1, got 0"]),
    "max new tokens 0": ([*RUN, "--task", "demo_heldout", "--max-new-tokens", "0"], ["--max-new-tokens must be >= 1, got 0"]),
    "out is a file": (["eval", "run", "--model", "tiny:test", "--task", "demo_heldout", "--out", "{d}/a_file"],
                      ["--out '{d}/a_file' is a file"]),
    "task given twice": ([*RUN, "--task", "demo_heldout", "--task", "demo_heldout"], ["task 'demo_heldout' is given twice"]),
    "missing model folder": (["eval", "run", "--model", "{d}/nomodel", "--task", "demo_heldout", "--data-root", "{d}/data",
                              "--out", "{d}/out"], ["model folder not found: {d}/nomodel"]),
    "compare a folder that is not a run": (["eval", "compare", "{d}/run", "{d}/run"], ["{d}/run is not a run folder: no manifest.json"]),
    "report of a folder that is not a run": (["eval", "report", "{d}/run"], ["{d}/run is not a run folder: no manifest.json"]),
    "sweep with both sources": (["eval", "sweep", "--run", "{d}/run", "--model", "m", "--adapter", "a", "--task", "demo_val"],
                                ["give either --run RUN_DIR"]),
    "sweep model without adapter": (["eval", "sweep", "--model", "m", "--task", "demo_val"], ["--model needs --adapter"]),
    "sweep policy without target": (["eval", "sweep", "--run", "{d}/run", "--task", "demo_val", "--write-policy", "{d}/p.yaml"],
                                    ["--write-policy needs --target-over-refusal"]),
    "sweep target above 1": (["eval", "sweep", "--run", "{d}/run", "--task", "demo_val", "--target-over-refusal", "1.5"],
                             ["--target-over-refusal must be in [0, 1], got 1.5"]),
    "sweep bad thresholds": (["eval", "sweep", "--run", "{d}/run", "--task", "demo_val", "--thresholds", "a:b"],
                             ["--thresholds 'a:b': give start:stop:step"]),
    "sweep refuse level 0": (["eval", "sweep", "--run", "{d}/run", "--task", "demo_val", "--refuse-level", "0"],
                             ["--refuse-level must be a risky level"]),
    "sweep a policy that never refuses": (["eval", "sweep", "--run", "{d}/run", "--task", "demo_val", "--policy", "hint_only"],
                                          ["policy 'hint_only' never refuses"]),
    "sweep a folder that is not a run": (["eval", "sweep", "--run", "{d}/run", "--task", "demo_val"],
                                         ["{d}/run is not a run folder: no results.sqlite"]),
    "calibrate a folder that is not an adapter": (["calibrate", "--model", "tiny:test", "--adapter", "{d}/adapter", "--task", "demo_val"],
                                                  ["--adapter '{d}/adapter' is not a safety adapter folder"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_exit_2(name, files, capsys):
    argv, words = CASES[name]
    code, out, err = run_cli(capsys, *[a.replace("{d}", str(files)) for a in argv])
    assert code == 2, (name, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(("safevlm eval: error: ", "safevlm calibrate: error: ")), err
    for word in words:
        assert word.replace("{d}", str(files)) in lines[0], (word, lines[0])
    assert not (files / "out").exists()  # nothing written before the error
