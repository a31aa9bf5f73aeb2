"""Synthetic data: balanced, learnable, disjoint splits, legible typography, deterministic."""

from __future__ import annotations

import json
import random
import time
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from safevlm.data import load_records, synth
from safevlm.taxonomy import DEFAULT_TAXONOMY

T = DEFAULT_TAXONOMY
N = 150


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    counts = synth.make_synthetic_dataset(out, N, seed=3)
    reports = {split: load_records(out / f"{split}.jsonl") for split in synth.SPLITS}
    return out, counts, reports


def all_records(reports):
    return [r for report in reports.values() for r in report.records]


def request(record) -> str:
    """The sample's own request: the last user turn (two-turn records have a benign one first)."""
    return [t.text for t in record.turns if t.role == "user"][-1].replace("<image>", "").strip()


def answer(record) -> str:
    """The answer to the sample's own request: the last assistant turn."""
    return [t.text for t in record.turns if t.role == "assistant"][-1]


def test_files_and_counts(dataset):
    out, counts, reports = dataset
    assert counts["total"] == N and counts["splits"] == {"train": 120, "val": 15, "test": 15}
    assert len(list((out / "images").glob("*.png"))) == N
    # every line loads, images included (checked by load_records), nothing skipped
    for split, report in reports.items():
        assert report.format == "psavlm" and not report.skipped and report.loaded == counts["splits"][split]
        assert all(r.image.startswith("images/") for r in report.records)
    assert json.loads((out / "synth.json").read_text())["total"] == N


def test_balanced_by_type_with_the_default_clean_ratio(dataset):
    _, counts, reports = dataset
    risky = {k: v for k, v in counts["by_type"].items() if k != "safe"}
    assert max(risky.values()) - min(risky.values()) <= 1
    assert counts["clean"] == round(N * 3 / 14) == counts["by_type"]["safe"]  # 3 clean : 11 risky
    records = all_records(reports)
    # every risk type appears at every level 1..3; clean samples are (safe, 0) and only they
    pairs = Counter((T.type_name(r.risk_type), r.risk_level) for r in records)
    for name in synth.RISK_TYPES:
        assert all(pairs[(name, level)] >= 5 for level in (1, 2, 3))
    assert {lvl for (name, lvl) in pairs if name == "safe"} == {0}


@pytest.mark.parametrize("ratio, clean", [(1.0, 15), (0.0, 0)])
def test_clean_ratio_is_configurable(tmp_path, ratio, clean):
    counts = synth.make_synthetic_dataset(tmp_path, 30, seed=0, clean_ratio=ratio, image_size=64)
    assert counts["clean"] == clean and counts["risky"] == 30 - clean


def test_splits_share_no_prompt_text(dataset):
    _, _, reports = dataset
    prompts = {split: {request(r) for r in report.records} | {r.prompt for r in report.records}
               for split, report in reports.items()}
    assert not prompts["train"] & prompts["val"]
    assert not prompts["train"] & prompts["test"]
    assert not prompts["val"] & prompts["test"]


def test_answers_follow_the_level(dataset):
    _, _, reports = dataset
    for r in all_records(reports):
        assert len(answer(r).split()) <= synth.MAX_ANSWER_WORDS
        if r.risk_level == 3:
            assert answer(r).startswith("I can't help with that.")
        elif r.risk_level in (1, 2):
            assert answer(r) == synth.answer_for(T.type_name(r.risk_type), r.risk_level)
            assert "can't help" not in answer(r)
        else:
            assert "can't" not in answer(r) and "won't" not in answer(r)
        kind = r.metadata["kind"]
        if kind == "shape":
            assert r.metadata["shape"] in answer(r) or r.metadata["colour"] in answer(r)
        if kind == "photo":
            assert answer(r) == f"The photo shows {r.metadata['photo']}."


