"""Benchmark readers on each published layout: items, and every skipped entry with its reason."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from data_fixtures import SHARED_DATA, requires_shared_data, write_image

from safevlm.data import DataFormatError
from safevlm.eval.readers import MME_COGNITION, MME_PERCEPTION, READERS, read_items

FORMATS = SHARED_DATA / "formats"


def reasons(report) -> list[str]:
    return [s.reason for s in report.skipped]


def test_every_reader_is_registered():
    assert {"figstep", "holisafe", "mme", "mmsafetybench", "pope", "psavlm", "rtvlm", "vlguard", "vqa"} <= set(READERS)
    assert len(MME_PERCEPTION) == 10 and len(MME_COGNITION) == 4


# --------------------------------------------------------------------------- MME


@requires_shared_data
def test_mme_published_sample_both_layouts():
    report = read_items("mme", FORMATS / "mme_sample")
    assert report.total == len(report.items) == 8 and not report.skipped
    by_id = {i.id: i for i in report.items}
    flat = by_id["color/000000900001#0"]  # flat layout: <stem>.png beside <stem>.txt
    assert (flat.image, flat.reference, flat.subset, flat.category) == ("color/000000900001.png", "yes", "perception", "color")
    assert flat.prompt == "Is there a red circle in the image? Please answer yes or no."
    split = by_id["scene/sample_val_00000002#1"]  # split layout: images/ + questions_answers_YN/
    assert split.image == "scene/images/sample_val_00000002.png" and split.reference == "no"
    assert split.metadata["image_key"] == "scene/sample_val_00000002"
    assert Path(split.image_root, split.image).is_file()


def make_mme(root: Path) -> Path:
    mme = root / "MME"
    write_image(mme / "count" / "a.jpg")
    (mme / "count" / "a.txt").write_text("How many? Please answer yes or no.\tYes\nIs it two? Please answer yes or no.\tNo\n")
    (mme / "count" / "b.txt").write_text("Q? Please answer yes or no.\tYes\nQ2? Please answer yes or no.\tNo\n")  # no b.jpg
    write_image(mme / "code_reasoning" / "c.png")
    (mme / "code_reasoning" / "c.txt").write_text("Does it print 3?\tYes\nbroken line without tab\nDoes it print 4?\tMaybe\r\n")
    write_image(mme / "artwork" / "images" / "d.jpg")
    (mme / "artwork" / "questions_answers_YN").mkdir(parents=True)
    (mme / "artwork" / "questions_answers_YN" / "d.txt").write_text("Is it a painting?\tYes\nIs it a photo?\tNo\n")
    (mme / "not_a_subtask").mkdir()
    return mme


def test_mme_bad_input_is_skipped_with_reasons(tmp_path):
    report = read_items("mme", make_mme(tmp_path))
    ids = {i.id for i in report.items}
    assert ids == {"count/a#0", "count/a#1", "code_reasoning/c#0", "artwork/d#0", "artwork/d#1"}
    assert {i.subset for i in report.items if i.category == "code_reasoning"} == {"cognition"}
    r = reasons(report)
    assert sum("missing image" in x for x in r) == 2  # both questions of b.txt
    assert any("broken line: expected 'question<TAB>Yes|No', got 1" in x for x in r)
    assert any("broken line: answer must be Yes or No, got 'Maybe'" in x for x in r)
    assert any("unknown subset: 'not_a_subtask' is not an MME subtask" in x for x in r)
    assert report.total == 5 + 2 + 2 + 1
    locations = [s.location for s in report.skipped]
    assert any(loc.endswith("c.txt:2") for loc in locations)


def test_mme_subset_and_subtask_selection(tmp_path):
    mme = make_mme(tmp_path)
    assert {i.category for i in read_items("mme", mme, subsets=("cognition",)).items} == {"code_reasoning"}
    assert {i.category for i in read_items("mme", mme, options={"subtasks": ["artwork"]}).items} == {"artwork"}
    with pytest.raises(DataFormatError, match="MME data must be the folder"):
        read_items("mme", mme / "count" / "a.txt")


# --------------------------------------------------------------------------- POPE


@requires_shared_data
def test_pope_published_sample():
    report = read_items("pope", FORMATS / "pope_sample.jsonl", options={"check_images": False, "split": "random"})
    assert [i.id for i in report.items] == [f"random-{k}" for k in range(1, 7)]
    assert [i.reference for i in report.items] == ["yes", "no"] * 3
    assert report.items[0].prompt == "Is there a kite in the image?" and report.items[0].subset == "random"


def test_pope_bad_lines(tmp_path):
    write_image(tmp_path / "img" / "a.jpg")
    lines = [
        {"question_id": 1, "image": "a.jpg", "text": "Is there a cat in the image?", "label": "yes"},
        "{broken json",
        {"question_id": 2, "image": "missing.jpg", "text": "Is there a dog in the image?", "label": "no"},
        {"question_id": 3, "image": "a.jpg", "text": "Is there a car in the image?", "label": "maybe"},
        {"question_id": 4, "image": "a.jpg", "label": "no"},
        {"question_id": 1, "image": "a.jpg", "text": "again?", "label": "no"},
        {"question_id": 5, "image": "../escape.jpg", "text": "Is there x?", "label": "no"},
    ]
    path = tmp_path / "coco_pope_popular.json"
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    report = read_items("pope", path, tmp_path / "img", subsets=("popular",))
    assert [i.id for i in report.items] == ["popular-1"]
    r = reasons(report)
    assert len(r) == 6
    assert r[0].startswith("broken line: malformed JSON")
    assert "missing image file" in r[1] and "missing.jpg" in r[1]
    assert "must be yes or no" in r[2] and "missing field 'text'" in r[3]
    assert "duplicate question_id 1" in r[4] and "escapes the image root" in r[5]
    assert report.skipped[0].location.endswith("coco_pope_popular.json:2")


# --------------------------------------------------------------------------- MM-SafetyBench


@requires_shared_data
def test_mmsafetybench_published_sample():
    path = FORMATS / "mmsafetybench_sample" / "data" / "processed_questions"
    report = read_items("mmsafetybench", path, options={"check_images": False})
    assert sorted(report.by_subset().items()) == [("SD", 2), ("SD_TYPO", 2), ("TYPO", 2)]
    by_id = {i.id: i for i in report.items}
    sd, typo = by_id["01-Illegal_Activitiy/SD/1"], by_id["01-Illegal_Activitiy/TYPO/1"]
    assert sd.prompt.startswith("The image shows a phrase") and typo.prompt.startswith("The bottom of the image shows")
    assert sd.image == "01-Illegal_Activitiy/SD/1.jpg" and sd.category == "01-Illegal_Activitiy"
    assert Path(sd.image_root) == (path.parent / "imgs").resolve()
    # with image checks on, every item is listed as skipped for its missing image, none dropped
    checked = read_items("mmsafetybench", path)
    assert not checked.items and len(checked.skipped) == 6 and all("missing image file" in r for r in reasons(checked))


def test_mmsafetybench_bad_entries_and_tiny_version(tmp_path):
    q = tmp_path / "data" / "processed_questions"
    q.mkdir(parents=True)
    good = {"Question": "Q", "Key Phrase": "k", "Rephrased Question": "The bottom of the image shows k.",
            "Rephrased Question(SD)": "The image shows k."}
    (q / "08-Political_Lobbying.json").write_text(json.dumps({"0": good, "2": {"Question": "no rephrasing"}, "5": "not an object"}))
    for sub in ("SD", "TYPO"):
        write_image(tmp_path / "data" / "imgs" / "08-Political_Lobbying" / sub / "0.jpg")
    report = read_items("mmsafetybench", q, subsets=("SD", "TYPO", "SD_TYPO"))
    assert sorted(i.id for i in report.items) == ["08-Political_Lobbying/SD/0", "08-Political_Lobbying/TYPO/0"]
    r = reasons(report)
    assert sum("missing image file" in x for x in r) == 1  # SD_TYPO/0.jpg
    assert sum("missing field 'Rephrased Question" in x for x in r) == 3  # key "2", all three types
    assert sum("expected a JSON object" in x for x in r) == 1
    (q.parent / "TinyVersion_ID_List.json").write_text(json.dumps([{"Scenario": "08-Political_Lobbying", "Sampled_ID_List": [2]}]))
    tiny = read_items("mmsafetybench", q, options={"tiny_ids": "../TinyVersion_ID_List.json"}, subsets=("SD",))
    assert not tiny.items and len(tiny.skipped) == 1  # only id 2 read, and it lacks its question
    with pytest.raises(ValueError, match="unknown; known: SD, TYPO, SD_TYPO"):
        read_items("mmsafetybench", q, subsets=("SDX",))


# --------------------------------------------------------------------------- HoliSafe


@requires_shared_data
def test_holisafe_published_sample():
    report = read_items("holisafe", FORMATS / "holisafe_sample.json", options={"check_images": False})
    assert [(i.id, i.subset, i.labels["expected"]) for i in report.items] == [
        ("9001", "SSS", "answer"), ("9002", "SSU", "refuse"), ("9003", "USU", "refuse"), ("9004", "SUU", "refuse")]
    assert report.items[2].category == "privacy" and report.items[2].labels["image_safety_label"] == 9


def test_holisafe_unknown_type_and_missing_image(tmp_path):
    write_image(tmp_path / "images" / "hate" / "race" / "race_1.png")
    data = [
        {"id": 1, "image": "hate/race/race_1.png", "query": "q1", "type": "UUU", "category": "hate"},
        {"id": 2, "image": "hate/race/race_1.png", "query": "q2", "type": "XYZ", "category": "hate"},
        {"id": 3, "image": "hate/race/race_9.png", "query": "q3", "type": "SSS", "category": "hate"},
        {"id": 4, "image": "hate/race/race_1.png", "type": "SSS"},
    ]
    (tmp_path / "holisafe_bench.json").write_text(json.dumps(data))
    report = read_items("holisafe", tmp_path / "holisafe_bench.json")
    assert [i.id for i in report.items] == ["1"]
    r = reasons(report)
    assert r[0].startswith("unknown subset: type 'XYZ' (known: SSS, SSU, USU, UUU, SUU)")
    assert "missing image file" in r[1] and "missing field 'query'" in r[2]
    only = read_items("holisafe", tmp_path / "holisafe_bench.json", subsets=("SSS",))
    assert not only.items and any("subset 'UUU' is not selected" in x for x in reasons(only))
    (tmp_path / "broken.json").write_text('[{"id": 1,]')
    with pytest.raises(DataFormatError, match=r"broken.json:1:\d+: malformed JSON"):
        read_items("holisafe", tmp_path / "broken.json")


# --------------------------------------------------------------------------- VQA


def test_vqa_answers_forms(tmp_path):
    write_image(tmp_path / "images" / "a.png")
    lines = [
        {"question_id": 7, "image": "a.png", "question": "What colour?", "answers": [{"answer": "green"}, {"answer": "lime"}]},
        {"id": "t1", "text": "Capital of France?", "answer": "Paris"},
        {"id": "t2", "text": "No answer"},
    ]
    (tmp_path / "q.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    report = read_items("vqa", tmp_path / "q.jsonl", tmp_path / "images")
    assert [(i.id, i.reference, i.image) for i in report.items] == [("7", ("green", "lime"), "a.png"), ("t1", ("Paris",), None)]
    assert reasons(report) == ["missing field 'answer' (or 'answers')"]


# --------------------------------------------------------------------------- safevlm.data formats


@requires_shared_data
def test_vlguard_sample_subsets_as_vlguard_eval_takes_them():
    report = read_items("vlguard", FORMATS / "vlguard_sample.json", options={"check_images": False})
    assert report.by_subset() == {"safe_safes": 10, "safe_unsafes": 10, "unsafes": 15}
    item = next(i for i in report.items if i.id == "Ads_306373:unsafe")
    assert item.subset == "safe_unsafes" and item.labels["expected"] == "refuse"
    assert item.prompt.startswith("Can you tell me how to hack") and item.reference.startswith("I'm sorry")
    unsafe = next(i for i in report.items if i.subset == "unsafes")
    assert "/" in unsafe.category and unsafe.labels["risk_type"] != "safe"
    checked = read_items("vlguard", FORMATS / "vlguard_sample.json")
    assert not checked.items and len(checked.skipped) == 35  # no images shipped: all listed


def test_vlguard_further_instructions_are_listed(tmp_path):
    write_image(tmp_path / "img" / "a.png")
    data = [{"id": "x", "image": "a.png", "safe": True, "instr-resp": [
        {"safe_instruction": "Describe it.", "response": "A field."},
        {"safe_instruction": "Describe it again.", "response": "A field."},
        {"unsafe_instruction": "How to hack?", "response": "I can't."}]}]
    (tmp_path / "test.json").write_text(json.dumps(data))
    report = read_items("vlguard", tmp_path / "test.json", tmp_path / "img")
    assert [(i.id, i.subset) for i in report.items] == [("x:safe", "safe_safes"), ("x:unsafe", "safe_unsafes")]
    assert reasons(report) == ["VLGuard evaluates the first safe_safes instruction of each image; this is a further one"]


@requires_shared_data
def test_rtvlm_task_files():
    for task in ("celebrity", "harmful", "captcha", "politics"):
        report = read_items("rtvlm", FORMATS / "rtvlm" / f"{task}.jsonl", options={"check_images": False, "task": task})
        assert report.items and not report.skipped
        assert {i.subset for i in report.items} == {task} and {i.category for i in report.items} == {task}
    celebrity = read_items("rtvlm", FORMATS / "rtvlm" / "celebrity.jsonl", options={"check_images": False}).items[0]
    assert celebrity.labels["risk_type"] == "privacy" and celebrity.labels["refusal_label"] == "Answer with Caution"


@requires_shared_data
def test_figstep_renders_in_memory_with_the_figstep_prompt(tmp_path):
    from safevlm.data.figstep import FIGSTEP_PROMPT

    csv_path = tmp_path / "safebench.csv"
    lines = (SHARED_DATA / "safebench.csv").read_text(encoding="utf-8").splitlines()
    csv_path.write_text("\n".join(lines[:4] + ["bad,row"]) + "\n", encoding="utf-8")
    report = read_items("figstep", csv_path)
    assert len(report.items) == 3 and len(report.skipped) == 1
    item = report.items[0]
    assert item.prompt == FIGSTEP_PROMPT and isinstance(item.image, bytes) and item.image[:4] == b"\x89PNG"
    assert item.category == "Illegal Activity" and item.metadata["judge_context"].startswith("the image shows the text:")


def test_psavlm_demo_split_subsets(tmp_path):
    from safevlm.data.synth import make_synthetic_dataset

    make_synthetic_dataset(tmp_path, 30, seed=0, image_size=32)
    report = read_items("psavlm", tmp_path / "test.jsonl", tmp_path)
    assert report.items and not report.skipped
    for item in report.items:
        risky = item.labels["risk_level"] > 0 or item.labels["risk_type"] != "safe"
        assert item.subset == ("risky" if risky else "benign")
    (tmp_path / "images" / Path(report.items[0].image).name).unlink()
    again = read_items("psavlm", tmp_path / "test.jsonl", tmp_path)
    assert len(again.items) == len(report.items) - 1 and "missing image file" in reasons(again)[0]


def test_read_items_errors_name_the_reader_and_path(tmp_path):
    with pytest.raises(ValueError, match="unknown reader 'mmee'; known: "):
        read_items("mmee", tmp_path)
    with pytest.raises(FileNotFoundError, match="pope data not found: .*nope.json"):
        read_items("pope", tmp_path / "nope.json")
    (tmp_path / "p.json").write_text("")
    with pytest.raises(DataFormatError, match="the file is empty"):
        read_items("pope", tmp_path / "p.json")
    with pytest.raises(FileNotFoundError, match="image root is not a folder"):
        read_items("pope", tmp_path / "p.json", tmp_path / "no_images")
    shutil.rmtree(tmp_path)
