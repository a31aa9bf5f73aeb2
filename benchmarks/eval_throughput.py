"""Evaluation throughput: ``safevlm eval``'s batched guarded path against plain batched ``generate``.

    python benchmarks/eval_throughput.py --json

The model is the one ``benchmarks/guard_overhead.py`` builds (its ``build``): LLaVA-1.5 scaled
down in width with LLaVA-1.5's token counts (336-px images, 576 image tokens, 64 prefix
safety tokens, a ~40-token prompt), random weights. The items are a PSA-VLM jsonl of
``--items`` distinct images on disk, read by the task reader like any benchmark.

Measured in one run under the same conditions: each round times every case once over all
items, in a shuffled order, after warm-up rounds; a ratio is the median over rounds of the
two cases' times in the same round (paired):

* ``eval_over_plain_throughput`` (target >= 0.9): items/s of
  :func:`safevlm.eval.runner.run_task` with the ``adapter`` system (safety head on every
  input, its output stored, prefix tokens, every input answered: the same generation work)
  — task reader, image opening, one vision pass per batch, guarded generation, the SQLite
  store, the rules judge and the metrics — over items/s of plain batched ``generate`` of the
  base on the same items and batches (images opened, chat template, image processor,
  decode). Both forced to ``--new-tokens`` new tokens.
* ``runner_over_plain_throughput``: the same runner with the ``base`` system (the base's own
  ``generate``): what the evaluation machinery alone costs.
* ``guarded_generate_over_plain_throughput``: the ``adapter`` system's ``generate`` callable
  alone over plain ``generate`` (no reader, store, judge): what the guard costs.

``cpu_time_ratios`` gives the same ratios in process CPU time (steadier on a shared machine).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

TARGETS = {"eval_over_plain_throughput": (">=", 0.9)}
HERE = Path(__file__).resolve().parent


def _guard_overhead():
    """benchmarks/guard_overhead.py as a module (its ``build`` and ``PROMPT``)."""
    spec = importlib.util.spec_from_file_location("guard_overhead", HERE / "guard_overhead.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_items(folder: Path, n: int, size: int, prompt: str, seed: int) -> Path:
    """``n`` distinct noise images and a PSA-VLM jsonl asking ``prompt`` about each (half risky)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        name = f"images/item-{i:03d}.png"
        Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8")).save(folder / name)
        risky = i % 2 == 0
        lines.append(json.dumps({
            "id": f"item-{i:03d}", "image": name, "safe_type": 1 if risky else 6, "safe_level": 3 if risky else 0,
            "conversations": [{"from": "USER", "value": f"<image>\n{prompt}"}, {"from": "ASSISTANT", "value": "ok"}],
        }))
    (folder / "items.jsonl").write_text("\n".join(lines) + "\n")
    task = folder / "bench.yaml"
    task.write_text(
        "# safevlm eval run --model M --adapter A --task bench.yaml --data-root DIR\n"
        "name: bench\ndescription: throughput items\n"
        "data: {reader: psavlm, path: items.jsonl, image_root: .}\n"
        "subsets: [risky, benign]\nprompt: \"{prompt}\"\njudge: {default: rules}\n"
        "metrics:\n  - {metric: refusal_rate, higher_is_better: true, subsets: [risky]}\n"
        "  - {metric: head_accuracy, higher_is_better: true}\n"
    )
    return task


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="Print only the JSON result.")
    parser.add_argument("--items", type=int, default=8, help="Items evaluated per round.")
    parser.add_argument("--batch-size", type=int, default=4, help="Items per model call.")
    parser.add_argument("--repeats", type=int, default=5, help="Timed rounds (medians are reported).")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed rounds first.")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadiest timings on a shared machine).")
    parser.add_argument("--new-tokens", type=int, default=32, help="New tokens per answer (forced).")
    parser.add_argument("--prefix-tokens", type=int, default=64, help="Prefix safety tokens of the guarded model.")
    parser.add_argument("--image-size", type=int, default=336, help="Image side (336 / 14 = 24 -> 576 tokens).")
    parser.add_argument("--patch-size", type=int, default=14, help="Vision patch size.")
    parser.add_argument("--vision-hidden", type=int, default=128, help="Vision width (LLaVA-1.5: 1024).")
    parser.add_argument("--vision-layers", type=int, default=24, help="Vision layers (LLaVA-1.5: 24).")
    parser.add_argument("--text-hidden", type=int, default=512, help="LLM width (LLaVA-1.5-7B: 4096).")
    parser.add_argument("--text-layers", type=int, default=8, help="LLM layers (LLaVA-1.5-7B: 32).")
    parser.add_argument("--head-hidden", type=int, default=128, help="Safety head width (paper setting: 1024).")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import torch

    from safevlm.data import open_image
    from safevlm.eval.generation import BaseGenerator, GuardedGenerator, allow_all_policy
    from safevlm.eval.judges.rules import RulesJudge
    from safevlm.eval.runner import GenerationRequest, run_task
    from safevlm.eval.store import ResultsStore, RunKey
    from safevlm.eval.tasks import load_task

    torch.set_num_threads(args.threads)
    go = _guard_overhead()
    base, processor, guarded, _ = go.build(args)
    tmp = Path(tempfile.mkdtemp(prefix="safevlm-eval-bench-"))
    task = load_task(write_items(tmp / "data", args.items, args.image_size, go.PROMPT, args.seed))
    items = task.read(tmp / "data").items
    decoding = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens}
    adapter_system = GuardedGenerator(guarded, processor, allow_all_policy(guarded.config.taxonomy), decoding, args.seed)
    base_system = BaseGenerator(base, processor, decoding, args.seed)
    tokenizer = processor.tokenizer
    batches = [items[i:i + args.batch_size] for i in range(0, len(items), args.batch_size)]
    counter = {"round": 0}

    def plain():
        texts = []
        for batch in batches:
            images = [open_image(item.image, item.image_root) for item in batch]
            chat = processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": task.render_prompt(batch[0])}]}],
                add_generation_prompt=True)
            inputs = processor(images=images, text=[chat] * len(batch), return_tensors="pt", padding=True)
            out = base.generate(**inputs, **decoding, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            texts += processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        return texts

    def through_runner(generator):
        def run():
            counter["round"] += 1
            with ResultsStore(tmp / f"run-{counter['round']}.sqlite") as store:
                result = run_task(task, generator, store, RunKey("bench", "adapter"), [RulesJudge()], data_root=tmp / "data",
                                  batch_size=args.batch_size)
                heads = [a.head for a in store.answers(RunKey("bench", "adapter"), task.name).values()]
            if result.answered != len(items):
                raise RuntimeError(f"answered {result.answered} of {len(items)} items")
            if generator is adapter_system and any(h["completion_tokens"] != args.new_tokens for h in heads):
                raise RuntimeError(f"expected every answer to have {args.new_tokens} tokens")
            return result
        return run

    def generate_only():
        return [adapter_system([GenerationRequest(item, task.render_prompt(item), dict(task.generation)) for item in batch])
                for batch in batches]

    cases = {"plain": plain, "eval": through_runner(adapter_system), "eval_base": through_runner(base_system),
             "guarded_generate": generate_only}
    times = {name: [] for name in cases}
    cpu_times = {name: [] for name in cases}
    order = list(cases)
    shuffle = random.Random(args.seed).shuffle
    with torch.inference_mode():
        for round_ in range(args.warmup + args.repeats):
            shuffle(order)  # every case once per round, in a fresh order: load drift hits all alike
            for name in order:
                start, cpu_start = time.perf_counter(), time.process_time()
                cases[name]()
                if round_ >= args.warmup:
                    times[name].append(time.perf_counter() - start)
                    cpu_times[name].append(time.process_time() - cpu_start)

    def paired(case: str, table=times) -> float:
        """Median over rounds of throughput(case) / throughput(plain) = t(plain) / t(case), same round."""
        return round(statistics.median(p / c for p, c in zip(table["plain"], table[case])), 4)

    result = {
        "eval_over_plain_throughput": paired("eval"),
        "runner_over_plain_throughput": paired("eval_base"),
        "guarded_generate_over_plain_throughput": paired("guarded_generate"),
        "items_per_second": {name: round(args.items / statistics.median(t), 3) for name, t in times.items()},
        "cpu_time_ratios": {
            "eval_over_plain_throughput": paired("eval", cpu_times),
            "runner_over_plain_throughput": paired("eval_base", cpu_times),
            "guarded_generate_over_plain_throughput": paired("guarded_generate", cpu_times),
        },
        "config": {
            "items": args.items, "batch_size": args.batch_size, "new_tokens": args.new_tokens,
            "image_tokens": guarded.config.num_image_features, "prefix_tokens": args.prefix_tokens,
            "vision": f"CLIP ViT {args.vision_layers} layers x {args.vision_hidden}, {args.image_size}px / {args.patch_size}px patches",
            "llm": f"Llama {args.text_layers} layers x {args.text_hidden}",
            "repeats": args.repeats, "warmup": args.warmup, "threads": args.threads, "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(),
        },
    }
    result["targets_met"] = {key: (result[key] >= bound if op == ">=" else result[key] <= bound)
                             for key, (op, bound) in TARGETS.items()}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for key, (op, bound) in TARGETS.items():
            print(f"{key:40s} {result[key]:.3f}  (target {op} {bound}: {'met' if result['targets_met'][key] else 'MISSED'})")
        print("other ratios:", {k: result[k] for k in ("runner_over_plain_throughput", "guarded_generate_over_plain_throughput")})
        print("items/s:", result["items_per_second"])
        print("config:", json.dumps(result["config"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
