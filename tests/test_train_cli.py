"""`safevlm train` and `safevlm merge` end to end on the tiny 'test' model, from YAML files."""

from __future__ import annotations

import json

import pytest
import yaml
from train_fixtures import one_thread, synth_data, tiny_recipe  # noqa: F401 (fixtures)

from safevlm.cli import main


def _write(tmp_path, name, recipe):
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"# safevlm train --config {path}\n" + yaml.safe_dump(recipe))
    return path


def _summary(out: str) -> dict:
    return json.loads(out[out.index("{\n"):])


def test_train_stage1_then_stage2_then_merge_from_the_cli(tmp_path, synth_data, capsys, one_thread):  # noqa: F811
    data = {"train": str(synth_data / "train.jsonl"), "val": str(synth_data / "val.jsonl")}
    s1 = _write(tmp_path, "s1", tiny_recipe(tmp_path, data=data, log={"save_steps": 0}))
    assert main(["train", "--config", str(s1), "optim.epochs=1", "log.plot=false"]) == 0
    first = _summary(capsys.readouterr().out)
    assert first["stage"] == 1 and first["global_step"] == 6 and first["cache"]["computed"] == 48 + 6
    assert set(first["metrics"]) >= {"eval_type_macro_f1", "eval_level_macro_f1", "eval_type_accuracy"}

    recipe2 = tiny_recipe(tmp_path, stage=2, data=data, log={"save_steps": 0, "plot": False},
                          model={"base": "tiny:test", "adapter": first["adapter"]}, optim={"epochs": 1})
    s2 = _write(tmp_path, "s2", recipe2)
    assert main(["train", "--config", str(s2)]) == 0
    second = _summary(capsys.readouterr().out)
    assert second["stage"] == 2 and second["cache"]["computed"] == 0  # stage 1 filled the cache
    adapter = second["adapter"]

    out = tmp_path / "merged"
    assert main(["merge", "--base", "tiny:test", "--adapter", adapter, "--out", str(out)]) == 0
    assert "merged" in capsys.readouterr().out
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert names and not any("lora_" in n for n in names)  # LoRA folded in, plain weights
    assert main(["merge", "--base", "tiny:test", "--adapter", adapter, "--out", str(out)]) == 2  # exists
    assert "exists" in capsys.readouterr().err


def test_synthetic_data_is_made_once_and_never_silently_replaced(tmp_path):
    from safevlm.train.config import ConfigError, SyntheticSection
    from safevlm.train.stage import ensure_synthetic_dataset

    root = tmp_path / "synth"
    ensure_synthetic_dataset(root, SyntheticSection(dir=str(root), n=12, image_size=32))
    stamp = (root / "train.jsonl").stat().st_mtime_ns
    ensure_synthetic_dataset(root, SyntheticSection(dir=str(root), n=12, image_size=32))
    assert (root / "train.jsonl").stat().st_mtime_ns == stamp
    with pytest.raises(ConfigError, match="made with other settings"):
        ensure_synthetic_dataset(root, SyntheticSection(dir=str(root), n=13, image_size=32))


def test_tiny_base_specs():
    from safevlm.train.stage import parse_tiny_spec

    assert parse_tiny_spec("tiny:default") == ("default", 0)
    assert parse_tiny_spec("tiny:test@7") == ("test", 7)
    assert parse_tiny_spec("/models/llava") is None
