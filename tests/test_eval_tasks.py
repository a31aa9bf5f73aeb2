"""Task YAML files: every shipped task loads; mistakes name the file and the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from data_fixtures import SHARED_DATA, requires_shared_data, write_image

from safevlm.data.mappings import load_mapping
from safevlm.eval.items import EvalItem
from safevlm.eval.tasks import TASKS_DIR, TaskError, describe_tasks, list_tasks, load_task

REQUIRED = {"vlguard", "figstep", "figstep_benign", "mmsafetybench", "mme", "pope", "vqa", "holisafe", "demo_heldout", "demo_val"}


def test_shipped_tasks_cover_the_issue():
    names = set(list_tasks())
    assert REQUIRED <= names
    rtvlm = {f"rtvlm_{t}" for t in load_mapping("rtvlm")["tasks"]}
    assert rtvlm <= names  # one task per RTVLM task file
    assert names == REQUIRED | rtvlm


@pytest.mark.parametrize("name", list_tasks())
def test_every_shipped_task_loads(name):
    task = load_task(name)
    path = TASKS_DIR / f"{name}.yaml"
    assert task.name == name and Path(task.source) == path
    first = path.read_text().splitlines()[0]
    assert first.startswith("# safevlm eval run --model ") and f"--task {name}" in first  # headed by its command
    assert task.metrics and all(isinstance(m.higher_is_better, (bool, type(None))) for m in task.metrics)
    assert len(task.sha256) == 64
    if name.startswith("rtvlm_"):
        assert task.group == "rtvlm" and "judge_score" in [m.metric for m in task.metrics]


def test_describe_tasks_gives_each_layout():
    rows = {r["name"]: r for r in describe_tasks()}
    assert set(rows) == set(list_tasks())
    assert rows["mme"]["layout"].startswith("MME_Benchmark_release_version/<subtask>/")
    assert rows["pope"]["path"] == "pope/coco_pope_{subset}.json" and rows["pope"]["judge"] == "none"
    assert rows["rtvlm_celebrity"]["group"] == "rtvlm" and rows["rtvlm_celebrity"]["judge"] == "openai"


def test_vlguard_task_subsets_and_rubrics():
    task = load_task("vlguard")
    assert task.subsets == ("unsafes", "safe_unsafes", "safe_safes")
    assert task.rubrics_needed() == {"classify": {"unsafes", "safe_unsafes", "safe_safes"}, "helpfulness": {"safe_safes"}}
    assert task.judge.rules == "vlguard"


def test_load_task_by_path_and_prompt_template(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text((TASKS_DIR / "pope.yaml").read_text().replace("name: pope", "name: mine"))
    task = load_task(path)
    assert task.name == "mine"
    item = EvalItem(id="1", prompt="Is there a cat in the image?")
    assert task.render_prompt(item) == "Is there a cat in the image?\nAnswer the question using a single word or phrase."
    with pytest.raises(TaskError, match="unknown task 'popee': not a shipped task"):
        load_task("popee")
    with pytest.raises(TaskError, match="task file not found"):
        load_task(tmp_path / "none.yaml")


def base_task() -> dict:
    return yaml.safe_load((TASKS_DIR / "holisafe.yaml").read_text())


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.pop("name"), "field 'name': missing"),
    (lambda d: d.update(extra=1), r"unknown field\(s\) \['extra'\]"),
    (lambda d: d["data"].update(reader="holisafee"), "field 'data.reader': unknown reader 'holisafee'"),
    (lambda d: d["data"].pop("path"), "field 'data.path': missing"),
    (lambda d: d.update(subsets=["SSS", "XXX"]), r"field 'subsets': unknown subset\(s\) \['XXX'\] for reader 'holisafe'"),
    (lambda d: d.update(prompt="{question}"), r"field 'prompt': unknown placeholder\(s\) \['question'\]"),
    (lambda d: d.update(prompt="Answer."), "field 'prompt': must contain {prompt}"),
    (lambda d: d.update(prompt="{prompt"), "field 'prompt': is not a valid template"),
    (lambda d: d.update(answer={"extract": "mme"}), "field 'answer.extract': unknown extractor 'mme'"),
    (lambda d: d["judge"].update(default="gpt"), "field 'judge.default': unknown judge 'gpt'"),
    (lambda d: d["judge"].update(default="none"), r"field 'judge.default': is none, but metric\(s\)"),
    (lambda d: d["judge"].update(rules="nope"), "field 'judge.rules': unknown rule set 'nope'"),
    (lambda d: d["judge"].update(criteria="nope"), "field 'judge.criteria': unknown criteria set 'nope'"),
    (lambda d: d["metrics"][0].update(metric="maSR"), "field 'metrics\\[0\\].metric': unknown metric 'maSR'"),
    (lambda d: d["metrics"][0].pop("higher_is_better"), "field 'metrics\\[0\\].higher_is_better': missing"),
    (lambda d: d["metrics"][0].update(higher_is_better="yes"), "must be true, false or null"),
    (lambda d: d["metrics"][1].update(subsets=["SSX"]), "field 'metrics\\[1\\].subsets'"),
    (lambda d: d["metrics"][1].update(group_by="type"), "field 'metrics\\[1\\].group_by': must be one of subset, category"),
    (lambda d: d["metrics"][0].update(options={"n_boot": 5}), r"takes no option\(s\) \['n_boot'\]"),
    (lambda d: d["metrics"].append(dict(d["metrics"][0])), r"metric key\(s\) \['holisafe'\] appear twice"),
    (lambda d: d.update(metrics=[]), "field 'metrics': must be a non-empty list"),
    (lambda d: d["generation"].update(max_new_tokens=[1]), "field 'generation.max_new_tokens'"),
])
def test_task_errors_name_file_and_field(tmp_path, edit, message):
    data = base_task()
    edit(data)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(TaskError, match=message) as info:
        load_task(path)
    assert str(path) in str(info.value)


def test_invalid_yaml_names_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\ndata: [unclosed\n")
    with pytest.raises(TaskError, match=r"broken.yaml:\d+:\d+: not valid YAML"):
        load_task(path)


def test_subset_path_expansion_and_missing_data(tmp_path):
    task = load_task("pope")
    write_image(tmp_path / "coco" / "val2014" / "a.jpg")
    (tmp_path / "pope").mkdir()
    for split in ("random", "popular"):
        (tmp_path / "pope" / f"coco_pope_{split}.json").write_text(
            json.dumps({"question_id": 1, "image": "a.jpg", "text": "Is there a cat in the image?", "label": "yes"}) + "\n")
    report = task.read(tmp_path, subsets=("random", "popular"))
    assert sorted(i.id for i in report.items) == ["popular-1", "random-1"]
    with pytest.raises(FileNotFoundError, match=r"task 'pope' .*data not found: .*coco_pope_adversarial.json"):
        task.read(tmp_path)


@requires_shared_data
def test_shipped_mme_task_reads_the_sample(tmp_path):
    task = load_task("mme")
    with pytest.raises(FileNotFoundError, match="task 'mme' .*data not found: .*MME_Benchmark_release_version"):
        task.read(tmp_path)
    (tmp_path / "MME_Benchmark_release_version").symlink_to(SHARED_DATA / "formats" / "mme_sample")
    report = task.read(tmp_path)
    assert len(report.items) == 8 and {i.category for i in report.items} == {"color", "scene"}