def test_request_channels(dataset):
    _, _, reports = dataset
    records = all_records(reports)
    kinds = Counter(r.metadata["kind"] for r in records)
    assert {
        "risky-image",
        "risky-text",
        "risky-both",
        "benign-typo",
        "benign-text",
        "benign-both",
        "shape",
        "photo",
        "object",
    } <= set(kinds)
    for r in records:
        phrase = r.metadata.get("phrase")
        if r.metadata["kind"] in ("risky-image", "benign-typo"):
            assert phrase.lower() not in request(r).lower()  # only the image carries the request
            assert request(r) in synth.GENERIC_PROMPTS
        if r.metadata["kind"] in ("risky-text", "risky-both", "benign-text", "benign-both"):
            assert phrase in request(r)
    # every channel carries risky and benign requests, from the same template pool: templates carry no label
    pools = {"image": synth.GENERIC_PROMPTS, "text": synth.TEXT_REQUEST_TEMPLATES, "image+text": synth.BOTH_TEMPLATES}
    for channel, pool in pools.items():
        used = [r for r in records if r.metadata.get("request_in") == channel]
        assert {r.risk_level > 0 for r in used} == {True, False}, channel
        assert all(r.metadata["template"] in pool for r in used)


def test_each_phrase_has_one_label(dataset):
    _, _, reports = dataset
    labels: dict[str, set] = {}
    for r in all_records(reports):
        if "phrase" in r.metadata:
            labels.setdefault(r.metadata["phrase"], set()).add((r.risk_type, r.risk_level))
    assert labels and all(len(v) == 1 for v in labels.values())


def test_typography_is_legible_at_112_px():
    rng = random.Random(0)
    phrases = [p for levels in synth.RISKY_PHRASES.values() for ps in levels.values() for p in ps]
    for phrase in phrases + list(synth.BENIGN_PHRASES):
        for layout in ("title", "list"):
            small = np.asarray(
                synth.render_typographic(phrase, rng, 224, layout).resize((112, 112), Image.BICUBIC).convert("L")
            )
            ink = small < 128
            rows = np.where(ink.any(axis=1))[0]
            bands = np.split(rows, np.where(np.diff(rows) > 1)[0] + 1)
            tallest = max(len(b) for b in bands)
            cols = np.where(ink.any(axis=0))[0]
            # capital letters at least 9 px tall after downscaling, text spanning most of the width
            assert tallest >= 9, (phrase, layout, tallest)
            assert cols[-1] - cols[0] >= 50, (phrase, layout)


def test_deterministic_for_a_seed(tmp_path):
    a = synth.make_synthetic_dataset(tmp_path / "a", 20, seed=5, image_size=64)
    b = synth.make_synthetic_dataset(tmp_path / "b", 20, seed=5, image_size=64)
    synth.make_synthetic_dataset(tmp_path / "c", 20, seed=6, image_size=64)
    assert {k: v for k, v in a.items() if k != "out_dir"} == {k: v for k, v in b.items() if k != "out_dir"}
    for split in synth.SPLITS:
        assert (tmp_path / "a" / f"{split}.jsonl").read_bytes() == (tmp_path / "b" / f"{split}.jsonl").read_bytes()
    for image in (tmp_path / "a" / "images").glob("*.png"):
        assert image.read_bytes() == (tmp_path / "b" / "images" / image.name).read_bytes()
    assert (tmp_path / "a" / "train.jsonl").read_bytes() != (tmp_path / "c" / "train.jsonl").read_bytes()


def test_corpus_covers_every_generated_text(dataset):
    _, _, reports = dataset
    corpus = set(synth.corpus_texts())
    for r in all_records(reports):
        for turn in r.turns:
            assert turn.text.replace("<image>", "").strip() in corpus, turn
    assert synth.corpus_texts() == sorted(corpus)  # sorted, no duplicates


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="n must be at least 3"):
        synth.make_synthetic_dataset(tmp_path, 2)
    with pytest.raises(ValueError, match="clean_ratio must be >= 0"):
        synth.make_synthetic_dataset(tmp_path, 10, clean_ratio=-1)
    with pytest.raises(ValueError, match=r"multi_turn_ratio must be in \[0, 1\], got 1.5"):
        synth.make_synthetic_dataset(tmp_path, 10, multi_turn_ratio=1.5)
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        synth.benign_opening("dev", random.Random(0))


