"""`safevlm params`: parameter accounting of a base + safety modules, without weights."""

from __future__ import annotations

import json


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "params",
        help="Count base and safety parameters (meta device, no weights needed).",
        description="Build a base architecture on the meta device, wrap it with safety modules "
        "at paper settings (or overrides) and print parameter counts and adapter size.",
    )
    parser.add_argument("--base", default="llava-1.5-7b",
                        help="A known architecture (llava-1.5-7b, llava-1.5-13b, llava-v1.6-mistral-7b, "
                        "llava-onevision-qwen2-7b-ov, qwen2-vl-7b-instruct, qwen2.5-vl-7b-instruct) or a local "
                        "model folder (its config.json is read; no weights are loaded).")
    parser.add_argument("--projector", choices=["mlp", "cabstractor"], default="mlp", help="Safety projector kind.")
    parser.add_argument("--prefix-tokens", type=int, default=64, help="Prefix safety tokens (paper: 64).")
    parser.add_argument("--query-tokens", type=int, default=64, help="Head query tokens (paper: 64).")
    parser.add_argument("--guard-only", action="store_true",
                        help="Also count what a guard-only load holds (vision tower, token embeddings, safety "
                        "modules; no language model) against the full model.")
    parser.add_argument("--json", action="store_true", help="Print JSON.")
    parser.set_defaults(func=command)


def command(args) -> int:
    from pathlib import Path

    from safevlm.accounting import KNOWN_BASES, RELEASES, account, known_base_config

    if args.base in KNOWN_BASES or args.base in RELEASES:
        base_config = known_base_config(args.base)
    elif Path(args.base).is_dir():
        from transformers import AutoConfig

        base_config = AutoConfig.from_pretrained(args.base)
    else:
        from safevlm.errors import UsageError

        known = ", ".join([*KNOWN_BASES, *RELEASES])
        raise UsageError(f"--base {args.base!r} is neither a known architecture ({known}) nor a folder")
    result = account(
        base_config,
        projector_kind=args.projector,
        num_prefix_tokens=args.prefix_tokens,
        num_query_tokens=args.query_tokens,
        guard_only=args.guard_only,
    )
    result = {"base": args.base, **result}
    if args.json:
        result.pop("safety_config")
        print(json.dumps(result, indent=2))
        return 0
    print(f"base {args.base}: {result['base_params']:,} parameters")
    for name, count in result["modules"].items():
        print(f"  {name:<18} {count:>14,}")
    print(f"safety total: {result['safety_params']:,} ({100 * result['ratio']:.3f}% of the base)")
    print(f"adapter size at bf16: {result['adapter_bytes_bf16'] / 2**20:.1f} MiB")
    if args.guard_only:
        print(f"guard-only load: {result['guard_only_params']:,} parameters "
              f"({100 * result['guard_only_share']:.2f}% of the full model's {result['full_params']:,})")
        for name, count in result["guard_only_modules"].items():
            print(f"  {name:<18} {count:>14,}")
        print(f"guard-only size at bf16: {result['guard_only_bytes_bf16'] / 2**30:.2f} GiB "
              f"(full model: {result['full_bytes_bf16'] / 2**30:.2f} GiB)")
    return 0
