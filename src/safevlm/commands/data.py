"""`safevlm data check | render-figstep | synth`: inspect, render and generate safety data.

Thin wrappers over ``safevlm.data``; every action is also a library call.
"""

from __future__ import annotations

import json

FORMAT_CHOICES_HELP = "psavlm, llava, vlguard, rtvlm (or rtvlm:<task>), figstep"


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "data",
        help="Check, render and synthesise safety datasets.",
        description="Load published safety datasets (PSA-VLM, LLaVA, VLGuard, RTVLM, FigStep/SafeBench), "
        "render FigStep images and generate synthetic training data.",
    )
    sub = parser.add_subparsers(dest="data_command", metavar="<action>")

    check = sub.add_parser(
        "check",
        help="Load a dataset and report counts and every skipped record.",
        description="Load a dataset file and print counts (total, loaded, skipped, per type, per level), "
        "every skipped record with its location (file:line or file[index]) and reason, and warnings about "
        "loaded records (labels that contradict themselves). loaded + skipped = total, always.",
    )
    check.add_argument("file", help="The data file (.jsonl, .json or .csv).")
    check.add_argument("--format", default=None, help=f"Format, detected when omitted: {FORMAT_CHOICES_HELP}.")
    check.add_argument(
        "--images",
        default=None,
        help="Image root folder (default: the data file's folder; for FigStep CSVs, images are rendered in memory).",
    )
    check.add_argument(
        "--skip-image-check",
        action="store_true",
        help="Do not open images (paths escaping the image root are still refused).",
    )
    check.add_argument("--font", default=None, metavar="PATH",
                       help="Font to render FigStep images with instead of FreeMonoBold (a warning says the images "
                       "then differ from FigStep's).")
    check.add_argument("--strict", action="store_true", help="Exit with status 1 if any record was skipped.")
    check.add_argument("--json", action="store_true", help="Print the report as JSON.")
    check.set_defaults(func=command_check)

    render = sub.add_parser(
        "render-figstep",
        help="Render FigStep typographic images for a SafeBench-style CSV.",
        description="Write query_{dataset}_{category_id}_{task_id}_6.png per CSV row, exactly as FigStep renders "
        "them (FreeMonoBold 80, wrap width 15, empty '1. 2. 3.' list, 760x760 white). Without FreeMonoBold "
        "(package fonts-freefont-ttf) it stops, unless --font names another font.",
    )
    render.add_argument(
        "--csv", required=True, help="SafeBench-style CSV (columns dataset, category_id, task_id, instruction)."
    )
    render.add_argument("--out", required=True, help="Output folder for the PNG files.")
    render.add_argument("--limit", type=int, default=None, help="Render only the first N rows (N >= 0).")
    render.add_argument("--font", default=None, metavar="PATH",
                        help="Font file to render with (default: FreeMonoBold found on the system; another font "
                        "gives images that differ from FigStep's, and the output says so).")
    render.set_defaults(func=command_render_figstep)

    synth = sub.add_parser(
        "synth",
        help="Generate synthetic safety training data (images + PSA-VLM jsonl splits).",
        description="Write OUT/images/*.png and OUT/{train,val,test}.jsonl: typographic risky and benign "
        "requests in every risk type, benign scenes and photos, with refusals, cautious and helpful answers.",
    )
    synth.add_argument("--out", required=True, help="Output folder.")
    synth.add_argument("--n", type=int, default=2000, help="Number of samples (default 2000).")
    synth.add_argument("--seed", type=int, default=0, help="Random seed (default 0).")
    synth.add_argument(
        "--clean-ratio",
        type=float,
        default=None,
        help="Clean samples per risky sample (default 3/11, PSA-VLM's stage-1 balance).",
    )
    synth.add_argument("--image-size", type=int, default=224, help="Image side in pixels (default 224).")
    synth.add_argument("--multi-turn-ratio", type=float, default=None,
                       help="Share of train/val samples asked as the second user turn of a conversation (default 0.2).")
    synth.set_defaults(func=command_synth)

    parser.set_defaults(func=lambda args: parser.print_help() or 2)


def command_check(args) -> int:
    from safevlm.data import load_records

    report = load_records(args.file, format=args.format, image_root=args.images, check_images=not args.skip_image_check,
                          figstep_font=args.font)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
    else:
        print(report.format_text())
    return 1 if args.strict and report.skipped else 0


def command_render_figstep(args) -> int:
    from safevlm.data.figstep import describe_font, load_figstep_font, render_figstep_csv

    written = render_figstep_csv(args.csv, args.out, limit=args.limit, font_path=args.font)
    font = describe_font(load_figstep_font(font_path=args.font))
    print(f"wrote {len(written)} FigStep image(s) to {args.out} with font {font}")
    return 0


def command_synth(args) -> int:
    from safevlm.data.synth import DEFAULT_CLEAN_RATIO, make_synthetic_dataset

    clean_ratio = DEFAULT_CLEAN_RATIO if args.clean_ratio is None else args.clean_ratio
    extra = {} if args.multi_turn_ratio is None else {"multi_turn_ratio": args.multi_turn_ratio}
    counts = make_synthetic_dataset(args.out, args.n, args.seed, clean_ratio=clean_ratio, image_size=args.image_size,
                                    **extra)
    print(json.dumps(counts, indent=2))
    return 0
