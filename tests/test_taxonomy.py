"""The risk taxonomy validates names in one place; the safety config and the synthetic data read it."""

from __future__ import annotations

import pytest

from safevlm.config import SafetyConfig
from safevlm.taxonomy import DEFAULT_TAXONOMY, Taxonomy


def test_risk_type_names_leave_out_the_safe_type():
    assert DEFAULT_TAXONOMY.risk_type_names == (
        "politics", "illegal", "insult_bullying", "fairness", "privacy", "misleading",
    )
    custom = Taxonomy(("safe", "harmful", "spam"), ("safe", "risky"))
    assert custom.risk_type_names == ("harmful", "spam") and custom.safe_type_id == 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"type_names": ("a", "a", "safe")}, r"risk type names must be unique, got \['a', 'a', 'safe'\]"),
        ({"level_names": ("low", "low")}, r"risk level names must be unique, got \['low', 'low'\]"),
        ({"type_names": ("safe",)}, r"a taxonomy needs at least 2 risk types"),
        ({"level_names": ("safe",)}, r"a taxonomy needs at least 2 risk levels"),
        ({"type_names": ("x", " ", "safe")}, r"names must be non-empty strings, got \[' '\]"),
        ({"safe_type": "benign"}, r"safe_type 'benign' is not one of the risk types"),
    ],
)
def test_bad_names_are_refused_by_the_taxonomy_and_the_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Taxonomy(**kwargs)
    with pytest.raises(ValueError, match=message):  # the config validates through the taxonomy
        SafetyConfig(**{k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()})


def test_config_counts_come_from_its_taxonomy():
    config = SafetyConfig(type_names=["harmful", "safe"], level_names=["safe", "low", "high"])
    assert config.taxonomy == Taxonomy(("harmful", "safe"), ("safe", "low", "high"))
    assert (config.num_types, config.num_levels) == (2, 3)
    assert isinstance(config.type_names, list) and config.to_dict()["type_names"] == ["harmful", "safe"]
