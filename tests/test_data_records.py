"""SafetyRecord, Turn, LoadReport and the package's public API."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

import safevlm.data as data
from safevlm.data import LoadReport, SafetyRecord, Skipped, Turn


def make(**kw) -> SafetyRecord:
    base = dict(
        id="r",
        image="a.png",
        turns=[Turn("user", "<image>\nWhat is it?"), Turn("assistant", "A cat.")],
        risk_level=0,
        risk_type=6,
        source="test",
    )
    base.update(kw)
    return SafetyRecord(**base)


def test_prompt_and_response():
    r = make()
    assert r.prompt == "What is it?" and r.response == "A cat."
    assert make(turns=[Turn("user", "Describe this.\n<image>")]).prompt == "Describe this."
    assert make(turns=[Turn("system", "Be safe."), Turn("user", "Hi")]).response is None


def test_record_validation():
    with pytest.raises(ValueError, match="turn role must be one of system, user, assistant, got 'bot'"):
        Turn("bot", "x")
    with pytest.raises(ValueError, match="has no user turn"):
        make(turns=[Turn("assistant", "x")])
    with pytest.raises(ValueError, match="risk_level must be a non-negative int, got -1"):
        make(risk_level=-1)
    with pytest.raises(ValueError, match="risk_type must be a non-negative int, got True"):
        make(risk_type=True)
    with pytest.raises(ValueError, match="image must be a relative path, bytes or None"):
        make(image=123)
    assert make(turns=[{"role": "user", "text": "hi"}]).turns == [Turn("user", "hi")]
    assert make(id=7).id == "7"


def test_report_counts_and_json():
    report = LoadReport(path="x.jsonl", format="psavlm")
    report.records += [make(id="1"), make(id="2", risk_type=4, risk_level=2)]
    report.skipped.append(Skipped("x.jsonl:3", "malformed JSON: Expecting value (column 1)"))
    d = report.to_dict()
    assert (d["total"], d["loaded"], d["skipped"]) == (3, 2, 1)
    assert d["by_type"] == {
        "politics": 0,
        "illegal": 0,
        "insult_bullying": 0,
        "fairness": 0,
        "privacy": 1,
        "misleading": 0,
        "safe": 1,
    }
    assert d["by_level"] == {"0": 1, "1": 0, "2": 1, "3": 0}
    assert d["skipped_records"] == [{"location": "x.jsonl:3", "reason": "malformed JSON: Expecting value (column 1)"}]
    text = report.format_text()
    assert "total 3, loaded 2, skipped 1" in text and "x.jsonl:3: malformed JSON" in text
    assert "privacy 1" in text and "2 (medium) 1" in text


@pytest.mark.parametrize(
    "module",
    [
        "safevlm.data",
        "safevlm.data.records",
        "safevlm.data.images",
        "safevlm.data.readers",
        "safevlm.data.mappings",
        "safevlm.data.figstep",
        "safevlm.data.synth",
        "safevlm.data.collator",
    ],
)
def test_all_is_sorted_and_resolves(module):
    """Every exported name is the package's own class or function under its own name (the same
    object as in its defining module), or an UPPER_CASE constant holding data."""
    mod = importlib.import_module(module)
    assert list(mod.__all__) == sorted(mod.__all__) and len(set(mod.__all__)) == len(mod.__all__)
    for name in mod.__all__:
        obj = getattr(mod, name)
        if callable(obj):
            assert obj.__name__ == name, f"{module}.{name} is {obj.__name__}"
            assert obj.__module__.startswith("safevlm.data"), f"{module}.{name} comes from {obj.__module__}"
            assert getattr(importlib.import_module(obj.__module__), name) is obj
        else:
            assert name.isupper(), f"{module}.{name} is a {type(obj).__name__}, not a class or function"
            assert isinstance(obj, (str, int, float, tuple, dict, Path)) and not isinstance(obj, bool), name
            assert obj or obj == 0, f"{module}.{name} is empty"


def test_collator_is_imported_lazily():
    assert data.SafetyCollator.__name__ == "SafetyCollator"
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        data.Nope  # noqa: B018
