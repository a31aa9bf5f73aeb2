"""`safevlm classify`: guard mode — the safety head and the policy on images, no generation."""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from pathlib import Path


def add_model_arguments(parser) -> None:
    """--model / --adapter / --device / --dtype / --policy / --allow-type, shared with `chat`."""
    parser.add_argument("--model", required=True, help="Base model folder (a Hugging Face LLaVA folder with its processor).")
    parser.add_argument("--adapter", default=None, help="Safety adapter folder (without one the safety modules are untrained).")
    parser.add_argument("--policy", default="default",
                        help="Policy: a shipped name (default, strict, hint_only) or a YAML file.")
    parser.add_argument("--allow-type", dest="allow_types", action="append", default=[], metavar="TYPE",
                        help="Switch a risk type off for this run (only types the policy lists as relaxable); repeatable.")
    parser.add_argument("--device", default=None, type=device_argument,
                        help="cpu, cuda, cuda:1, mps (default: cuda if available).")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="Weights dtype (auto: float32 on CPU, bfloat16 on GPUs that support it, else float16).")
    parser.add_argument("--allow-base-mismatch", action="store_true",
                        help="Load an adapter trained on a base with other weights (its fingerprint differs), "
                        "with a warning; by default that is an error.")


def device_argument(text: str) -> str:
    """``--device``, checked when the flags are parsed (before any image or model is loaded)."""
    from safevlm.devices import resolve_device

    try:
        return resolve_device(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def load_image(path: "str | os.PathLike"):
    """An RGB PIL image from a file, through the one image path (``safevlm.data.images``):
    the same pixels as training and the server, the same pixel limit as the data loaders.
    Raises ``ImageError`` (a ValueError) naming the file and the reason."""
    from safevlm.data.images import decode_image

    return decode_image(path)


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
                        help="Image file, folder (its image files, sorted) or quoted glob ('shots/*.jpg'); repeatable.")
    parser.add_argument("--prompt", default=None, help="The prompt sent with the image (default: the image alone).")
    parser.add_argument("--json", action="store_true", help="Print one JSON object per image.")
    parser.add_argument("--out", default=None, metavar="FILE.jsonl",
                        help="Write one JSON object per image to FILE (as --json prints) and print a summary; "
                        "the file appears only when every image is done.")
    parser.add_argument("--overwrite", action="store_true", help="Replace --out if it exists.")
    parser.add_argument("--batch-size", type=int, default=8, help="Images per model call (default 8).")
    parser.set_defaults(func=command)


def _check_out_file(out: str | None, overwrite: bool) -> Path | None:
    from safevlm.errors import UsageError

    if out is None:
        return None
    path = Path(out)
    if path.is_dir():
        raise UsageError(f"--out {out!r} is a folder; give a file name (e.g. results.jsonl)")
    if path.exists() and not overwrite:
        raise UsageError(f"--out {out!r} exists; choose another --out or pass --overwrite")
    if not path.parent.is_dir():
        raise UsageError(f"--out {out!r}: the folder {str(path.parent)!r} does not exist")
    return path


def command(args) -> int:
    from safevlm.data.images import expand_image_paths
    from safevlm.errors import UsageError
    from safevlm.guarded import classify
    from safevlm.loading import load_model_and_processor
    from safevlm.policy import load_policy

    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    policy = load_policy(args.policy)
    overrides = overrides_from_args(args)
    policy.check_overrides(overrides)
    out_file = _check_out_file(args.out, args.overwrite)
    paths = expand_image_paths(args.image)
    batches = [paths[i:i + args.batch_size] for i in range(0, len(paths), args.batch_size)]
    first = [load_image(p) for p in batches[0]]  # a bad image fails before the model loads
    model, processor = load_model_and_processor(args.model, args.adapter, device=args.device, dtype=args.dtype,
                                                allow_base_mismatch=args.allow_base_mismatch)
    level_names = model.config.level_names
    rows = []
    for k, batch in enumerate(batches):
        images = first if k == 0 else [load_image(p) for p in batch]
        prompts = None if args.prompt is None else [args.prompt] * len(images)
        decisions = classify(model, processor, images, prompts, policy, overrides)
        for path, decision in zip(batch, decisions):
            row = {"image": str(path), "prompt": args.prompt, "policy": policy.name, **decision.to_dict()}
            if out_file is not None:
                rows.append(row)
            elif args.json:
                print(json.dumps(row), flush=True)
            else:
                _print_text(row, level_names)
    if out_file is not None:
        _write_jsonl(rows, out_file)
        counts = Counter(row["action"] for row in rows)
        actions = ", ".join(f"{action} {counts.get(action, 0)}" for action in ("allow", "hint", "refuse"))
        print(f"classified {len(rows)} image(s) with policy {policy.name}: {actions}; results in {out_file}")
    return 0


def _print_text(d: dict, level_names) -> None:
    level = level_names[d["risk_level"]] if d["risk_level"] >= 0 else "unknown"
    why = f" (rule: {d['decided_by']}, p={d['score']})" if d["decided_by"] else ""
    print(f"{d['image']}: {d['action']}{why} - risk level {d['risk_level']} ({level}), type {d['risk_type']}")
    if d["error"]:
        print(f"  head error: {d['error']}")
    top = sorted(d["type_probs"].items(), key=lambda kv: -(kv[1] or 0))[:3]
    print("  types: " + ", ".join(f"{k} {v:.3f}" for k, v in top if v is not None))
    print("  levels: " + ", ".join(f"{n} {p:.3f}" for n, p in zip(level_names, d["level_probs"]) if p is not None),
          flush=True)


def _write_jsonl(rows: list[dict], path: Path) -> None:
    """Write ``rows`` as JSON lines to ``path`` atomically (a temporary file, then renamed)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
