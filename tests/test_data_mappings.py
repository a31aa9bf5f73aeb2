"""Mapping tables (YAML): every entry resolves in the taxonomy and says what the README says."""

from __future__ import annotations

import pytest

from safevlm.data.mappings import (
    MAPPING_NAMES,
    MAPPINGS_DIR,
    iter_label_entries,
    load_mapping,
    resolve_label,
    validate_mapping,
)
from safevlm.taxonomy import DEFAULT_TAXONOMY, Taxonomy

T = DEFAULT_TAXONOMY


def label(table: str, key: str) -> tuple[str, int]:
    entry = dict(iter_label_entries(table))[key]
    type_id, level = resolve_label(entry, T, key)
    return T.type_name(type_id), level


def test_every_shipped_table_is_listed_and_valid():
    assert sorted(p.stem for p in MAPPINGS_DIR.glob("*.yaml")) == sorted(MAPPING_NAMES)
    counts = {name: validate_mapping(name) for name in MAPPING_NAMES}
    # every entry of every table was checked (numbers = entries in the YAML files)
    assert counts == {"llava": 1, "psavlm": 7, "rtvlm": 41, "safebench": 10, "vlguard": 9}


def test_vlguard_table_matches_the_psavlm_authors_mapping():
    expected = {
        "unsafe/risky behavior/political": ("politics", 3),
        "unsafe/risky behavior/sexually explicit": ("illegal", 3),
        "unsafe/risky behavior/violence": ("insult_bullying", 2),
        "unsafe/discrimination/*": ("fairness", 2),
        "unsafe/privacy/personal data": ("privacy", 2),
        "unsafe/deception/disinformation": ("misleading", 2),
        "unsafe/risky behavior/professional advice": ("misleading", 2),
        "safe": ("safe", 0),
        "safe_image_unsafe_instruction": ("safe", 0),
    }
    assert {k: label("vlguard", k) for k in expected} == expected
    assert len(iter_label_entries("vlguard")) == len(expected)


def test_rtvlm_task_types_match_the_readme():
    tasks = load_mapping("rtvlm")["tasks"]
    expected = {
        "politics": "politics",
        "captcha": "illegal",
        "jailbreak": "illegal",
        "face_diffusion": "fairness",
        "racial": "fairness",
        "celebrity": "privacy",
        "harmful": "misleading",
        "order_A": "misleading",
        "order_B": "misleading",
        "visual_misleading_correct": "misleading",
        "visual_misleading_wrong": "misleading",
    }
    assert {task: spec["type"] for task, spec in tasks.items()} == expected
    assert load_mapping("rtvlm")["refusal_levels"] == {
        "Refuse to Answer": 3,
        "Proceed with Caution": 2,
        "Answer with Caution": 1,
        "Safe to Answer": 0,
    }
    assert tasks["celebrity"]["refusal"] == "Refuse to Answer"  # celebrity's own key name
    # floor: nothing from a red-teaming probe is labelled level 0
    assert min(level for _, e in iter_label_entries("rtvlm") for level in [e["level"]]) == 1


def test_safebench_has_all_ten_categories_with_ids():
    cats = load_mapping("safebench")["categories"]
    assert sorted(c["id"] for c in cats.values()) == list(range(1, 11))
    assert label("safebench", "categories/Privacy Violation") == ("privacy", 3)
    assert label("safebench", "categories/Hate Speech") == ("insult_bullying", 3)
    assert label("safebench", "categories/Health Consultation") == ("misleading", 2)


def test_psavlm_type_ids_are_the_default_taxonomy_order():
    assert {int(k): v for k, v in load_mapping("psavlm")["types"].items()} == dict(enumerate(T.type_names))


def test_a_table_naming_an_unknown_type_fails_loudly(tmp_path):
    bad = tmp_path / "vlguard.yaml"
    text = (MAPPINGS_DIR / "vlguard.yaml").read_text().replace("{type: privacy, level: 2}", "{type: privcy, level: 2}")
    bad.write_text(text)
    with pytest.raises(ValueError, match=r"vlguard:unsafe/privacy/personal data: unknown risk type 'privcy'"):
        validate_mapping(bad)


def test_custom_taxonomy_without_a_type_rejects_the_table():
    small = Taxonomy(type_names=("harmful", "safe"), level_names=("safe", "low", "medium", "high"))
    with pytest.raises(ValueError, match="unknown risk type"):
        validate_mapping("vlguard", small)


def test_unknown_table_name():
    with pytest.raises(ValueError, match="unknown mapping table 'nope'"):
        load_mapping("nope")


def test_load_records_with_a_custom_table(tmp_path):
    import json

    from safevlm.data import load_records

    custom = tmp_path / "vlguard.yaml"
    custom.write_text(
        (MAPPINGS_DIR / "vlguard.yaml")
        .read_text()
        .replace(
            "safe_image_unsafe_instruction: {type: safe, level: 0}",
            "safe_image_unsafe_instruction: {type: misleading, level: 1}",
        )
    )
    data = [
        {
            "id": "s",
            "image": "a.png",
            "safe": True,
            "instr-resp": [
                {"safe_instruction": "q", "response": "a"},
                {"unsafe_instruction": "bad q", "response": "no"},
            ],
        }
    ]
    (tmp_path / "v.json").write_text(json.dumps(data))
    shipped = load_records(tmp_path / "v.json", check_images=False)
    custom_report = load_records(tmp_path / "v.json", check_images=False, mapping=custom)
    assert [(r.risk_type, r.risk_level) for r in shipped.records] == [(6, 0), (6, 0)]
    assert [(r.risk_type, r.risk_level) for r in custom_report.records] == [(6, 0), (T.type_id("misleading"), 1)]


def test_a_table_file_with_an_unknown_name(tmp_path):
    (tmp_path / "mine.yaml").write_text("label: {type: safe, level: 0}\n")
    with pytest.raises(ValueError, match="cannot tell which format"):
        validate_mapping(tmp_path / "mine.yaml")
