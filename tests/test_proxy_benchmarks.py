"""The guard proxy's two scripts run end to end at tiny sizes: benchmarks/proxy_vs_inprocess.py
on a small demo-shaped folder (a prefix-free adapter: both systems give the same answers), and
benchmarks/proxy_overhead.py (slow: it starts four Python processes). Timings are not asserted."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

pytest.importorskip("fastapi")

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory):
    """DEMO/base (tiny 'test' preset), DEMO/data (synthetic split), DEMO/stage2/adapter: fresh
    safety modules without prefix tokens and a LoRA moved off zero (so it changes answers)."""
    import torch
    from train_fixtures import tiny_config

    from safevlm.data.synth import make_synthetic_dataset
    from safevlm.loading import load_model_and_processor
    from safevlm.tiny import save_tiny
    from safevlm.train.stage import add_lora

    demo = tmp_path_factory.mktemp("demo")
    base = save_tiny(demo / "base", preset="test", seed=0)
    model, processor = load_model_and_processor(str(base), None, num_prefix_tokens=0, num_query_tokens=4,
                                                head_num_heads=4)
    add_lora(model, tiny_config(demo, stage=2))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    model.save_pretrained(demo / "stage2" / "adapter")
    make_synthetic_dataset(demo / "data", 120, seed=0, image_size=32)  # the processor resizes to 16 px
    return demo


HINT_ALL = """\
name: hint_all
rules: {default: {hint_threshold: 1.0e-9, hint_level: low, refuse_threshold: null}}
hints: {default: {low: Careful now., medium: Be very careful., high: Answer only what is safe.}}
refusals: {default: No.}
"""


def test_proxy_vs_inprocess_gives_the_same_answers_for_a_prefix_free_adapter(demo_folder, tmp_path):
    """Every request hinted (the hint goes to the engine as text): the same answers both ways."""
    module = _script("proxy_vs_inprocess")
    policy = tmp_path / "hint_all.yaml"
    policy.write_text(HINT_ALL)
    result = module.compare(demo_folder, policy=str(policy), samples=8, max_new_tokens=5)
    inprocess, proxy = result["rows"]
    assert (inprocess["mode"], proxy["mode"]) == ("in-process", "proxy") and result["n"] == 8
    assert inprocess["prefix_tokens"] == proxy["prefix_tokens"] == 0
    assert len(inprocess["answers"]) == 8 and any(inprocess["answers"])
    assert proxy["answers"] == inprocess["answers"]  # hint + LoRA only: the engine computes the same
    assert proxy["actions"] == inprocess["actions"] == {"allow": 0, "hint": 8, "refuse": 0}
    for key, _ in module.COLUMNS:
        assert proxy[key] == inprocess[key] and 0 <= proxy[key] <= 1
    table = module.markdown(result)
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert len(rows) == 2 and "| in-process | 0 |" in rows[0] and "| proxy | 0 |" in rows[1]
    assert module.main([str(demo_folder), "--samples", "4", "--max-new-tokens", "3", "--out", str(tmp_path / "t.md")]) == 0
    assert (tmp_path / "t.md").read_text().count("| `") == 2


def test_proxy_vs_inprocess_needs_a_demo_folder(tmp_path):
    module = _script("proxy_vs_inprocess")
    with pytest.raises(FileNotFoundError, match="safevlm demo --out DIR"):
        module.compare(tmp_path)


@pytest.mark.slow
def test_proxy_overhead_benchmark_runs(capsys):
    module = _script("proxy_overhead")
    code = module.main(["--json", "--repeats", "2", "--warmup", "1", "--image-size", "28", "--vision-hidden", "32",
                        "--vision-layers", "1", "--text-hidden", "64", "--text-layers", "1", "--head-hidden", "32",
                        "--new-tokens", "3"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["config"]["new_tokens"] == 3
    assert math.isfinite(result["proxy_over_direct"]) and result["proxy_over_direct"] > 0
    assert set(result["median_ms"]) == {"direct", "proxy", "guard"}
    memory = result["memory"]
    assert 0 < memory["guard_params"] < memory["full_params"]  # the guard-only process holds no LLM layers
    assert memory["guard_rss_mib"] > 0 and memory["full_rss_mib"] > 0
    assert result["targets_met"]["proxy_over_direct"] == (result["proxy_over_direct"] <= 1.10)
