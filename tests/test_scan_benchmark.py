"""The scan-throughput benchmark runs end to end at tiny sizes. Its timings are not asserted
(they depend on the machine); what it runs is: every case passes each batch through the vision
tower once, the scan cases run the safety head of their own projector, the language model never
runs, and the report is complete and consistent with its targets."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
from pathlib import Path

from guarded_fixtures import count_calls

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "scan_throughput.py"


def test_scan_throughput_benchmark_runs_each_case_as_designed(capsys):
    spec = importlib.util.spec_from_file_location("scan_throughput", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    calls, real_build = {}, module.build

    def build(args, device):
        processor, models = real_build(args, device)
        mlp, cab = models["mlp"], models["cabstractor"]
        assert mlp.backbone.vision_tower is cab.backbone.vision_tower  # one base for all cases
        assert (mlp.config.projector_kind, cab.config.projector_kind) == ("mlp", "cabstractor")
        calls["vision"] = stack.enter_context(count_calls(mlp.backbone.vision_tower))
        calls["llm"] = stack.enter_context(count_calls(mlp.backbone.language_model))
        calls["head_mlp"] = stack.enter_context(count_calls(mlp.safety_head))
        calls["head_cab"] = stack.enter_context(count_calls(cab.safety_head))
        return processor, models

    module.build = build
    images, batch, repeats, warmup = 6, 4, 2, 1
    with contextlib.ExitStack() as stack:
        code = module.main(["--json", "--images", str(images), "--batch-size", str(batch), "--num-workers", "0",
                            "--repeats", str(repeats), "--warmup", str(warmup), "--image-size", "28",
                            "--vision-hidden", "32", "--vision-layers", "1", "--text-hidden", "64",
                            "--head-hidden", "32", "--device", "cpu"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0
    rounds = repeats + warmup
    # per round each of the 3 cases sends the 6 images in batches of 4 and 2 through the tower once
    assert sorted(shape[0] for shape in calls["vision"]) == [2] * (3 * rounds) + [4] * (3 * rounds)
    assert calls["llm"] == []  # guard mode: the language model never runs
    assert len(calls["head_mlp"]) == len(calls["head_cab"]) == 2 * rounds  # one head pass per batch
    for key, bound in module.TARGETS.items():
        assert math.isfinite(result[key]) and result[key] > 0
        assert result["targets_met"][key] == (result[key] >= bound)
    assert set(result["images_per_second"]) == {"vision", "scan_mlp", "scan_cabstractor"}
    assert all(math.isfinite(v) and v > 0 for v in result["images_per_second"].values())
    config = result["config"]
    assert (config["images"], config["batch_size"], config["repeats"], config["warmup"]) == (images, batch, repeats, warmup)
    assert config["device"] == "cpu" and config["dtype"] == "float32"
