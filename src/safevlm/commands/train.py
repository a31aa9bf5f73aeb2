"""`safevlm train`: run one training stage from a YAML recipe."""

from __future__ import annotations

import json


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="Train the safety modules (stage 1) or LoRA + safety modules (stage 2) from a YAML recipe.",
        description="Run one training stage on the Hugging Face Trainer. Multi-GPU: "
        "accelerate launch -m safevlm.cli train --config FILE.yaml (DDP / FSDP / DeepSpeed from accelerate).",
    )
    parser.add_argument("--config", help="The YAML recipe (configs/stage1.yaml, configs/tiny_stage1.yaml, ...).")
    parser.add_argument("--resume", action="store_true",
                        help="Continue from the newest complete checkpoint in output_dir (fresh start if none).")
    parser.add_argument("--list-keys", action="store_true", help="List every recipe key with its help and exit.")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="Override recipe keys, e.g. optim.lr=1e-4 data.train=my.jsonl (values are YAML).")
    parser.set_defaults(func=command)


def command(args) -> int:
    from safevlm.train.config import TrainConfig, describe

    if args.list_keys:
        print("\n".join(describe()))
        return 0
    if not args.config:
        from safevlm.errors import UsageError

        raise UsageError("--config FILE.yaml is required")
    config = TrainConfig.from_yaml(args.config, args.overrides)

    import logging

    from safevlm.train.stage import run_stage

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    result = run_stage(config, resume=args.resume)
    from accelerate import PartialState

    if PartialState().is_main_process:
        summary = {
            "stage": result.stage,
            "adapter": str(result.adapter_dir),
            "global_step": result.global_step,
            "resumed_from": str(result.resumed_from) if result.resumed_from else None,
            "metrics": result.metrics,
            "train_loss": result.train_metrics.get("train_loss"),
            "cache": result.cache,
        }
        print(json.dumps(summary, indent=2))
    return 0
