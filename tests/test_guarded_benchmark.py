"""The guard-overhead benchmark runs end to end (tiny sizes; its ratios are not asserted here)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "guard_overhead.py"


def test_guard_overhead_benchmark_prints_the_three_ratios(capsys):
    spec = importlib.util.spec_from_file_location("guard_overhead", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    code = module.main(["--json", "--repeats", "2", "--warmup", "0", "--image-size", "28", "--vision-hidden", "32",
                        "--vision-layers", "1", "--text-hidden", "64", "--text-layers", "1", "--head-hidden", "32",
                        "--new-tokens", "3", "--guard-batch", "2"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0
    for key in ("guarded_over_plain", "guarded_over_plain_no_prefix", "guard_over_vision_throughput"):
        assert result[key] > 0 and key in result["targets_met"]
    assert result["config"]["image_tokens"] == 4 and result["config"]["new_tokens"] == 3
    assert set(result["median_ms"]) == {"plain", "guarded", "guarded_no_prefix", "vision", "guard"}
