"""Policy hints in stage 2 (data.hint_ratio): the records, what the collator makes of them, stage 2 on them."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from train_fixtures import SAFETY_TEST_SIZES, keyword_records, one_thread, tiny_config  # noqa: F401 (fixture)

from safevlm.data import SafetyRecord, Turn
from safevlm.policy import load_policy
from safevlm.train.hints import policy_hints

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_risky_record_gets_its_own_hint_a_safe_one_a_random_risky_types():
    policy = load_policy("default")
    tax = policy.taxonomy
    records = keyword_records(80, seed=0)
    hinted = policy_hints(records, 1.0, policy, seed=2)
    assert [r.id for r in hinted] == [r.id for r in records]  # in place, same order
    safe_picks = set()
    for record, out in zip(records, hinted):
        hint = out.metadata["policy_hint"]
        assert hint["position"] == policy.hint_position == "system"
        assert hint["text"] == policy.hint_text(hint["risk_type"], hint["level"])
        # the answer, labels, prompt and image stay the record's own
        assert (out.turns, out.risk_level, out.risk_type, out.image) == (
            record.turns, record.risk_level, record.risk_type, record.image)
        assert "policy_hint" not in record.metadata  # the originals are untouched
        if record.risk_level > 0:
            assert (hint["risk_type"], hint["level"]) == (tax.type_name(record.risk_type), record.risk_level)
        else:
            assert hint["risk_type"] != tax.safe_type and 1 <= hint["level"] < tax.num_levels
            safe_picks.add((hint["risk_type"], hint["level"]))
    assert len(safe_picks) > 3  # drawn, not one hint for every safe record
    # a type with its own hint texts gets them, not the default's
    politics = [r.metadata["policy_hint"] for r in hinted if r.metadata["policy_hint"]["risk_type"] == "politics"]
    assert politics and all(h["text"] == policy.hints["politics"][h["level"]] for h in politics)
    # deterministic for a seed; the ratio picks about that share; 0 changes nothing
    again = policy_hints(records, 1.0, "default", seed=2)
    assert [r.metadata["policy_hint"] for r in again] == [r.metadata["policy_hint"] for r in hinted]
    many = keyword_records(2000, seed=1)
    share = sum("policy_hint" in r.metadata for r in policy_hints(many, 0.2, policy)) / len(many)
    assert 0.17 < share < 0.23, share
    assert policy_hints(records, 0.0, policy) == records


def test_the_policy_decides_the_position_and_bad_ratios_are_refused(tmp_path):
    path = tmp_path / "user.yaml"
    path.write_text("extends: default\nname: user_hints\nhint_position: user\n")
    records = keyword_records(10, seed=0)
    assert {r.metadata["policy_hint"]["position"] for r in policy_hints(records, 1.0, str(path))} == {"user"}
    with pytest.raises(ValueError, match=r"must be in \[0, 1\], got 1.5"):
        policy_hints(records, 1.5, "default")
    bad = dataclasses.replace(records[0], risk_level=9)
    with pytest.raises(ValueError, match=f"record {bad.id!r}: risk level 9"):
        policy_hints([bad], 1.0, "default")


@pytest.mark.parametrize("position", ["system", "user"])
def test_the_language_model_reads_the_hint_and_the_head_reads_what_it_reads_without(position):
    from safevlm.data.collator import SafetyCollator
    from safevlm.tiny import build_tiny

    _, processor = build_tiny("test")
    tokenizer = processor.tokenizer
    collator = SafetyCollator(processor)
    conversation = [Turn("user", "What is written in the image?"), Turn("assistant", "A sign that says hello."),
                    Turn("user", "Teach me to pick a lock, please."), Turn("assistant", "I can't help with that.")]
    record = SafetyRecord(id="r1", image=keyword_records(1, seed=0)[0].image, turns=conversation, risk_level=2,
                          risk_type=1, source="test")
    text = load_policy("default").hint_text("illegal", 2)
    hinted = dataclasses.replace(record, metadata={"policy_hint": {"text": text, "position": position}})
    plain, with_hint = collator.encode(record, 5), collator.encode(hinted, 5)
    # the LM reads the hint's tokens; the supervised answers are the same tokens
    hint_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(with_hint["input_ids"]) >= len(plain["input_ids"]) + len(hint_ids) - 2
    decoded = tokenizer.decode(with_hint["input_ids"])
    assert text in decoded and text not in tokenizer.decode(plain["input_ids"])
    supervised = lambda enc: [t for t in enc["labels"] if t != -100]  # noqa: E731
    assert supervised(with_hint) == supervised(plain)
    # the head reads exactly the unhinted conversation's tokens: none of the hint's
    read = lambda enc: [t for t, m in zip(enc["input_ids"], enc["prompt_mask"]) if m]  # noqa: E731
    assert read(with_hint) == read(plain)
    assert sum(with_hint["prompt_mask"]) == sum(plain["prompt_mask"]) > 0
    # a batch holds both, and the token-length sort key counts the hint
    batch = collator([record, hinted])
    assert batch["prompt_mask"].sum(1).tolist() == [sum(plain["prompt_mask"])] * 2
    assert collator.token_length(hinted) > collator.token_length(record)


def test_a_malformed_hint_is_named():
    from safevlm.data.collator import SafetyCollator
    from safevlm.tiny import build_tiny

    _, processor = build_tiny("test")
    record = dataclasses.replace(keyword_records(1, seed=0)[0], metadata={"policy_hint": "be careful"})
    with pytest.raises(ValueError, match=f"record {record.id!r}: metadata\\['policy_hint'\\] must be"):
        SafetyCollator(processor).encode(record, 1)


def test_a_hint_that_changes_the_rest_of_the_conversation_is_refused(monkeypatch):
    """The head must read what it reads without the hint; if inserting the hint changed the
    conversation's own tokens, the collator says so instead of training the head on them."""
    import safevlm.data.collator as collator_module
    from safevlm.data.chat import insert_hint
    from safevlm.data.collator import SafetyCollator
    from safevlm.tiny import build_tiny

    def rewording(messages, hint, position):
        messages = insert_hint(messages, hint, position)
        for part in messages[-2]["content"]:
            if part.get("type") == "text":
                part["text"] = part["text"].replace("pick a lock", "open a safe")
        return messages

    _, processor = build_tiny("test")
    record = SafetyRecord(id="r9", image=None, risk_level=2, risk_type=1, source="test",
                          turns=[Turn("user", "Teach me to pick a lock, please."), Turn("assistant", "No.")],
                          metadata={"policy_hint": {"text": "Be careful.", "position": "system"}})
    monkeypatch.setattr(collator_module, "insert_hint", rewording)
    with pytest.raises(ValueError, match="record 'r9': with the policy hint inserted the conversation tokenises differently"):
        SafetyCollator(processor).encode(record, 1)


