"""Overhead of the safety guard: guarded generation vs plain generation, and guard vs vision tower.

    python benchmarks/guard_overhead.py --json

The model is LLaVA-1.5 scaled down in width so it runs on a CPU, with LLaVA-1.5's token
counts: 336-px images in 14-px patches (576 image tokens), 64 prefix safety tokens, a ~40-token
prompt and 32 new tokens. Widths are LLaVA-1.5-7B's divided by 8 (vision 1024 -> 128, text
4096 -> 512, safety head and projector 1024 -> 128); the vision tower keeps its 24 layers, the
language model has 8 instead of 32 (that makes the LLM relatively *cheaper* than in the real
model, so the measured overheads are upper bounds of the real ones). Weights are random:
latency does not depend on them.

Measured in one run under ``torch.inference_mode`` after warm-up rounds: each round times every
case once, in a shuffled order; a ratio is the median over rounds of the two cases' latencies in
the same round (paired, so a machine whose load drifts still compares like with like):

* ``guarded_over_plain``: :func:`safevlm.guarded.generate_guarded` (one vision pass, safety
  head, policy, 64 prefix tokens, generation) over the base LLaVA's ``generate`` on the same
  image and prompt, both from a PIL image and a string (chat template, image processor,
  tokenizer, decode included) and both forced to 32 new tokens. Target <= 1.10.
* ``guarded_over_plain_no_prefix``: the same with 0 prefix tokens (only the head is added).
  Target <= 1.03.
* ``guard_over_vision_throughput``: images/s of ``SafeVLM.guard`` (vision tower + safety
  projector + head) over images/s of the vision tower alone, on a batch. Target >= 0.85.

``cpu_time_ratios`` gives the same three ratios in process CPU time, a cross-check that is
steadier than wall time when other jobs share the machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time

TARGETS = {"guarded_over_plain": ("<=", 1.10), "guarded_over_plain_no_prefix": ("<=", 1.03),
           "guard_over_vision_throughput": (">=", 0.85)}
PROMPT = ("Look at this photo and describe every object you can see, the colours, the background, "
          "the weather and what the people in it are doing right now.")


def build(args):
    """(base LLaVA, processor, SafeVLM with 64 prefix tokens, SafeVLM with none) sharing one base."""
    import torch
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    from safevlm.model import SafeVLM
    from safevlm.tiny import IMAGE_TOKEN, TinyPreset, build_processor, build_tokenizer

    tokenizer = build_tokenizer(2048)
    preset = TinyPreset(
        image_size=args.image_size, patch_size=args.patch_size, vision_hidden=args.vision_hidden,
        vision_layers=args.vision_layers, vision_heads=args.vision_hidden // 64 or 1,
        text_hidden=args.text_hidden, text_layers=args.text_layers, text_heads=args.text_hidden // 64 or 1,
        text_intermediate=int(args.text_hidden * 2.6875), vocab_size=2048, max_position_embeddings=2048,
    )
    processor = build_processor(preset, tokenizer)
    vision = CLIPVisionConfig(hidden_size=args.vision_hidden, intermediate_size=4 * args.vision_hidden,
                              num_hidden_layers=args.vision_layers, num_attention_heads=preset.vision_heads,
                              image_size=args.image_size, patch_size=args.patch_size, projection_dim=args.vision_hidden)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=args.text_hidden, intermediate_size=preset.text_intermediate,
                       num_hidden_layers=args.text_layers, num_attention_heads=preset.text_heads,
                       num_key_value_heads=preset.text_heads, max_position_embeddings=2048,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), projector_hidden_act="gelu",
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         image_seq_length=(args.image_size // args.patch_size) ** 2)
    torch.manual_seed(args.seed)
    base = LlavaForConditionalGeneration(config).eval()
    base.generation_config.pad_token_id = tokenizer.pad_token_id
    base.generation_config.eos_token_id = tokenizer.eos_token_id
    safety = dict(head_hidden_size=args.head_hidden, num_query_tokens=64, head_num_heads=8, head_num_layers=2)
    with_prefix = SafeVLM(base, num_prefix_tokens=args.prefix_tokens, **safety).eval()
    without_prefix = SafeVLM(base, num_prefix_tokens=0, **safety).eval()
    return base, processor, with_prefix, without_prefix


def model_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that shape the benchmark model (read by :func:`build`); benchmarks/proxy_overhead.py
    uses the same model."""
    parser.add_argument("--prefix-tokens", type=int, default=64, help="Prefix safety tokens of the guarded model.")
    parser.add_argument("--image-size", type=int, default=336, help="Image side (336 / 14 = 24 -> 576 tokens).")
    parser.add_argument("--patch-size", type=int, default=14, help="Vision patch size.")
    parser.add_argument("--vision-hidden", type=int, default=128, help="Vision width (LLaVA-1.5: 1024).")
    parser.add_argument("--vision-layers", type=int, default=24, help="Vision layers (LLaVA-1.5: 24).")
    parser.add_argument("--text-hidden", type=int, default=512, help="LLM width (LLaVA-1.5-7B: 4096).")
    parser.add_argument("--text-layers", type=int, default=8, help="LLM layers (LLaVA-1.5-7B: 32).")
    parser.add_argument("--head-hidden", type=int, default=128, help="Safety head width (paper setting: 1024).")
    parser.add_argument("--seed", type=int, default=0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="Print only the JSON result.")
    parser.add_argument("--repeats", type=int, default=15, help="Timed rounds (medians are reported).")
    parser.add_argument("--warmup", type=int, default=2, help="Untimed rounds first.")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: steadiest timings on a shared machine).")
    parser.add_argument("--new-tokens", type=int, default=32, help="New tokens per generation (forced).")
    parser.add_argument("--guard-batch", type=int, default=4, help="Images per batch in the throughput comparison.")
    model_arguments(parser)
    args = parser.parse_args(argv)

    import numpy as np
    import torch
    from PIL import Image

    from safevlm.guarded import generate_guarded
    from safevlm.policy import Policy

    torch.set_num_threads(args.threads)
    base, processor, guarded64, guarded0 = build(args)
    policy = Policy.default()
    rng = np.random.default_rng(args.seed)
    image = Image.fromarray((rng.random((args.image_size, args.image_size, 3)) * 255).astype("uint8"))
    gen = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens, "do_sample": False}

    def plain():
        text = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}], add_generation_prompt=True)
        inputs = processor(images=image, text=text, return_tensors="pt")
        out = base.generate(**inputs, **gen)
        return processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    def guarded_with(model):
        def run():
            result = generate_guarded(model, processor, [image], [PROMPT], policy, **gen)[0]
            if result.action != "allow" or result.completion_tokens != args.new_tokens:
                raise RuntimeError(f"expected an allowed {args.new_tokens}-token answer, got {result.action} "
                                   f"with {result.completion_tokens} tokens")
            return result
        return run

    batch_pixels = processor.image_processor([image] * args.guard_batch, return_tensors="pt")["pixel_values"]
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}], add_generation_prompt=True)
    batch_inputs = processor(images=[image] * args.guard_batch, text=[text] * args.guard_batch, return_tensors="pt")

    def vision_only():
        return guarded64.encode_images(batch_pixels)

    def guard_only():
        return guarded64.guard(**batch_inputs)

    cases = {"plain": plain, "guarded": guarded_with(guarded64), "guarded_no_prefix": guarded_with(guarded0),
             "vision": vision_only, "guard": guard_only}
    times = {name: [] for name in cases}
    cpu_times = {name: [] for name in cases}
    order = list(cases)
    shuffle = random.Random(args.seed).shuffle
    with torch.inference_mode():
        for round_ in range(args.warmup + args.repeats):
            shuffle(order)  # every case runs once per round, in a fresh order, so load drift hits all alike
            for name in order:
                start, cpu_start = time.perf_counter(), time.process_time()
                cases[name]()
                if round_ >= args.warmup:
                    times[name].append(time.perf_counter() - start)
                    cpu_times[name].append(time.process_time() - cpu_start)
    med = {name: statistics.median(t) for name, t in times.items()}

    def paired(numerator: str, denominator: str, table=times) -> float:
        """Median over rounds of the ratio of two cases timed in the same round."""
        return round(statistics.median(a / b for a, b in zip(table[numerator], table[denominator])), 4)

    prompt_tokens = len(processor.tokenizer(PROMPT, add_special_tokens=False)["input_ids"])
    result = {
        "guarded_over_plain": paired("guarded", "plain"),
        "guarded_over_plain_no_prefix": paired("guarded_no_prefix", "plain"),
        "guard_over_vision_throughput": paired("vision", "guard"),
        "median_ms": {name: round(1000 * m, 1) for name, m in med.items()},
        # the same ratios in process CPU time: steadier than wall time when other jobs share the CPU
        "cpu_time_ratios": {
            "guarded_over_plain": paired("guarded", "plain", cpu_times),
            "guarded_over_plain_no_prefix": paired("guarded_no_prefix", "plain", cpu_times),
            "guard_over_vision_throughput": paired("vision", "guard", cpu_times),
        },
        "config": {
            "image_tokens": guarded64.config.num_image_features,
            "prefix_tokens": args.prefix_tokens,
            "prompt_tokens": prompt_tokens,
            "new_tokens": args.new_tokens,
            "vision": f"CLIP ViT {args.vision_layers} layers x {args.vision_hidden}, {args.image_size}px / {args.patch_size}px patches",
            "llm": f"Llama {args.text_layers} layers x {args.text_hidden} (MLP {int(args.text_hidden * 2.6875)})",
            "safety": f"mlp projector {args.vision_hidden}->{args.head_hidden}, head {args.head_hidden} wide, "
                      "64 queries, 2 layers, 8 heads",
            "guard_batch": args.guard_batch,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "threads": args.threads,
            "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(),
        },
    }
    print_result(result, TARGETS, args.json, ("config",))
    return 0


def print_result(result: dict, targets: dict, as_json: bool, sections=("config",)) -> None:
    """Add ``targets_met`` to ``result`` and print it: JSON, or one line per target, the median
    latencies and the named ``sections``."""
    result["targets_met"] = {
        key: (result[key] <= bound if op == "<=" else result[key] >= bound) for key, (op, bound) in targets.items()
    }
    if as_json:
        print(json.dumps(result, indent=2))
        return
    for key, (op, bound) in targets.items():
        print(f"{key:32s} {result[key]:.3f}  (target {op} {bound}: {'met' if result['targets_met'][key] else 'MISSED'})")
    print("median ms:", result["median_ms"])
    for section in sections:
        print(f"{section}:", json.dumps(result[section]))


if __name__ == "__main__":
    sys.exit(main())
