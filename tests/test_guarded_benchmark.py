"""The guard-overhead benchmark runs end to end at tiny sizes. Its timings are not asserted
(they depend on the machine); what it runs is: every guarded generation makes one vision pass
and one language-model call per new token, the guard one vision pass per batch, and its report
is complete and consistent with its targets."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
from pathlib import Path

from guarded_fixtures import count_calls

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "guard_overhead.py"
RATIOS = ("guarded_over_plain", "guarded_over_plain_no_prefix", "guard_over_vision_throughput")


def test_guard_overhead_benchmark_runs_each_case_as_designed(capsys):
    spec = importlib.util.spec_from_file_location("guard_overhead", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    calls, real_build = {}, module.build

    def build(args):  # count the forward calls of the models the benchmark builds
        base, processor, with_prefix, without_prefix = real_build(args)
        vision, llm = with_prefix.backbone.vision_tower, with_prefix.backbone.language_model
        # one base shared by all cases, so these two counters see every case
        assert vision is without_prefix.backbone.vision_tower and llm is without_prefix.backbone.language_model
        assert vision is base.model.vision_tower and llm is base.model.language_model
        calls["vision"] = stack.enter_context(count_calls(vision))
        calls["llm"] = stack.enter_context(count_calls(llm))
        return base, processor, with_prefix, without_prefix

    module.build = build
    rounds, new_tokens, guard_batch = 3, 3, 2  # warm-up rounds included
    with contextlib.ExitStack() as stack:
        code = module.main(["--json", "--repeats", "2", "--warmup", "1", "--image-size", "28", "--vision-hidden", "32",
                            "--vision-layers", "1", "--text-hidden", "64", "--text-layers", "1", "--head-hidden", "32",
                            "--new-tokens", str(new_tokens), "--guard-batch", str(guard_batch)])
    result = json.loads(capsys.readouterr().out)
    assert code == 0
    # per round: plain, guarded and guarded_no_prefix each encode their one image once; the
    # vision-only and guard cases each encode one batch; the guard never runs the LLM
    vision_batches = sorted(shape[0] for shape in calls["vision"])
    assert vision_batches == [1] * (3 * rounds) + [guard_batch] * (2 * rounds)
    # the three generating cases: one LLM call per new token (forced to exactly new_tokens), batch 1
    assert len(calls["llm"]) == 3 * rounds * new_tokens
    assert {shape[0] for shape in calls["llm"]} == {1}
    # the report: finite positive ratios, targets_met computed from them and the stated bounds
    for key in RATIOS:
        assert math.isfinite(result[key]) and result[key] > 0
        assert math.isfinite(result["cpu_time_ratios"][key]) and result["cpu_time_ratios"][key] > 0
        op, bound = module.TARGETS[key]
        assert result["targets_met"][key] == (result[key] <= bound if op == "<=" else result[key] >= bound)
    assert set(result["targets_met"]) == set(RATIOS)
    assert set(result["median_ms"]) == {"plain", "guarded", "guarded_no_prefix", "vision", "guard"}
    assert all(math.isfinite(ms) and ms > 0 for ms in result["median_ms"].values())
    config = result["config"]
    assert (config["image_tokens"], config["new_tokens"], config["guard_batch"]) == (4, new_tokens, guard_batch)
    assert (config["repeats"], config["warmup"], config["prefix_tokens"]) == (2, 1, 64)