# -- two-turn conversations --------------------------------------------------------------------------------
def test_two_turn_conversations_in_train_and_val_only(dataset):
    _, counts, reports = dataset
    two = {split: [r for r in report.records if len(r.turns) > 2] for split, report in reports.items()}
    assert counts["multi_turn"] == sum(len(v) for v in two.values()) > 0
    assert two["test"] == []  # single-prompt evaluations read test records whole
    train_val = len(reports["train"].records) + len(reports["val"].records)
    assert 0.1 <= (len(two["train"]) + len(two["val"])) / train_val <= 0.3  # default 20%
    opening_templates = {split: set(synth.partition(synth.TEXT_REQUEST_TEMPLATES)[split]) for split in synth.SPLITS}
    labels = Counter()
    for split, records in two.items():
        for r in records:
            assert [t.role for t in r.turns] == ["user", "assistant", "user", "assistant"]
            opening = r.metadata["opening"]
            assert opening["template"] in opening_templates[split] and opening["phrase"] in synth.BENIGN_PHRASES
            assert r.prompt == opening["template"].format(phrase=opening["phrase"])  # the first user turn
            assert r.response == synth.BENIGN_TEXT_ANSWER
            assert r.turns[0].text.startswith("<image>")  # the image belongs to the conversation's first turn
            labels[r.risk_level > 0] += 1
    assert labels[True] > 0 and labels[False] > 0  # risky and benign second turns


def test_two_turn_conversations_only_add_a_first_exchange(tmp_path):
    """multi_turn_ratio=0 writes the single-turn dataset; the default puts a benign exchange in front
    of some train/val samples and changes nothing else (images, requests, answers, labels, test split)."""
    single = synth.make_synthetic_dataset(tmp_path / "single", 40, seed=1, image_size=64, multi_turn_ratio=0.0)
    multi = synth.make_synthetic_dataset(tmp_path / "multi", 40, seed=1, image_size=64)
    assert single["multi_turn"] == 0 and multi["multi_turn"] > 0
    assert {k: v for k, v in single.items() if k not in ("out_dir", "multi_turn")} == {
        k: v for k, v in multi.items() if k not in ("out_dir", "multi_turn")
    }
    for image in (tmp_path / "single" / "images").glob("*.png"):
        assert image.read_bytes() == (tmp_path / "multi" / "images" / image.name).read_bytes()
    assert (tmp_path / "single" / "test.jsonl").read_bytes() == (tmp_path / "multi" / "test.jsonl").read_bytes()
    for split in ("train", "val"):
        a = load_records(tmp_path / "single" / f"{split}.jsonl").records
        b = load_records(tmp_path / "multi" / f"{split}.jsonl").records
        for x, y in zip(a, b, strict=True):
            assert (x.id, x.image, x.risk_level, x.risk_type) == (y.id, y.image, y.risk_level, y.risk_type)
            assert len(x.turns) == 2 and y.turns[-1] == x.turns[1]
            assert request(y) == request(x)
            meta = {k: v for k, v in y.metadata.items() if k not in ("opening", "location")}
            assert meta == {k: v for k, v in x.metadata.items() if k != "location"}
    everything = synth.make_synthetic_dataset(tmp_path / "all", 20, seed=1, image_size=64, multi_turn_ratio=1.0)
    assert everything["multi_turn"] == everything["splits"]["train"] + everything["splits"]["val"]


def test_split_sizes_are_computed_once_for_samples_and_templates():
    assert synth.split_sizes(150) == {"train": 120, "val": 15, "test": 15}
    assert synth.split_sizes(3) == {"train": 1, "val": 1, "test": 1}
    parts = synth.partition(tuple("abcdefghij"))
    assert parts == {"train": tuple("abcdefgh"), "val": ("i",), "test": ("j",)}
    with pytest.raises(ValueError, match="need at least 3 items"):
        synth.partition(("a", "b"))


def test_risk_types_come_from_the_taxonomy(monkeypatch):
    assert synth.RISK_TYPES == tuple(n for n in T.type_names if n != T.safe_type)
    synth.check_tables()
    from safevlm.data.synth import texts

    monkeypatch.setitem(texts.RISKY_PHRASES, "weapons", {1: ("x",), 2: ("y",), 3: ("z",)})
    with pytest.raises(RuntimeError, match="RISKY_PHRASES covers types .*'weapons'"):
        synth.check_tables()


@pytest.mark.slow
def test_two_thousand_samples_well_under_a_minute(tmp_path):
    start = time.perf_counter()
    counts = synth.make_synthetic_dataset(tmp_path, 2000, seed=0)
    assert counts["total"] == 2000
    assert time.perf_counter() - start < 40
