"""`safevlm classify`: guard mode — the safety head and the policy on images, no generation."""

from __future__ import annotations

import json


def add_model_arguments(parser) -> None:
    """--model / --adapter / --device / --dtype / --policy / --allow-type, shared with `chat`."""
    parser.add_argument("--model", required=True, help="Base model folder (a Hugging Face LLaVA folder with its processor).")
    parser.add_argument("--adapter", default=None, help="Safety adapter folder (without one the safety modules are untrained).")
    parser.add_argument("--policy", default="default",
                        help="Policy: a shipped name (default, strict, hint_only) or a YAML file.")
    parser.add_argument("--allow-type", dest="allow_types", action="append", default=[], metavar="TYPE",
                        help="Switch a risk type off for this run (only types the policy lists as relaxable); repeatable.")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available).")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="Weights dtype (auto: float32 on CPU, bfloat16 on GPU).")


def load_image(path: str):
    """An RGB PIL image from a file; ValueError for files that are not images."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except UnidentifiedImageError:
        raise ValueError(f"{path} is not an image Pillow can read") from None


def overrides_from_args(args):
    from safevlm.policy import PolicyOverrides

    return PolicyOverrides(allow_types=tuple(args.allow_types)) if args.allow_types else None


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "classify",
        help="Risk level and type of images (+ prompt) from the safety head; the LLM never runs.",
        description="Guard mode: one vision pass, the safety head and the policy's decision for each image. "
        "Prints the action (allow / hint / refuse), the risk level and type, and the probabilities.",
    )
    add_model_arguments(parser)
    parser.add_argument("--image", action="append", required=True, metavar="PATH",
                        help="Image file; repeat for several (classified in one batch).")
    parser.add_argument("--prompt", default=None, help="The prompt sent with the image (default: the image alone).")
    parser.add_argument("--json", action="store_true", help="Print one JSON object per image.")
    parser.set_defaults(func=command)


def command(args) -> int:
    from safevlm.guarded import classify, load_model_and_processor
    from safevlm.policy import load_policy

    policy = load_policy(args.policy)
    overrides = overrides_from_args(args)
    policy.check_overrides(overrides)
    images = [load_image(p) for p in args.image]
    model, processor = load_model_and_processor(args.model, args.adapter, device=args.device, dtype=args.dtype)
    prompts = None if args.prompt is None else [args.prompt] * len(images)
    decisions = classify(model, processor, images, prompts, policy, overrides)
    level_names = model.config.level_names
    for path, decision in zip(args.image, decisions):
        d = decision.to_dict()
        if args.json:
            print(json.dumps({"image": path, "prompt": args.prompt, "policy": policy.name, **d}))
            continue
        level = level_names[d["risk_level"]] if d["risk_level"] >= 0 else "unknown"
        why = f" (rule: {d['decided_by']}, p={d['score']})" if d["decided_by"] else ""
        print(f"{path}: {d['action']}{why} - risk level {d['risk_level']} ({level}), type {d['risk_type']}")
        if d["error"]:
            print(f"  head error: {d['error']}")
        top = sorted(d["type_probs"].items(), key=lambda kv: -(kv[1] or 0))[:3]
        print("  types: " + ", ".join(f"{k} {v:.3f}" for k, v in top if v is not None))
        print("  levels: " + ", ".join(f"{n} {p:.3f}" for n, p in zip(level_names, d["level_probs"]) if p is not None))
    return 0
