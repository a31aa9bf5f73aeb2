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
                        help="A known architecture (llava-1.5-7b, llava-1.5-13b) or a local model folder "
                        "(its config.json is read; no weights are loaded).")
    parser.add_argument("--projector", choices=["mlp", "cabstractor"], default="mlp", help="Safety projector kind.")
    parser.add_argument("--prefix-tokens", type=int, default=64, help="Prefix safety tokens (paper: 64).")
    parser.add_argument("--query-tokens", type=int, default=64, help="Head query tokens (paper: 64).")
    parser.add_argument("--json", action="store_true", help="Print JSON.")
    parser.set_defaults(func=command)


def command(args) -> int:
    from pathlib import Path

    from safevlm.accounting import KNOWN_BASES, account, llava_config

    if args.base in KNOWN_BASES:
        base_config = llava_config(args.base)
    elif Path(args.base).is_dir():
        from transformers import AutoConfig

        base_config = AutoConfig.from_pretrained(args.base)
    else:
        from safevlm.errors import UsageError

        known = ", ".join(KNOWN_BASES)
        raise UsageError(f"--base {args.base!r} is neither a known architecture ({known}) nor a folder")
    result = account(
        base_config,
        projector_kind=args.projector,
        num_prefix_tokens=args.prefix_tokens,
        num_query_tokens=args.query_tokens,
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
    return 0
