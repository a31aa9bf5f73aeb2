"""`safevlm demo`: the main job on the embedded default."""

from __future__ import annotations

import json


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="Run the method end to end on the embedded tiny model.",
        description="Build the embedded tiny LLaVA, add safety modules and run guard + generation.",
    )
    parser.add_argument("--out", default="demo_out", help="Output folder for the report.")
    parser.add_argument("--seed", type=int, default=0, help="Random seed.")
    parser.set_defaults(func=command)


def command(args) -> int:
    from safevlm.demo import run_demo

    result = run_demo(args.out, seed=args.seed)
    print(json.dumps(result, indent=2))
    print(f"report written to {args.out}/report.json")
    return 0
