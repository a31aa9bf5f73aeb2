"""Policy: YAML validation, decisions from probabilities, overrides, fail-closed, shipped files."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from safevlm.policy import (
    Policy,
    PolicyOverrideError,
    PolicyOverrides,
    TypeRule,
    load_policy,
    shipped_policies,
)
from safevlm.taxonomy import DEFAULT_TAXONOMY

TYPES = DEFAULT_TAXONOMY.type_names  # politics, illegal, insult_bullying, fairness, privacy, misleading, safe


def types(**probs) -> list[float]:
    """A type distribution with the given masses; the rest goes to 'safe'."""
    out = [probs.get(t, 0.0) for t in TYPES]
    out[TYPES.index("safe")] += 1.0 - sum(out)
    return out


SAFE_LEVELS = [0.97, 0.01, 0.01, 0.01]
MEDIUM_LEVELS = [0.05, 0.15, 0.70, 0.10]  # P(>=1)=.95, P(>=2)=.80, P(>=3)=.10
HIGH_LEVELS = [0.01, 0.01, 0.03, 0.95]


def minimal(**extra) -> dict:
    data = {
        "rules": {"default": {"hint_threshold": 0.5, "hint_level": 1, "refuse_threshold": 0.5, "refuse_level": 3}},
        "hints": {"default": {1: "low hint", 2: "medium hint", 3: "high hint"}},
        "refusals": {"default": "no."},
    }
    data.update(extra)
    return data


# -- shipped files --------------------------------------------------------------------------------------
def test_every_shipped_policy_loads_and_round_trips():
    names = shipped_policies()
    assert {"default", "strict", "hint_only"} <= set(names)
    for name in names:
        policy = load_policy(name)
        assert policy.name == name
        assert Policy.from_dict(policy.to_dict()) == policy
        # every risky type has a hint for every risky level and a refusal text
        for t in TYPES[:-1]:
            assert policy.refusal_text(t)
            for level in (1, 2, 3):
                assert policy.hint_text(t, level)


def test_shipped_texts_are_specific_per_type_and_level():
    policy = Policy.default()
    hints = {policy.hint_text(t, lv) for t in TYPES[:-1] for lv in (1, 2, 3)}
    assert len(hints) == 18  # 6 types x 3 levels, all different
    assert len({policy.refusal_text(t) for t in TYPES[:-1]}) == 6


def test_extends_merges_rules_field_by_field():
    strict = load_policy("strict")
    default = load_policy("default")
    assert strict.rules["default"].refuse_level == 2 and strict.rules["default"].hint_threshold == 0.3
    # misleading: refusal switched back on, other fields inherited from strict's default rule
    assert strict.rule("misleading") == TypeRule(True, 0.3, 1, 0.5, 2)
    assert default.rule("misleading").refuse_threshold is None
    assert strict.hints == default.hints and strict.relaxable_types == ()
    assert load_policy("hint_only").on_error == "hint"


def test_policy_from_yaml_file_with_relative_extends(tmp_path):
    (tmp_path / "base.yaml").write_text(
        "rules: {default: {hint_threshold: 0.4}}\nhints: {default: {low: a, medium: b, high: c}}\n"
        "refusals: {default: nope}\nrelaxable_types: [privacy]\n"
    )
    (tmp_path / "child.yaml").write_text("extends: base.yaml\nname: child\nrules: {privacy: {enabled: false}}\n")
    policy = Policy.from_yaml(tmp_path / "child.yaml")
    assert policy.name == "child" and policy.relaxable_types == ("privacy",)
    assert policy.rule("privacy").enabled is False and policy.rule("privacy").hint_threshold == 0.4
    (tmp_path / "loop.yaml").write_text("extends: loop.yaml\n")
    with pytest.raises(ValueError, match="cycle"):
        Policy.from_yaml(tmp_path / "loop.yaml")


# -- validation -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "change, message",
    [
        ({"rules": {"default": {}, "weapons": {}}}, r"unknown risk type 'weapons'; allowed: default, politics"),
        ({"rules": {"default": {}, "safe": {}}}, r"the safe type has no rule"),
        ({"rules": {"default": {"hint_threshold": 1.5}}}, r"rules.default: hint_threshold must be in \(0, 1\]"),
        ({"rules": {"default": {"refuse_level": 0}}}, r"refuse_level must be a risk level 1..3"),
        ({"rules": {"default": {"refuse_level": "extreme"}}}, r"refuse_level must be a risk level 1..3 \(low, medium, high\), got 'extreme'"),
        # the true range in the message: 7 is not "out of range 0..3" (0 is refused too)
        ({"rules": {"default": {"refuse_level": 7}}}, r"rules.default: refuse_level must be a risk level 1..3 \(low, medium, high\), got 7$"),
        ({"rules": {"default": {"hint_level": "0"}}}, r"rules.default: hint_level must be a risk level 1..3 \(low, medium, high\), got 0$"),
        ({"hints": {"default": {7: "x"}}}, r"hints.default: level 7 must be a risk level 1..3 \(low, medium, high\)$"),
        ({"hints": {"default": {"safe": "x"}}}, r"hints.default: level 'safe' must be a risk level 1..3"),
        ({"rules": {"default": {"refuse_at": 0.5}}}, r"unknown field\(s\) \['refuse_at'\]"),
        ({"hint_position": "assistant"}, r"hint_position must be one of system, user"),
        ({"on_error": "ignore"}, r"on_error must be one of allow, hint, refuse"),
        ({"hints": {"default": {1: "a", 2: "b"}}}, r"hints.default: a hint text is required for every risky level; missing \['high'\]"),
        ({"refusals": {"illegal": "x"}}, r"a non-empty 'default' refusal text is required"),
        ({"relaxable_types": ["safe"]}, r"relaxable_types: unknown risk type 'safe'"),
        ({"colour": "red"}, r"unknown key\(s\) \['colour'\]"),
        ({"version": 2}, r"unsupported policy version 2"),
    ],
)
def test_invalid_policies_are_refused_with_the_reason(change, message):
    with pytest.raises(ValueError, match=message):
        Policy.from_dict(minimal(**change), source="test.yaml")


def test_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("rules: {default: {hint_threshold: -1}}\n")
    with pytest.raises(ValueError, match=rf"{path}: rules.default: hint_threshold"):
        Policy.from_yaml(path)
    path.write_text("rules: [\n")
    with pytest.raises(ValueError, match="invalid YAML"):
        Policy.from_yaml(path)
    with pytest.raises(FileNotFoundError):
        Policy.from_yaml(tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match="unknown policy 'lenient'; shipped: default, hint_only, strict"):
        load_policy("lenient")


def test_extends_errors_name_the_file_that_extends(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text("version: 1\nextends: nosuch\n")
    with pytest.raises(ValueError, match=rf"^{child}: extends: unknown policy 'nosuch'; shipped: default"):
        Policy.from_yaml(child)
    child.write_text("version: 1\nextends: parent.yaml\n")
    with pytest.raises(FileNotFoundError, match=rf"^{child}: extends: policy file not found: {tmp_path}/parent.yaml"):
        Policy.from_yaml(child)
    (tmp_path / "parent.yaml").write_text("version: 1\nextends: grandparent\n")  # a bad grandparent: the parent named
    with pytest.raises(ValueError, match=rf"{tmp_path}/parent.yaml: extends: unknown policy 'grandparent'"):
        Policy.from_yaml(child)


# -- decisions ----------------------------------------------------------------------------------------
def test_safe_input_is_allowed_without_hint_or_refusal():
    d = Policy.default().decide(SAFE_LEVELS, types())
    assert (d.action, d.risk_level, d.risk_type, d.hint, d.refusal, d.decided_by) == ("allow", 0, "safe", None, None, None)


def test_medium_risk_gets_the_medium_hint_of_its_type():
    policy = Policy.default()
    d = policy.decide(MEDIUM_LEVELS, types(illegal=0.9))
    assert d.action == "hint" and d.decided_by == "illegal" and d.risk_type == "illegal"
    assert d.hint_level == 2 and d.hint == policy.hint_text("illegal", 2) and d.refusal is None
    assert d.score == pytest.approx(0.95)  # P(level >= low) * P(illegal | risky) = .95 * 1


def test_hints_get_stronger_with_the_level():
    policy = Policy.default()
    low = policy.decide([0.3, 0.6, 0.05, 0.05], types(privacy=0.8))
    assert (low.action, low.hint_level, low.hint) == ("hint", 1, policy.hint_text("privacy", 1))
    high_hint = policy.decide([0.05, 0.05, 0.1, 0.8], types(misleading=0.9))  # misleading never refuses
    assert (high_hint.action, high_hint.hint_level) == ("hint", 3)


def test_serious_risk_is_refused_with_the_types_refusal():
    policy = Policy.default()
    d = policy.decide(HIGH_LEVELS, types(illegal=0.97))
    assert d.action == "refuse" and d.decided_by == "illegal"
    assert d.refusal == policy.refusal_text("illegal") and d.hint is None


def test_type_attribution_is_conditional_on_risk():
    policy = Policy.from_dict(minimal())
    # the type head splits illegal vs privacy 3:1 over the risky mass; the level head says serious
    d = policy.decide(HIGH_LEVELS, types(illegal=0.3, privacy=0.1))
    assert d.action == "refuse" and d.decided_by == "illegal"
    assert d.score == pytest.approx(0.95 * 0.75)


def test_thresholds_are_inclusive_and_null_never_fires():
    policy = Policy.from_dict(minimal(rules={"default": {"hint_threshold": 0.5, "refuse_threshold": 0.5}}))
    exactly = policy.decide([0.5, 0.0, 0.0, 0.5], types(illegal=1.0))
    assert exactly.action == "refuse"
    below = policy.decide([0.51, 0.0, 0.0, 0.49], types(illegal=1.0))
    assert below.action == "allow"
    never = Policy.from_dict(minimal(rules={"default": {"hint_threshold": None, "refuse_threshold": None}}))
    assert never.decide(HIGH_LEVELS, types(illegal=1.0)).action == "allow"


def test_disabled_type_is_allowed_but_others_still_apply():
    # a deployment that allows CAPTCHA reading: 'illegal' switched off
    policy = Policy.from_dict(minimal(rules={"default": {}, "illegal": {"enabled": False}}))
    assert policy.decide(HIGH_LEVELS, types(illegal=0.97)).action == "allow"
    assert policy.decide(HIGH_LEVELS, types(privacy=0.97)).action == "refuse"


def test_per_type_thresholds_and_levels():
    policy = Policy.from_dict(minimal(rules={"default": {}, "privacy": {"refuse_level": "medium", "refuse_threshold": 0.7}}))
    assert policy.decide(MEDIUM_LEVELS, types(privacy=0.9)).action == "refuse"  # P(>=2)=.8 >= .7
    assert policy.decide(MEDIUM_LEVELS, types(politics=0.9)).action == "hint"  # default refuses only at high


def test_strictest_action_wins_across_types():
    policy = Policy.from_dict(minimal(rules={"default": {}, "fairness": {"refuse_level": 1, "refuse_threshold": 0.3}}))
    d = policy.decide(MEDIUM_LEVELS, types(illegal=0.5, fairness=0.4))
    # illegal only hints (p .53), fairness refuses (p(>=1) * .44 = .42 >= .3)
    assert d.action == "refuse" and d.decided_by == "fairness"


def test_decide_batch_takes_tensors_and_per_sample_overrides():
    policy = Policy.default()
    level = torch.tensor([SAFE_LEVELS, HIGH_LEVELS, HIGH_LEVELS])
    type_ = torch.tensor([types(), types(privacy=0.97), types(privacy=0.97)])
    out = policy.decide_batch(level, type_, [None, None, PolicyOverrides(allow_types=("privacy",))])
    assert [d.action for d in out] == ["allow", "refuse", "allow"]
    with pytest.raises(ValueError, match="got 2 overrides for 3 inputs"):
        policy.decide_batch(level, type_, [None, None])


# -- overrides --------------------------------------------------------------------------------------------
def test_overrides_relax_only_what_the_policy_permits():
    policy = Policy.default()  # relaxable: privacy, misleading
    privacy_risk = (HIGH_LEVELS, types(privacy=0.97))
    assert policy.decide(*privacy_risk).action == "refuse"
    assert policy.decide(*privacy_risk, PolicyOverrides(allow_types=("privacy",))).action == "allow"
    with pytest.raises(PolicyOverrideError, match=r"does not let requests allow \['illegal'\]; relaxable types: privacy, misleading"):
        policy.decide(HIGH_LEVELS, types(illegal=0.97), PolicyOverrides(allow_types=("illegal",)))
    with pytest.raises(PolicyOverrideError, match="unknown risk type"):
        policy.check_overrides(PolicyOverrides(allow_types=("weather",)))
    with pytest.raises(PolicyOverrideError, match="relaxable types: none"):
        load_policy("strict").check_overrides(PolicyOverrides(allow_types=("privacy",)))


def test_override_parsing():
    assert PolicyOverrides.from_dict(None) is None
    assert PolicyOverrides.from_dict({"allow_types": ["privacy", "privacy"]}).allow_types == ("privacy",)
    with pytest.raises(PolicyOverrideError, match="unknown safety override"):
        PolicyOverrides.from_dict({"refuse_all": True})
    with pytest.raises(PolicyOverrideError, match="must be a list"):
        PolicyOverrides.from_dict({"allow_types": "privacy"})


# -- fail-closed --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "level, type_, reason",
    [
        ([math.nan, 0.5, 0.25, 0.25], types(), "not finite"),
        (SAFE_LEVELS, [math.inf] + types()[1:], "not finite"),
        ([0.5, 0.5, 0.5, 0.5], types(), "do not form a distribution"),
        ([0.5, 0.5], types(), "have 2 entries, the taxonomy has 4"),
    ],
)
def test_invalid_probabilities_fail_closed_and_are_logged(caplog, level, type_, reason):
    policy = Policy.default()
    with caplog.at_level(logging.WARNING, logger="safevlm.policy"):
        d = policy.decide(level, type_)
    assert d.action == "refuse" and d.refusal == policy.refusal_text(None)
    assert reason in d.error
    assert any("action refuse" in r.getMessage() and reason in r.getMessage() for r in caplog.records)


def test_on_error_is_configurable():
    hinting = Policy.from_dict(minimal(on_error="hint"))
    d = hinting.decide([math.nan] * 4, types())
    assert d.action == "hint" and d.hint == "high hint" and d.hint_level == 3
    assert Policy.from_dict(minimal(on_error="allow")).decide([math.nan] * 4, types()).action == "allow"


def test_decision_to_dict_is_json_ready():
    import json

    d = Policy.default().decide(MEDIUM_LEVELS, types(illegal=0.9)).to_dict()
    assert json.loads(json.dumps(d))["type_probs"]["illegal"] == pytest.approx(0.9)
    nan = Policy.default().decide([math.nan] * 4, types()).to_dict()
    assert nan["level_probs"] == [None] * 4 and json.dumps(nan)
