"""Stage-1 epoch time with a warm vision-feature cache vs without it (w_lm = 0).

    python benchmarks/cache_speedup.py --json

Both cases run the real stage-1 path, ``safevlm.train.run_stage`` on the Hugging Face
Trainer, on the same synthetic records with the same safety modules and loss weights
(``w_cls = 1``, ``w_lm = 0``: the LLM never runs):

* **cold** (``cache.enabled: false``): every step decodes the images, runs the image
  processor and the frozen vision tower, then the safety projector and head;
* **warm** (``cache.enabled: true``, cache filled before the first round): every step reads
  the selected-layer vision features from the safetensors shards; no image is decoded and the
  vision tower never runs.

An epoch is timed from the Trainer's ``on_epoch_begin`` to ``on_epoch_end`` (data loading,
forward, backward, optimizer). Each round runs one cold and one warm epoch in a shuffled
order, after warm-up rounds; ``warm_over_cold`` is the median over rounds of warm / cold
(paired, so a machine whose load drifts still compares like with like). Target <= 0.25.

Models (weights random: time does not depend on them):

* ``llava-1.5-shape`` (the target): LLaVA-1.5 scaled down in width so that it runs on a CPU,
  with LLaVA-1.5's token counts and depth where the cache matters: 336-px images in 14-px
  patches (576 image features) through a 24-layer vision tower; widths are LLaVA-1.5-7B's
  divided by 8 (vision 1024 -> 128, text 4096 -> 512, safety head 1024 -> 128), 64 head
  queries, 64 prefix tokens, as in ``benchmarks/guard_overhead.py``;
* ``tiny-default`` (for information): the embedded tiny LLaVA with the safety modules of
  ``configs/tiny_stage1.yaml``. Its 4-layer, 128-wide vision tower on 49 patches costs about
  as much as the safety head itself, so a cache can save less there than on a real VLM.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

TARGET = 0.25
REPO = Path(__file__).resolve().parents[1]


def build_llava_shape(args):
    """(base, processor, safety overrides) of LLaVA-1.5-7B scaled down in width."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from safevlm.tiny import IMAGE_TOKEN, TinyPreset, build_processor, build_tokenizer

    tokenizer = build_tokenizer(2048)
    preset = TinyPreset(
        image_size=336, patch_size=14, vision_hidden=128, vision_layers=24, vision_heads=2,
        text_hidden=512, text_layers=8, text_heads=8, text_intermediate=1376, vocab_size=2048,
        max_position_embeddings=2048,
    )
    processor = build_processor(preset, tokenizer)
    vision = CLIPVisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=24, num_attention_heads=2,
                              image_size=336, patch_size=14, projection_dim=128)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                       num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=2048,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                         projector_hidden_act="gelu", vision_feature_layer=-2, vision_feature_select_strategy="default",
                         image_seq_length=576)
    torch.manual_seed(args.seed)
    base = LlavaForConditionalGeneration(config).eval()
    safety = {"head_hidden_size": 128, "num_query_tokens": 64, "head_num_heads": 8, "head_num_layers": 2,
              "num_prefix_tokens": 64}
    return base, processor, safety, 336


def build_tiny_default(args):
    from safevlm.tiny import build_tiny
    from safevlm.train import TrainConfig

    base, processor = build_tiny("default", seed=args.seed)
    recipe = TrainConfig.from_yaml(REPO / "configs" / "tiny_stage1.yaml")
    return base, processor, dict(recipe.model.safety), recipe.data.synthetic.image_size


def measure(name: str, build, args, workdir: Path) -> dict:
    import torch
    from transformers import TrainerCallback

    from safevlm.data import load_records
    from safevlm.data.synth import make_synthetic_dataset
    from safevlm.model import SafeVLM
    from safevlm.train import TrainConfig, run_stage

    base, processor, safety, image_size = build(args)
    torch.manual_seed(args.seed)
    model = SafeVLM(base, **safety)
    data_dir = workdir / f"{name}-data"
    make_synthetic_dataset(data_dir, n=max(3, round(args.samples / 0.8)) + 1, seed=args.seed, image_size=image_size)
    records = load_records(data_dir / "train.jsonl", check_images=False).records[: args.samples]

    class EpochTimer(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_epoch_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_epoch_end(self, *a, **k):
            self.times.append(time.perf_counter() - self.start)

    def run(cached: bool, tag: str) -> float:
        timer = EpochTimer()
        config = TrainConfig.from_dict({
            "stage": 1, "output_dir": str(workdir / f"{name}-{tag}"), "seed": args.seed,
            "loss": {"cls_weight": 1.0, "lm_weight": 0.0},
            "data": {"image_root": str(data_dir), "balance_types": False},
            "cache": {"enabled": cached, "dir": str(workdir / f"{name}-cache"), "batch_size": args.batch_size},
            "optim": {"lr": 1e-4, "epochs": 1, "batch_size": args.batch_size},
            "log": {"logging_steps": 10_000, "eval_steps": 0, "save_steps": 0, "progress_bar": False, "plot": False},
        })
        # quiet: no bars or log lines (stdout is for the JSON)
        run_stage(config, model=model, processor=processor, train_records=records, callbacks=[timer], quiet=True)
        return timer.times[0]

    t0 = time.perf_counter()
    run(True, "fill")  # fills the cache (its epoch is warm already)
    fill_s = time.perf_counter() - t0
    rng = random.Random(args.seed)
    warm, cold, ratios = [], [], []
    for round_index in range(args.warmup + args.rounds):
        order = [True, False]
        rng.shuffle(order)
        times = {cached: run(cached, f"r{round_index}-{'warm' if cached else 'cold'}") for cached in order}
        if round_index >= args.warmup:
            warm.append(times[True])
            cold.append(times[False])
            ratios.append(times[True] / times[False])
    return {
        "warm_over_cold": round(statistics.median(ratios), 4),
        "warm_epoch_s": round(statistics.median(warm), 4),
        "cold_epoch_s": round(statistics.median(cold), 4),
        "ratio_min": round(min(ratios), 4),
        "ratio_max": round(max(ratios), 4),
        "samples_per_epoch": len(records),
        "image_features": model.config.num_image_features,
        "safety_params": sum(p.numel() for p in model.safety_parameters()),
        "first_run_with_cache_fill_s": round(fill_s, 2),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="Print only the JSON result.")
    parser.add_argument("--models", default="llava-1.5-shape,tiny-default",
                        help="Comma-separated: llava-1.5-shape (the target), tiny-default.")
    parser.add_argument("--rounds", type=int, default=5, help="Timed rounds (one warm + one cold epoch each).")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed rounds first.")
    parser.add_argument("--samples", type=int, default=48, help="Training samples per epoch.")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadiest timings on a shared machine).")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import logging

    import torch
    import transformers

    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    logging.getLogger("safevlm").setLevel(logging.ERROR)
    builders = {"llava-1.5-shape": build_llava_shape, "tiny-default": build_tiny_default}
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in builders]
    if unknown or not names:
        parser.error(f"unknown model(s) {unknown}; choose from {', '.join(builders)}")
    results = {}
    with tempfile.TemporaryDirectory(prefix="safevlm-cache-bench-") as tmp:
        for name in names:
            results[name] = measure(name, builders[name], args, Path(tmp))
    headline = results.get("llava-1.5-shape") or results[names[0]]
    out = {
        "warm_over_cold": headline["warm_over_cold"],
        "target": f"<= {TARGET}",
        "meets_target": headline["warm_over_cold"] <= TARGET,
        "models": results,
        "rounds": args.rounds,
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": platform.machine(),
    }
    print(json.dumps(out, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
