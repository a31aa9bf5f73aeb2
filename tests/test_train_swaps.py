"""Decision swaps (data.decision_swap_ratio): the records, the collators' tensors, and stage 2 on them."""

from __future__ import annotations

import pytest
import torch
from train_fixtures import SAFETY_TEST_SIZES, keyword_records, one_thread, tiny_config  # noqa: F401 (fixture)

from safevlm.data import SafetyRecord, Turn
from safevlm.train.swaps import decision_swaps

pytestmark = pytest.mark.usefixtures("one_thread")


def test_each_swap_is_a_safe_record_with_a_risky_records_answer_and_decision():
    records = keyword_records(60, seed=0)
    safe = [r for r in records if r.risk_level == 0]
    risky = {r.id: r for r in records if r.risk_level > 0}
    swaps = decision_swaps(records, 1.0, seed=3)
    assert [s.id for s in swaps] == [f"{r.id}#swap" for r in safe]
    for swap, record in zip(swaps, safe):
        donor = risky[swap.metadata["answer_of"]]
        assert swap.metadata["swap_of"] == record.id
        assert swap.metadata["prefix_decision"] == [donor.risk_level, donor.risk_type]
        # the head still learns the safe record's labels; the prompt and image are the record's
        assert (swap.risk_level, swap.risk_type, swap.image) == (record.risk_level, record.risk_type, record.image)
        assert swap.turns[:-1] == record.turns[:-1] and swap.turns[-1] == Turn("assistant", donor.turns[-1].text)
        assert "prefix_decision" not in record.metadata  # the originals are untouched
    assert len({s.metadata["answer_of"] for s in swaps}) > 1  # donors are drawn, not one for all
    # deterministic for a seed; the ratio picks about that share
    again = decision_swaps(records, 1.0, seed=3)
    assert [(s.id, s.metadata["answer_of"]) for s in again] == [(s.id, s.metadata["answer_of"]) for s in swaps]
    many = keyword_records(2000, seed=1)
    n_safe = sum(r.risk_level == 0 for r in many)
    share = len(decision_swaps(many, 0.3, seed=0)) / n_safe
    assert 0.25 < share < 0.35, share
    assert decision_swaps(records, 0.0) == []


def test_decision_swaps_refuse_what_they_cannot_make():
    records = keyword_records(30, seed=0)
    with pytest.raises(ValueError, match=r"must be in \[0, 1\], got 1.5"):
        decision_swaps(records, 1.5)
    only_safe = [r for r in records if r.risk_level == 0]
    with pytest.raises(ValueError, match=f"got {len(only_safe)} safe and 0 risky"):
        decision_swaps(only_safe, 0.5)
    # a record without an answer is neither swapped nor a donor
    unanswered = [SafetyRecord(id=f"q{i}", image=r.image, turns=[Turn("user", "hi")], risk_level=r.risk_level,
                               risk_type=r.risk_type, source="test") for i, r in enumerate(records)]
    with pytest.raises(ValueError, match="got 0 safe and 0 risky"):
        decision_swaps(unanswered, 0.5)


def test_both_collators_hand_the_decisions_to_the_model(tmp_path):
    from safevlm.data.collator import SafetyCollator, decision_tensors
    from safevlm.tiny import build_tiny

    records = keyword_records(12, seed=0)
    swaps = decision_swaps(records, 1.0)
    batch_records = [records[0], swaps[0], records[1]]
    _, processor = build_tiny("test")
    batch = SafetyCollator(processor)(batch_records)
    decision = swaps[0].metadata["prefix_decision"]
    assert batch["condition_level"].tolist() == [-1, decision[0], -1]
    assert batch["condition_type"].tolist() == [-1, decision[1], -1]
    assert "condition_level" not in SafetyCollator(processor)(records[:3])  # no swap, no tensors
    assert decision_tensors(records[:3]) == {}


def test_stage2_trains_on_swaps_through_the_feature_cache(tmp_path):
    from safevlm.model import SafeVLM
    from safevlm.tiny import build_tiny
    from safevlm.train import run_stage

    base, processor = build_tiny("test", seed=0)
    torch.manual_seed(0)
    model = SafeVLM(base, **SAFETY_TEST_SIZES, prefix_conditioning="decision")
    records = keyword_records(24, seed=0)
    n_swaps = len(decision_swaps(records, 1.0, seed=0))
    seen = []
    forward = type(model).forward

    def spy(self, *args, **kwargs):
        if self.training:
            level = kwargs.get("condition_level")
            seen.append(0 if level is None else int((level >= 0).sum()))
        return forward(self, *args, **kwargs)

    config = tiny_config(tmp_path, stage=2, data={"decision_swap_ratio": 1.0, "clean_ratio": None},
                         optim={"epochs": 1, "batch_size": 4}, log={"save_steps": 0, "eval_steps": 0, "plot": False})
    type(model).forward = spy
    try:
        result = run_stage(config, model=model, processor=processor, train_records=records)
    finally:
        type(model).forward = forward
    assert sum(seen) == n_swaps > 0  # every swap went through training once, with its decision
    assert len(seen) == -(-(len(records) + n_swaps) // 4)
    assert result.model.prefix_tokens.condition.weight.abs().sum() > 0  # the decision path learned


def test_swaps_need_stage2_and_a_decision_conditioned_model(tmp_path):
    from safevlm.model import SafeVLM
    from safevlm.tiny import build_tiny
    from safevlm.train import run_stage
    from safevlm.train.config import ConfigError

    with pytest.raises(ConfigError, match="stage 2 with loss.lm_weight > 0 only"):
        tiny_config(tmp_path, stage=1, data={"decision_swap_ratio": 0.5})
    with pytest.raises(ConfigError, match=r"decision_swap_ratio must be in \[0, 1\], got -0.1"):
        tiny_config(tmp_path, stage=2, data={"decision_swap_ratio": -0.1})
    base, processor = build_tiny("test", seed=0)
    model = SafeVLM(base, **SAFETY_TEST_SIZES)  # prefix_conditioning 'head'
    config = tiny_config(tmp_path, stage=2, data={"decision_swap_ratio": 0.5})
    with pytest.raises(ConfigError, match="safety prefix_conditioning: decision \\(this one has 'head'"):
        run_stage(config, model=model, processor=processor, train_records=keyword_records(8))
