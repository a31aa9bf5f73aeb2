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
    prompts = {split: {r.prompt for r in report.records} for split, report in reports.items()}
    assert not prompts["train"] & prompts["val"]
    assert not prompts["train"] & prompts["test"]
    assert not prompts["val"] & prompts["test"]


def test_answers_follow_the_level(dataset):
    _, _, reports = dataset
    for r in all_records(reports):
        assert len(r.response.split()) <= synth.MAX_ANSWER_WORDS
        if r.risk_level == 3:
            assert r.response.startswith("I can't help with that.")
        elif r.risk_level in (1, 2):
            assert r.response == synth.answer_for(T.type_name(r.risk_type), r.risk_level)
            assert "can't help" not in r.response
        else:
            assert "can't" not in r.response and "won't" not in r.response
        kind = r.metadata["kind"]
        if kind == "shape":
            assert r.metadata["shape"] in r.response or r.metadata["colour"] in r.response
        if kind == "photo":
            assert r.response == f"The photo shows {r.metadata['photo']}."


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
            assert phrase.lower() not in r.prompt.lower()  # only the image carries the request
            assert r.prompt in synth.GENERIC_PROMPTS
        if r.metadata["kind"] in ("risky-text", "risky-both", "benign-text", "benign-both"):
            assert phrase in r.prompt
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
        assert r.prompt in corpus and r.response in corpus
    assert synth.corpus_texts() == sorted(corpus)  # sorted, no duplicates


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="n must be at least 3"):
        synth.make_synthetic_dataset(tmp_path, 2)
    with pytest.raises(ValueError, match="clean_ratio must be >= 0"):
        synth.make_synthetic_dataset(tmp_path, 10, clean_ratio=-1)


@pytest.mark.slow
def test_two_thousand_samples_well_under_a_minute(tmp_path):
    start = time.perf_counter()
    counts = synth.make_synthetic_dataset(tmp_path, 2000, seed=0)
    assert counts["total"] == 2000
    assert time.perf_counter() - start < 40
