"""`safevlm merge`: fold a stage-2 LoRA adapter into its base for deployment."""

from __future__ import annotations

import json


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "merge",
        help="Merge a stage-2 LoRA adapter into its base model folder (for deployment without peft).",
        description="Write OUT as a Hugging Face model folder with the LoRA merged into the language model, "
        "plus OUT/safety_adapter (safety modules only). Load with SafeVLM.from_pretrained(OUT, OUT/safety_adapter). "
        "With --lora-only, OUT is the LoRA alone for vLLM's --lora-modules (the guard proxy's engine).",
    )
    parser.add_argument("--base", required=True, help="The base model folder the adapter was trained on (or tiny:<preset>).")
    parser.add_argument("--adapter", required=True, help="A stage-2 adapter folder (with lora/).")
    parser.add_argument("--out", required=True, help="Output folder.")
    parser.add_argument("--dtype", choices=["stored", "float32", "bfloat16", "float16"], default="stored",
                        help="dtype to load, merge and save the model in (stored: as the base stores its weights).")
    parser.add_argument("--allow-base-mismatch", action="store_true",
                        help="Merge an adapter trained on a base with other weights (its fingerprint differs), "
                        "with a warning; by default that is an error.")
    parser.add_argument("--lora-only", action="store_true",
                        help="Write only the stage-2 LoRA, as a peft folder with vLLM's module names, for an engine that "
                        "serves it on the unmodified base (vllm serve BASE --enable-lora --lora-modules NAME=OUT); "
                        "--dtype does not apply (the tensors are copied as stored). See docs/serve.md.")
    parser.add_argument("--overwrite", action="store_true",
                        help="Replace OUT if it exists (never when OUT is, lies inside or holds --base / --adapter).")
    parser.set_defaults(func=command)


def command(args) -> int:
    from safevlm.train.merge import SAFETY_ADAPTER_DIR, export_lora, merge_lora

    if args.lora_only:
        out = export_lora(args.base, args.adapter, args.out, overwrite=args.overwrite,
                          allow_base_mismatch=args.allow_base_mismatch)
        rank = json.loads((out / "adapter_config.json").read_text())["r"]
        print(f"exported {args.adapter}/lora for vLLM: {out}")
        print(f"serve it: vllm serve {args.base} --enable-lora --max-lora-rank {rank} --lora-modules safevlm-lora={out}")
        return 0

    # usage errors (an existing --out without --overwrite, --out inside --base) exit with status 2
    out = merge_lora(args.base, args.adapter, args.out, dtype=args.dtype, overwrite=args.overwrite,
                     allow_base_mismatch=args.allow_base_mismatch)
    print(f"merged {args.adapter}/lora into {args.base}: {out} (safety modules in {out / SAFETY_ADAPTER_DIR})")
    return 0
