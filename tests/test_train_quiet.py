"""`--quiet` means quiet: no progress bars and no per-step log dicts, metrics.jsonl all the same."""

from __future__ import annotations

import re

import pytest
from train_fixtures import keyword_records, one_thread, tiny_config  # noqa: F401 (fixture)

from safevlm.train.trainer import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")

# A tqdm bar ("12%|#2   | 3/25 [00:01<...]") or a Trainer log dict ("{'loss': 1.9, ...").
NOISE = re.compile(r"\d+%\||it/s|s/it|\{'(loss|eval_loss|train_runtime)'")

# The whole demo, shrunk to a few seconds: what is checked here is what it prints.
SMALL_DEMO = {
    "n_samples": 40, "vision_images": 32, "vision_epochs": 1, "lm_samples": 16, "lm_epochs": 1,
    "stage1_epochs": 1, "stage2_epochs": 1, "stage2_samples": 16, "eval_samples": 6, "max_new_tokens": 2,
    "batch_size": 8, "threads": 1,
}


def test_run_stage_quiet_prints_nothing_but_logs_metrics(tmp_path, capfd):
    from safevlm.model import SafeVLM
    from safevlm.tiny import build_tiny
    from safevlm.train import run_stage

    base, processor = build_tiny("test", seed=0)
    model = SafeVLM(base, num_prefix_tokens=4, num_query_tokens=4, head_num_heads=4)
    # progress_bar: true in the recipe; quiet wins. logging_steps 1: a log dict every step.
    config = tiny_config(tmp_path, optim={"epochs": 1}, log={"progress_bar": True, "logging_steps": 1, "save_steps": 0,
                                                             "plot": False})
    capfd.readouterr()
    result = run_stage(config, model=model, processor=processor, train_records=keyword_records(16),
                       val_records=keyword_records(8, seed=1, prefix="v"), quiet=True)
    out, err = capfd.readouterr()
    assert out == "" and not NOISE.search(err), (out[-500:], err[-500:])
    losses = [e for e in read_metrics(result.output_dir / "metrics.jsonl") if "loss" in e]
    assert [e["step"] for e in losses] == [1, 2]  # 16 records, batch 8

    # the same run, not quiet and without a bar: the Trainer prints each log dict
    model = SafeVLM(build_tiny("test", seed=0)[0], num_prefix_tokens=4, num_query_tokens=4, head_num_heads=4)
    config = tiny_config(tmp_path / "loud", optim={"epochs": 1},
                         log={"progress_bar": False, "logging_steps": 1, "save_steps": 0, "plot": False})
    run_stage(config, model=model, processor=processor, train_records=keyword_records(16))
    out, _ = capfd.readouterr()
    assert out.count("'loss'") == 2


def test_demo_quiet_prints_only_the_report(tmp_path, capfd, monkeypatch):
    import safevlm.demo
    from safevlm.cli import main

    monkeypatch.setattr(safevlm.demo, "DemoSettings",
                        lambda seed=0, _cls=safevlm.demo.DemoSettings: _cls(seed=seed, **SMALL_DEMO))
    out_dir = tmp_path / "demo"
    capfd.readouterr()
    assert main(["demo", "--out", str(out_dir), "--quiet"]) == 0
    out, err = capfd.readouterr()
    report = (out_dir / "report.md").read_text()
    assert out == f"{report}\nreport: {out_dir}/report.json, {out_dir}/report.md\n"
    assert not NOISE.search(err) and "\r" not in err, err[-2000:]
    for stage in ("stage1", "stage2"):  # the logs still go to metrics.jsonl
        entries = read_metrics(out_dir / stage / "metrics.jsonl")
        assert any("train_loss" in e for e in entries) and any("eval_loss" in e for e in entries), stage
