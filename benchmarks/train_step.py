"""What two exact shortcuts save per training step: the LM head only at supervised tokens, and
the vision tower stopped after the layer that is read.

    python benchmarks/train_step.py --json

Both shortcuts give the same numbers as the plain computation (the tests check equality of
losses, hidden states and gradients); this measures their time, as ratios in one run:

* ``supervised_over_full``: one language-model training step (forward + backward, the
  decoder and LM head of a LLaVA base on a batch whose answers are a few tokens of a long
  prompt) with ``Backbone.language_loss`` (logits at the supervised tokens only, what
  safevlm's trainer and the demo use) over the same step with ``causal_lm_loss`` on the full
  logits (every prompt, image and padding token through the LM head);
* ``early_over_whole``: one vision-tower pass (no gradient, as the feature cache and guarded
  inference run it) through ``tower_hidden_states``, which stops after ``vision_feature_layer``
  (LLaVA: -2, so the last layer never runs) over the whole tower.

Each round times both variants of each case in a shuffled order; the ratio is the median over
rounds of the paired ratios. Models (random weights: time does not depend on them):

* ``llava-1.5-shape``: LLaVA-1.5's token counts and depth (576 image features from a 24-layer
  CLIP tower, an 8-layer decoder) at 1/8 of its widths, with LLaVA-1.5's 32,000-token
  vocabulary, as ``benchmarks/cache_speedup.py`` (the LM head's share of the compute is larger
  at 1/8 width than at full width: there it is about 2 % of LLaVA-1.5-7B's decoder, 16 % of
  Gemma 3 4B's with its 262,144-token vocabulary);
* ``tiny-default``: the embedded tiny LLaVA the demo trains (4-layer tower, 49 features,
  a 1,933-token vocabulary).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time


def build(name: str, seed: int):
    """(base, tokens per prompt, image size) for a model name."""
    import torch

    if name == "tiny-default":
        from safevlm.tiny import build_tiny

        base, processor = build_tiny("default", seed=seed)
        return base, 49 + 64, processor.image_processor.crop_size["height"]
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=24, num_attention_heads=2,
                              image_size=336, patch_size=14, projection_dim=128)
    text = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                       num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=2048,
                       tie_word_embeddings=False)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=31999, projector_hidden_act="gelu",
                         vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=576)
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config).eval(), 576 + 64, 336


def measure(name: str, args) -> dict:
    import torch

    from safevlm.backbones import causal_lm_loss, get_backbone
    from safevlm.backbones.base import tower_hidden_states

    base, length, image_size = build(name, args.seed)
    backbone = get_backbone(base)
    vocab = base.config.text_config.vocab_size
    hidden = base.config.text_config.hidden_size
    g = torch.Generator().manual_seed(args.seed)
    embeds = torch.randn(args.batch_size, length, hidden, generator=g) * 0.02
    mask = torch.ones(args.batch_size, length, dtype=torch.long)
    labels = torch.full((args.batch_size, length), -100)
    labels[:, -args.answer_tokens:] = torch.randint(0, vocab, (args.batch_size, args.answer_tokens), generator=g)
    pixels = torch.randn(args.batch_size, 3, image_size, image_size, generator=g)
    layer = base.config.vision_feature_layer
    params = [p for p in backbone.language_model.parameters()] + list(backbone.lm_head.parameters())

    def lm_step(supervised: bool):
        if supervised:
            loss = backbone.language_loss(embeds, mask, None, labels)
        else:
            loss = causal_lm_loss(backbone.language_forward(embeds, mask), labels)
        loss.backward()
        for p in params:
            p.grad = None

    def vision_pass(early: bool):
        with torch.no_grad():
            if early:
                tower_hidden_states(backbone.vision_tower, pixels, [layer])
            else:
                backbone.vision_tower(pixels, output_hidden_states=True)

    cases = {("lm", True): lambda: lm_step(True), ("lm", False): lambda: lm_step(False),
             ("vision", True): lambda: vision_pass(True), ("vision", False): lambda: vision_pass(False)}
    times: dict = {key: [] for key in cases}
    rng = random.Random(args.seed)
    for r in range(args.warmup + args.rounds):
        order = list(cases)
        rng.shuffle(order)
        for key in order:
            start = time.perf_counter()
            cases[key]()
            if r >= args.warmup:
                times[key].append(time.perf_counter() - start)

    def ratio(kind):
        return round(statistics.median(a / b for a, b in zip(times[(kind, True)], times[(kind, False)])), 3)

    return {
        "supervised_over_full": ratio("lm"),
        "early_over_whole": ratio("vision"),
        "lm_step_seconds_full": round(statistics.median(times[("lm", False)]), 4),
        "vision_pass_seconds_whole": round(statistics.median(times[("vision", False)]), 4),
        "tokens": length, "supervised_tokens": args.answer_tokens, "vocab": vocab,
        "vision_layers": base.config.vision_config.num_hidden_layers, "vision_feature_layer": layer,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="Print only the JSON result.")
    parser.add_argument("--models", default="llava-1.5-shape,tiny-default",
                        help="Comma-separated: llava-1.5-shape, tiny-default.")
    parser.add_argument("--rounds", type=int, default=5, help="Timed rounds.")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed rounds first.")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--answer-tokens", type=int, default=16, help="Supervised tokens per sample (the answer).")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadiest timings on a shared machine).")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import torch
    import transformers

    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in ("llava-1.5-shape", "tiny-default")]
    if unknown or not names:
        parser.error(f"unknown model(s) {unknown}; choose from llava-1.5-shape, tiny-default")
    results = {name: measure(name, args) for name in names}
    out = {
        "models": results,
        "rounds": args.rounds,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": platform.machine(),
    }
    print(json.dumps(out, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
