"""Training recipes: every shipped config loads, paper settings, validation errors, overrides."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from safevlm.train import ConfigError, TrainConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SHIPPED = sorted(CONFIGS.glob("*.yaml"))


def test_the_expected_configs_are_shipped():
    names = {p.name for p in SHIPPED}
    assert {"stage1.yaml", "stage2.yaml", "tiny_stage1.yaml", "tiny_stage2.yaml"} <= names
    assert (CONFIGS / "ds_zero2.json").is_file()


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_starts_with_its_command(path):
    first = path.read_text().splitlines()[0]
    assert first == f"# safevlm train --config configs/{path.name}"
    config = TrainConfig.from_yaml(path)
    assert config.stage in (1, 2)
    if config.optim.deepspeed:
        assert (CONFIGS.parent / config.optim.deepspeed).is_file()


def test_paper_settings_for_llava_1_5_7b():
    s1 = TrainConfig.from_yaml(CONFIGS / "stage1.yaml")
    s2 = TrainConfig.from_yaml(CONFIGS / "stage2.yaml")
    for c in (s1, s2):
        assert c.optim.lr == 1e-5 and c.optim.epochs == 3 and c.loss.cls_weight == 10
        assert c.optim.deepspeed == "configs/ds_zero2.json" and c.optim.precision == "bf16"
    assert (s1.optim.warmup_steps, s2.optim.warmup_steps) == (20, 300)
    assert s1.lora is None and s1.model.safety["num_prefix_tokens"] == 64 and s1.model.safety["num_query_tokens"] == 64
    assert (s2.lora.r, s2.lora.alpha, s2.lora.dropout, s2.lora.target_modules) == (256, 16, 0.05, "all-linear")
    assert s2.model.adapter == s1.output_dir + "/adapter"
    ds = json.loads((CONFIGS / "ds_zero2.json").read_text())
    assert ds["zero_optimization"]["stage"] == 2
    # values DeepSpeed would otherwise take from model.config.hidden_size (SafeVLM has none) are numbers
    assert isinstance(ds["zero_optimization"]["reduce_bucket_size"], int)


def test_tiny_stage2_continues_from_tiny_stage1():
    s1 = TrainConfig.from_yaml(CONFIGS / "tiny_stage1.yaml")
    s2 = TrainConfig.from_yaml(CONFIGS / "tiny_stage2.yaml")
    assert s1.model.base == s2.model.base == "tiny:default"
    assert s2.model.adapter == str(s1.adapter_dir)
    assert s1.loss.lm_weight == 0 and s2.loss.lm_weight > 0
    assert s1.data.synthetic == s2.data.synthetic and s1.cache_dir == s2.cache_dir


def test_overrides_use_dotted_keys_and_yaml_values():
    config = TrainConfig.from_yaml(
        CONFIGS / "tiny_stage1.yaml", ["optim.lr=2e-4", "log.save_steps=5", "model.safety.num_prefix_tokens=8",
                                       "data.clean_ratio=null", "output_dir=elsewhere"]
    )
    assert config.optim.lr == 2e-4 and config.log.save_steps == 5 and config.output_dir == "elsewhere"
    assert config.model.safety["num_prefix_tokens"] == 8 and config.data.clean_ratio is None
    assert config.adapter_dir == Path("elsewhere/adapter")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"optimizer": {}}, r"unknown key\(s\) optimizer in the recipe; allowed: stage, output_dir"),
        ({"optim": {"learning_rate": 1e-4}}, r"unknown key\(s\) optim.learning_rate in section 'optim'; allowed: lr,"),
        ({"optim": {"lr": "fast"}}, r"optim.lr must be a number, got 'fast'"),
        ({"optim": {"lr": -1.0}}, r"optim.lr must be > 0, got -1.0"),
        ({"optim": {"batch_size": 2.5}}, r"optim.batch_size must be an integer, got 2.5"),
        ({"optim": {"scheduler": "step"}}, r"optim.scheduler must be one of constant, linear, cosine; got 'step'"),
        ({"stage": 3}, r"stage must be one of 1, 2; got 3"),
        ({"lora": {"r": 8}}, r"stage 1 freezes the whole base; remove the 'lora' section"),
        ({"model": {"safety": {"num_prefix_token": 3}}}, r"model.safety: unknown SafetyConfig field\(s\) \['num_prefix_token'\]"),
        ({"model": {"safety_modules": "lora"}}, r"model.safety_modules must be one of train, prefix, frozen; got 'lora'"),
        ({"loss": {"cls_weight": 0, "lm_weight": 0}}, r"both 0: nothing to train"),
        ({"log": {"progress_bar": "yes"}}, r"log.progress_bar must be true/false, got 'yes'"),
        ({"data": {"train": "a.jsonl", "synthetic": {"n": 10}}}, r"either data.synthetic or data.train/data.val"),
        ({"data": {"synthetic": {"multi_turn_ratio": 1.5}}}, r"data.synthetic.multi_turn_ratio must be in \[0, 1\], got 1.5"),
        ({"data": {"length_window": 0}}, r"data.length_window must be >= 1 \(batches sorted together\), got 0"),
    ],
)
def test_bad_recipes_are_clear_errors(change, message):
    recipe = {"stage": 1, "model": {"base": "tiny:test"}}
    for key, value in change.items():
        recipe[key] = value
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_dict(recipe)


def test_stage2_needs_lora_and_lm_loss():
    with pytest.raises(ConfigError, match="stage 2 needs a 'lora' section"):
        TrainConfig.from_dict({"stage": 2})
    with pytest.raises(ConfigError, match="stage 2 trains the language model: loss.lm_weight must be > 0"):
        TrainConfig.from_dict({"stage": 2, "lora": {}, "loss": {"lm_weight": 0}})
    with pytest.raises(ConfigError, match="lora.target_modules must be 'all-linear' or a list"):
        TrainConfig.from_dict({"stage": 2, "lora": {"target_modules": "all"}})


def test_bad_override_syntax_and_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="override 'optim.lr' is not key=value"):
        TrainConfig.from_yaml(CONFIGS / "tiny_stage1.yaml", ["optim.lr"])
    with pytest.raises(ConfigError, match="optim.lr.x: 'lr' is not a section"):
        TrainConfig.from_yaml(CONFIGS / "tiny_stage1.yaml", ["optim.lr.x=1"])
    with pytest.raises(FileNotFoundError, match="no such config file"):
        TrainConfig.from_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage: [1\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        TrainConfig.from_yaml(bad)


def test_cli_reports_config_errors_and_lists_keys(tmp_path, capsys):
    from safevlm.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("stage: 1\noptim:\n  epoch: 3\n")
    assert main(["train", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "safevlm train: error:" in err and "optim.epoch" in err and "allowed: lr, epochs" in err
    assert main(["train", "--list-keys"]) == 0
    listing = capsys.readouterr().out
    assert "optim.lr (a number): Peak learning rate (paper: 1e-5)." in listing
    assert "lora.target_modules" in listing


def test_round_trip_through_yaml(tmp_path):
    config = TrainConfig.from_yaml(CONFIGS / "stage2.yaml")
    path = tmp_path / "copy.yaml"
    path.write_text(config.to_yaml())
    assert TrainConfig.from_yaml(path) == config


def test_synthetic_data_made_with_another_multi_turn_ratio_is_not_reused(tmp_path):
    from safevlm.train.config import SyntheticSection
    from safevlm.train.stage import ensure_synthetic_dataset

    root = tmp_path / "synth"
    ensure_synthetic_dataset(root, SyntheticSection(dir=str(root), n=12, image_size=32, multi_turn_ratio=0.5))
    meta = json.loads((root / "synth.json").read_text())
    assert meta["multi_turn_ratio"] == 0.5
    ensure_synthetic_dataset(root, SyntheticSection(dir=str(root), n=12, image_size=32, multi_turn_ratio=0.5))  # reused
    with pytest.raises(ConfigError, match="made with other settings"):
        ensure_synthetic_dataset(root, SyntheticSection(dir=str(root), n=12, image_size=32, multi_turn_ratio=0.0))
