"""`safevlm calibrate`: fit the safety head's temperatures on a validation task, write them into the adapter."""

from __future__ import annotations

import json

from safevlm.errors import UsageError


def register(subparsers) -> None:
    from safevlm.commands.classify import device_argument
    from safevlm.loading import DTYPE_HELP, DTYPES

    parser = subparsers.add_parser(
        "calibrate",
        help="Fit the safety head's temperatures on a validation task and write them into the adapter.",
        description="Temperature scaling (one temperature for the risk level, one for the risk type): runs the guard "
        "on the task's labelled items (the LLM never runs), fits the temperatures that minimise the labels' negative "
        "log-likelihood, prints the expected calibration error before and after (and on --eval-task, held out), and "
        "writes the temperatures into ADAPTER/safety_model.safetensors with a calibration.json beside it. The head's "
        "top prediction does not change; its probabilities, which the policy's thresholds read, do.",
    )
    parser.add_argument("--model", required=True, help="Base model folder or tiny:<preset>[@seed].")
    parser.add_argument("--adapter", required=True, help="Safety adapter folder (its temperatures are rewritten).")
    parser.add_argument("--task", required=True, metavar="NAME|FILE.yaml",
                        help="Validation task with risk labels to fit on (e.g. demo_val); not the task you report.")
    parser.add_argument("--data-root", default=None, metavar="DIR", help="Data root of --task.")
    parser.add_argument("--eval-task", default=None, metavar="NAME|FILE.yaml",
                        help="A held-out task to report ECE on before / after (not fitted on).")
    parser.add_argument("--eval-data-root", default=None, metavar="DIR", help="Data root of --eval-task (default: --data-root).")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="Only the first N items of each task.")
    parser.add_argument("--batch-size", type=int, default=16, metavar="N", help="Inputs per guard call (default 16).")
    parser.add_argument("--dry-run", action="store_true", help="Fit and print, but do not write the adapter.")
    parser.add_argument("--device", default=None, type=device_argument, help="cpu, cuda, cuda:1, mps (default: cuda if available).")
    parser.add_argument("--dtype", default="auto", choices=list(DTYPES), help=DTYPE_HELP)
    parser.add_argument("--allow-base-mismatch", action="store_true",
                        help="Load an adapter trained on a base with other weights (a warning instead of an error).")
    parser.add_argument("--json", action="store_true", help="Print the result as one JSON object.")
    parser.set_defaults(func=command)


def command(args) -> int:
    from pathlib import Path

    from safevlm.eval.calibrate import calibrate
    from safevlm.eval.evaluate import check_data
    from safevlm.eval.tasks import load_task
    from safevlm.loading import load_model_and_processor
    from safevlm.model import WEIGHTS_NAME

    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be >= 1, got {args.limit}")
    if not (Path(args.adapter) / WEIGHTS_NAME).is_file():
        raise UsageError(f"--adapter {args.adapter!r} is not a safety adapter folder (no {WEIGHTS_NAME})")
    task = load_task(args.task)
    check_data([task], args.data_root)
    heldout = load_task(args.eval_task) if args.eval_task else None
    heldout_root = args.eval_data_root if args.eval_data_root is not None else args.data_root
    if heldout is not None:
        check_data([heldout], heldout_root)
    model, processor = load_model_and_processor(args.model, args.adapter, device=args.device, dtype=args.dtype,
                                                allow_base_mismatch=args.allow_base_mismatch)
    result = calibrate(model, processor, task, adapter_dir=args.adapter, data_root=args.data_root, limit=args.limit,
                       heldout_task=heldout, heldout_root=heldout_root, batch_size=args.batch_size, write=not args.dry_run)
    if args.json:
        print(json.dumps(result.to_dict(), ensure_ascii=False))
        return 0
    print(f"fitted on {task.name}: {result.fit['n']} labelled items")
    for name in ("level", "type"):
        print(f"  {name:5s} temperature {result.previous[name]:.4g} -> {result.temperatures[name]:.4g}")
    for label, scores in (("fit", result.fit), (f"held out ({result.heldout_task})", result.heldout)):
        if scores is None:
            continue
        for name in ("level", "type"):
            s = scores[name]
            print(f"  ECE {name:5s} on {label}: {s['ece_before']:.4f} -> {s['ece_after']:.4f}"
                  f"  (NLL {s['nll_before']:.4f} -> {s['nll_after']:.4f})")
    for note in result.notes:
        print(f"  note: {note}")
    if result.written:
        print(f"wrote the temperatures into {Path(args.adapter) / WEIGHTS_NAME} (and calibration.json)")
    else:
        print("dry run: the adapter was not changed")
    return 0
