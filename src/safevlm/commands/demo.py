"""`safevlm demo`: the main job on the embedded default (the whole method, under 10 minutes on 2 CPU cores)."""

from __future__ import annotations


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="Run the whole method end to end on the embedded tiny model.",
        description="Build the embedded tiny LLaVA, pre-train it, make synthetic safety data, run "
        "stage 1 and stage 2, and report before/after safety metrics with plots and guarded answers.",
    )
    parser.add_argument("--out", default="demo_out", help="Output folder (report.json, report.md, plots, adapters).")
    parser.add_argument("--seed", type=int, default=0, help="Random seed.")
    parser.add_argument("--quiet", action="store_true", help="No progress bars.")
    parser.set_defaults(func=command)


def command(args) -> int:
    from pathlib import Path

    from safevlm.demo import DemoSettings, run_demo

    run_demo(args.out, DemoSettings(seed=args.seed), show_progress=not args.quiet)
    print((Path(args.out) / "report.md").read_text())
    print(f"report: {args.out}/report.json, {args.out}/report.md")
    return 0
