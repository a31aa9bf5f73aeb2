"""`safevlm merge`: fold a stage-2 LoRA adapter into its base for deployment."""

from __future__ import annotations


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "merge",
        help="Merge a stage-2 LoRA adapter into its base model folder (for deployment without peft).",
        description="Write OUT as a Hugging Face model folder with the LoRA merged into the language model, "
        "plus OUT/safety_adapter (safety modules only). Load with SafeVLM.from_pretrained(OUT, OUT/safety_adapter).",
    )
    parser.add_argument("--base", required=True, help="The base model folder the adapter was trained on (or tiny:<preset>).")
    parser.add_argument("--adapter", required=True, help="A stage-2 adapter folder (with lora/).")
    parser.add_argument("--out", required=True, help="Output folder.")
    parser.add_argument("--dtype", choices=["stored", "float32", "bfloat16", "float16"], default="stored",
                        help="dtype to load, merge and save the model in (stored: as the base stores its weights).")
    parser.add_argument("--allow-base-mismatch", action="store_true",
                        help="Merge an adapter trained on a base with other weights (its fingerprint differs), "
                        "with a warning; by default that is an error.")
    parser.add_argument("--overwrite", action="store_true",
                        help="Replace OUT if it exists (never when OUT is, lies inside or holds --base / --adapter).")
    parser.set_defaults(func=command)


def command(args) -> int:
    from safevlm.train.merge import SAFETY_ADAPTER_DIR, merge_lora

    # usage errors (an existing --out without --overwrite, --out inside --base) exit with status 2
    out = merge_lora(args.base, args.adapter, args.out, dtype=args.dtype, overwrite=args.overwrite,
                     allow_base_mismatch=args.allow_base_mismatch)
    print(f"merged {args.adapter}/lora into {args.base}: {out} (safety modules in {out / SAFETY_ADAPTER_DIR})")
    return 0