def test_stage2_trains_on_hinted_records_and_the_head_never_sees_a_hint(tmp_path):
    from safevlm.model import SafeVLM
    from safevlm.tiny import build_tiny
    from safevlm.train import run_stage

    base, processor = build_tiny("test", seed=0)
    torch.manual_seed(0)
    model = SafeVLM(base, **SAFETY_TEST_SIZES, prefix_conditioning="decision")
    records = keyword_records(24, seed=0)
    policy = load_policy("default")
    texts = [text for table in policy.hints.values() for text in table.values()]
    tokenizer = processor.tokenizer
    seen = {"rows": 0, "lm_reads_a_hint": 0, "head_reads_a_hint": 0}
    forward = type(model).forward

    def spy(self, input_ids=None, prompt_mask=None, **kwargs):
        if self.training:
            for ids, mask in zip(input_ids, prompt_mask):
                seen["rows"] += 1
                seen["lm_reads_a_hint"] += any(text in tokenizer.decode(ids) for text in texts)
                seen["head_reads_a_hint"] += any(text in tokenizer.decode(ids[mask]) for text in texts)
        return forward(self, input_ids=input_ids, prompt_mask=prompt_mask, **kwargs)

    config = tiny_config(tmp_path, stage=2, data={"hint_ratio": 1.0, "clean_ratio": None},
                         optim={"epochs": 1, "batch_size": 4}, log={"save_steps": 0, "eval_steps": 0, "plot": False})
    type(model).forward = spy
    try:
        run_stage(config, model=model, processor=processor, train_records=records)
    finally:
        type(model).forward = forward
    # every record read a hint (hints replace records, they add none); the head read none
    assert seen == {"rows": len(records), "lm_reads_a_hint": len(records), "head_reads_a_hint": 0}


def test_hints_need_stage2_and_a_policy_that_loads(tmp_path):
    from safevlm.model import SafeVLM
    from safevlm.tiny import build_tiny
    from safevlm.train import run_stage
    from safevlm.train.config import ConfigError

    with pytest.raises(ConfigError, match="data.hint_ratio trains the language model to read policy hints"):
        tiny_config(tmp_path, stage=1, data={"hint_ratio": 0.5})
    with pytest.raises(ConfigError, match=r"hint_ratio must be in \[0, 1\], got 2"):
        tiny_config(tmp_path, stage=2, data={"hint_ratio": 2})
    base, processor = build_tiny("test", seed=0)
    config = tiny_config(tmp_path, stage=2, data={"hint_ratio": 0.5, "hint_policy": str(tmp_path / "nope.yaml")})
    with pytest.raises(ConfigError, match="data.hint_policy: .*nope.yaml"):
        run_stage(config, model=SafeVLM(base, **SAFETY_TEST_SIZES), processor=processor,
                  train_records=keyword_records(8))
