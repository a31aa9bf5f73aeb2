"""`safevlm tiny build`: save the embedded tiny LLaVA (or a tiny base of another family) as a
Hugging Face folder."""

from __future__ import annotations


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "tiny", help="The embedded tiny LLaVA (built offline).",
        description="Build the embedded default model: a tiny LLaVA with a locally trained tokenizer.",
    )
    sub = parser.add_subparsers(dest="tiny_command", metavar="<action>")
    build = sub.add_parser("build", help="Build and save the tiny model + processor.",
                           description="Build the tiny LLaVA and save it as a Hugging Face folder.")
    build.add_argument("--out", required=True, help="Output folder.")
    build.add_argument("--seed", type=int, default=0, help="Seed of the random weights.")
    build.add_argument("--preset", default="default", choices=["default", "test"], help="Model size preset.")
    build.add_argument("--family", default="llava",
                       choices=["llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "gemma3"],
                       help="Model family: llava (LLaVA-1.5), llava_next (LLaVA-NeXT / 1.6), llava_onevision, "
                       "qwen2_vl (Qwen2-VL), qwen2_5_vl (Qwen2.5-VL) or gemma3 (Gemma 3); each with its own "
                       "processor and chat format.")
    build.add_argument("--overwrite", action="store_true", help="Replace OUT if it exists and is not empty.")
    build.set_defaults(func=command_build)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)


def command_build(args) -> int:
    import shutil

    from safevlm.paths import check_output_dir
    from safevlm.tiny import preset_name, save_tiny
    from safevlm.train.checkpoint import replace_dir

    target = check_output_dir(args.out, overwrite=args.overwrite).resolve()
    # written beside OUT and renamed when complete: an old OUT is replaced whole, never mixed
    staging = target.with_name(f".staging-{target.name}")
    if staging.exists():  # left by an interrupted build
        shutil.rmtree(staging)
    preset = preset_name(args.family, args.preset)
    save_tiny(staging, preset=preset, seed=args.seed)
    replace_dir(staging, target)
    label = "LLaVA" if args.family == "llava" else args.family
    print(f"saved tiny {label} ({args.preset}, seed {args.seed}) to {args.out}")
    return 0
