"""benchmarks/train_step.py runs end to end at tiny sizes. Timings are not asserted (they depend
on the machine); what it times is: the supervised-only loss and the early-stopping tower, each
against the plain computation, every case once per round."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "train_step.py"


def _module():
    spec = importlib.util.spec_from_file_location("train_step", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_step_benchmark_times_both_shortcuts_against_the_plain_paths(capsys, monkeypatch):
    module = _module()
    import safevlm.backbones as backbones
    import safevlm.backbones.base as base_module

    calls = {"full": 0, "supervised": 0, "early": 0}
    real_loss, real_tower = backbones.causal_lm_loss, base_module.tower_hidden_states

    def counted_loss(*a, **k):
        calls["full"] += 1
        return real_loss(*a, **k)

    def counted_tower(*a, **k):
        calls["early"] += 1
        return real_tower(*a, **k)

    real_supervised = base_module.supervised_lm_loss

    def counted_supervised(*a, **k):
        calls["supervised"] += 1
        return real_supervised(*a, **k)

    monkeypatch.setattr(backbones, "causal_lm_loss", counted_loss)
    monkeypatch.setattr(base_module, "tower_hidden_states", counted_tower)
    monkeypatch.setattr(base_module, "supervised_lm_loss", counted_supervised)
    assert module.main(["--json", "--models", "tiny-default", "--rounds", "2", "--warmup", "1", "--batch-size", "1",
                        "--answer-tokens", "4"]) == 0
    out = json.loads(capsys.readouterr().out)
    result = out["models"]["tiny-default"]
    assert calls == {"full": 3, "supervised": 3, "early": 3}  # (warm-up + 2 rounds) x each case
    assert result["supervised_over_full"] > 0 and result["early_over_whole"] > 0
    assert (result["tokens"], result["supervised_tokens"], result["vision_layers"], result["vision_feature_layer"]) == (
        113, 4, 4, -2)
    assert out["rounds"] == 2 and out["batch_size"] == 1


def test_train_step_benchmark_refuses_an_unknown_model(capsys):
    with pytest.raises(SystemExit) as exit_info:
        _module().main(["--models", "llava-2"])
    assert exit_info.value.code == 2 and "unknown model(s) ['llava-2']" in capsys.readouterr().err
