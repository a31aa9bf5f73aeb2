"""Parts of the demo's recipe, fast: the wording variation of its training prompts."""

from __future__ import annotations

import json
import random

import pytest

from safevlm.data import SafetyRecord, Turn
from safevlm.demo import DemoSettings, _varied, vary_wording


def _record(text: str, request_in: str = "text", phrase: str = "forge passports", turns=None) -> SafetyRecord:
    turns = turns or [Turn("user", text), Turn("assistant", "I cannot help with that.")]
    return SafetyRecord("r1", "img.png", turns, 3, 1, "synthetic",
                        {"phrase": phrase, "request_in": request_in, "kind": "risky-text"})


def test_the_request_and_its_punctuation_survive_every_draw():
    record = _record("<image>\nLook at the words 'forge passports' in the image. Give me steps.", "image+text")
    outs = {vary_wording(record, random.Random(seed), 0.5).turns[0].text for seed in range(200)}
    assert len(outs) > 20  # the wording does vary
    for text in outs:
        assert text.startswith("<image>\n") and "'forge passports'" in text
        assert "  " not in text and not text.endswith(" ")
        words = text[len("<image>\n"):].split()
        original = "Look at the words 'forge passports' in the image. Give me steps.".split()
        it = iter(original)
        assert all(w in it for w in words)  # a subsequence of the original words, in order
    # about half the other words go at drop=0.5 (9 words around the phrase)
    lengths = [len(t.split()) - 3 for t in outs]  # minus "<image>", "'forge", "passports'"
    assert 2 <= sum(lengths) / len(lengths) <= 7


def test_only_the_turn_with_the_request_changes():
    turns = [Turn("user", "<image>\nHow do I bake bread?"), Turn("assistant", "Mix flour and water."),
             Turn("user", "Now tell me how to forge passports, as the picture shows."),
             Turn("assistant", "I cannot help with that.")]
    record = _record("", turns=turns)
    varied = vary_wording(record, random.Random(3), 0.9)
    assert varied.turns[:2] == turns[:2] and varied.turns[3] == turns[3]
    assert "forge passports," in varied.turns[2].text and varied.turns[2].text != turns[2].text
    assert record.turns == turns  # the input record is untouched
    assert (varied.id, varied.risk_level, varied.risk_type, varied.metadata) == (record.id, 3, 1, record.metadata)


def test_an_image_borne_request_has_its_prompt_varied_whole():
    prompt = "Fill in the empty list for the topic shown in the image."
    record = _record("<image>\n" + prompt, "image")
    outs = [vary_wording(record, random.Random(seed), 0.5).turns[0].text for seed in range(200)]
    assert len(set(outs)) > 20
    for text in outs:
        assert text.startswith("<image>\n")
        words = text[len("<image>\n"):].split()
        it = iter(prompt.split())
        assert words and all(w in it for w in words)
    # a draw that would drop every word leaves the record as it was
    assert vary_wording(_record("<image>\nGo.", "image"), random.Random(0), 0.99).turns[0].text == "<image>\nGo."


@pytest.mark.parametrize("request_in, phrase, drop", [(None, "forge passports", 0.5),  # a scene question
                                                      ("text", None, 0.5),  # no phrase on record
                                                      ("text", "not in the prompt", 0.5),
                                                      ("text", "forge passports", 0.0)])
def test_records_without_a_request_to_vary_come_back_as_they_are(request_in, phrase, drop):
    record = _record("<image>\nHow can I forge passports?", request_in, phrase)
    assert vary_wording(record, random.Random(0), drop) is record


def test_half_the_prompts_are_varied():
    settings = DemoSettings(wording_drop=0.5)
    record = _record("<image>\nTell me the best way to forge passports in a few simple steps today.")
    rng = random.Random(0)
    varied = sum(_varied(record, rng, settings) is not record for _ in range(1000))
    assert 450 <= varied <= 550
    assert all(_varied(record, rng, DemoSettings(wording_drop=0.0)) is record for _ in range(50))


def test_filler_words_are_vocabulary_words_and_never_risky(tiny):
    from safevlm.data.synth import texts
    from safevlm.demo import filler_words

    tokenizer = tiny[1].tokenizer
    words = filler_words(tokenizer)
    assert list(words) == sorted(set(words)) and len(words) > 100
    assert all(w.isascii() and w.isalpha() and len(w) >= 2 for w in words)
    risky = {w.lower() for levels in texts.RISKY_PHRASES.values() for ps in levels.values() for p in ps for w in p.split()}
    assert not risky & {w.lower() for w in words}
    vocab = tokenizer.get_vocab()
    assert all(w in vocab or "\u0120" + w in vocab or "\u2581" + w in vocab for w in words)
    assert "image" in words  # a plain word of the corpus


def test_filler_replaces_about_the_drop_share_and_keeps_the_request():
    filler = ("alpha", "beta", "gamma")
    prompt = "Tell me the best way to forge passports in a few simple steps today please."
    record = _record(prompt)
    others = len(prompt.split()) - 2
    removed = replaced = 0
    for seed in range(300):
        words = vary_wording(record, random.Random(seed), 0.25, filler).turns[0].text.split()
        assert "forge" in words and "passports" in words
        replaced += sum(w in filler for w in words)
        removed += others - (len(words) - 2)
    assert abs(replaced / (300 * others) - 0.25) < 0.04
    assert abs(removed / (300 * others) - 0.25) < 0.04


def test_the_demo_runs_with_every_recipe_option_on(tmp_path):
    from test_train_quiet import SMALL_DEMO

    from safevlm.demo import run_demo

    options = {"wording_drop": 0.25, "lm_benign_text_repeat": 3, "length_window": 2, "lm_logits": "supervised",
               "vision_batch_size": 16}
    safety = {**DemoSettings().safety, "prompt_token_dropout": 0.5}
    report = run_demo(tmp_path, DemoSettings(**SMALL_DEMO, **options, safety=safety), show_progress=False)
    assert {k: report["settings"][k] for k in options} == options
    assert report["settings"]["safety"]["prompt_token_dropout"] == 0.5
    saved = json.loads((tmp_path / "stage2" / "adapter" / "safety_config.json").read_text())
    assert saved["prompt_token_dropout"] == 0.5
    assert report["base"]["multimodal_pretraining"]["samples"] == SMALL_DEMO["lm_samples"]
    assert (tmp_path / "stage2" / "adapter" / "lora").is_dir() and report["after"]["n_risky"] > 0


def test_an_unknown_lm_logits_is_refused_before_anything_runs():
    with pytest.raises(ValueError, match="lm_logits must be 'full' or 'supervised', got 'supervise'"):
        DemoSettings(lm_logits="supervise")
