"""`safevlm scan` / `safevlm scan merge`: find risky content in a multimodal dataset with the
safety head (guard mode), resumable and sharded; thin over :mod:`safevlm.scan`."""

from __future__ import annotations

import json
import os


def _shard(text: str) -> tuple[int, int]:
    import argparse

    index, sep, count = text.partition("/")
    if not sep or not index.strip().isdigit() or not count.strip().isdigit():
        raise argparse.ArgumentTypeError(f"--shard must be I/N (e.g. 0/4), got {text!r}")
    index, count = int(index), int(count)
    if count < 1 or index >= count:
        raise argparse.ArgumentTypeError(f"--shard I/N needs 0 <= I < N, got {text!r}")
    return index, count


def _add_curation(parser) -> None:
    parser.add_argument("--write-clean", default=None, metavar="PATH",
                        help="Write the input conversation file (LLaVA or PSA-VLM JSON/JSONL) without the flagged "
                        "records to PATH (kept records byte-identical), and the dropped ones to OUT/removed.jsonl.")
    parser.add_argument("--write-labels", default=None, metavar="PATH",
                        help="Write the scan as PSA-VLM training records (safe_type, safe_level) to PATH, for "
                        "stage 1 after human review.")
    parser.add_argument("--no-report", dest="report", action="store_false", help="Do not write report.html.")
    parser.add_argument("--json", action="store_true", help="Print summary.json instead of the final line.")


def register(subparsers) -> None:
    from safevlm.commands.classify import device_argument
    from safevlm.loading import DTYPE_HELP, DTYPES
    from safevlm.scan.sources import FORMATS_HELP

    parser = subparsers.add_parser(
        "scan",
        help="Find risky content in a multimodal dataset with the safety head; report, clean copy, labels.",
        description="Guard mode over a dataset: one vision pass + safety projector + head per image (the LLM never "
        "runs), in batches, images decoded in DataLoader workers. Writes OUT/scan.jsonl, failed.jsonl, summary.json "
        "and report.html. Resumable (--resume), sharded (--shard I/N or accelerate launch; then "
        "`safevlm scan merge`). See docs/scan.md.",
    )
    parser.add_argument("--model", help="Base model folder (or tiny:<preset>[@seed]). Required.")
    parser.add_argument("--adapter", default=None, help="Safety adapter folder (without one the head is untrained).")
    parser.add_argument("--policy", default="default",
                        help="Policy (a shipped name or a YAML file): its action per item; flagged = refuse.")
    parser.add_argument("--input", dest="inputs", action="extend", nargs="+", default=[], metavar="PATH",
                        help="Image folder or file, data file (LLaVA/PSA-VLM/VLGuard/RTVLM JSON(L), FigStep CSV), "
                        "parquet file or folder, datasets folder (save_to_disk), WebDataset .tar shard(s) or folder, "
                        "or a quoted glob; repeatable. Required.")
    parser.add_argument("--out", help="Output folder. Required.")
    parser.add_argument("--format", default=None, help=f"Input format, detected per input when omitted: {FORMATS_HELP}.")
    parser.add_argument("--images", default=None, metavar="DIR",
                        help="Image root of conversation files (default: the data file's folder).")
    prompts = parser.add_mutually_exclusive_group()
    prompts.add_argument("--prompt-field", default=None, metavar="F",
                         help="Per-item prompt: a column (parquet, datasets) or a member extension such as txt "
                         "(WebDataset). Conversation files always use the first user turn.")
    prompts.add_argument("--prompt", default=None, metavar="TEXT", help="One prompt sent with every image.")
    parser.add_argument("--image-field", default=None, metavar="COLUMN",
                        help="Image column of parquet / datasets inputs (default: image, img, jpg, png, ...).")
    parser.add_argument("--batch-size", type=int, default=32, help="Images per vision pass (default 32).")
    parser.add_argument("--num-workers", type=int, default=None,
                        help="DataLoader workers decoding images (default: min(8, CPUs - 1); 0 decodes in-process).")
    parser.add_argument("--resume", action="store_true",
                        help="Continue the scan in --out: items already in scan.jsonl / failed.jsonl are skipped.")
    parser.add_argument("--shard", type=_shard, default=None, metavar="I/N",
                        help="Scan only the items whose index %% N == I (default under accelerate launch: "
                        "RANK/WORLD_SIZE, into OUT/shard-I-of-N). Combine with `safevlm scan merge`.")
    parser.add_argument("--limit", type=int, default=None, help="Scan only the first N items (of this shard).")
    parser.add_argument("--threshold", type=float, default=None,
                        help="Flag (and --write-clean drops) items with risk_score = P(level >= 1) >= T, instead "
                        "of the items the policy refuses.")
    parser.add_argument("--report-top", type=int, default=12, help="Thumbnails per risk type in the report (default 12).")
    parser.add_argument("--device", default=None, type=device_argument, help="cpu, cuda, cuda:1 (default: cuda if available).")
    parser.add_argument("--dtype", default="auto", choices=list(DTYPES), help=DTYPE_HELP)
    parser.add_argument("--allow-base-mismatch", action="store_true",
                        help="Load an adapter trained on a base with other weights (a warning instead of an error).")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="No progress bar.")
    _add_curation(parser)
    parser.set_defaults(func=command)

    sub = parser.add_subparsers(dest="scan_command", metavar="[merge]")
    merge = sub.add_parser(
        "merge",
        help="Combine the folders of a sharded scan into one scan.",
        description="Merge the N shard folders of `safevlm scan --shard I/N` (or of accelerate launch) into one "
        "scan folder: rows in item order, duplicates decided over all shards, summary.json and report.html.",
    )
    merge.add_argument("folders", nargs="+", metavar="DIR", help="The shard folders (all N of them).")
    merge.add_argument("--out", required=True, help="The merged scan folder (new or empty).")
    merge.add_argument("--device", default=None, type=device_argument, help="Device for the report's attention maps.")
    merge.add_argument("--dtype", default="auto", choices=list(DTYPES), help=DTYPE_HELP)
    _add_curation(merge)
    merge.set_defaults(func=command_merge)


def shard_from_environment() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) under ``accelerate launch`` / ``torchrun``, else None."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return None
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def _precheck_clean(args, shard) -> None:
    from safevlm.errors import UsageError
    from safevlm.scan.curation import CLEANABLE_FORMATS
    from safevlm.scan.sources import detect_input_format

    if shard[1] > 1 and (args.write_clean or args.write_labels):
        raise UsageError("--write-clean / --write-labels need the whole scan: pass them to `safevlm scan merge`")
    if args.write_clean is None:
        return
    if args.limit is not None:
        raise UsageError("--write-clean needs every record scanned; drop --limit")
    if len(args.inputs) != 1 or not os.path.isfile(args.inputs[0]):
        raise UsageError("--write-clean writes a clean copy of one conversation file; give exactly one --input file")
    fmt = (args.format or detect_input_format(args.inputs[0])).partition(":")[0]
    if fmt not in CLEANABLE_FORMATS:
        raise UsageError(f"--write-clean writes LLaVA or PSA-VLM conversation files; {args.inputs[0]!r} is {fmt}")


def _curate(args, out, taxonomy) -> dict:
    from safevlm.scan.curation import write_clean, write_labels
    from safevlm.scan.merge import read_config

    done = {}
    config = read_config(out)
    if args.write_clean:
        done["clean"] = write_clean(out, args.write_clean, config)
    if args.write_labels:
        done["labels"] = write_labels(out, args.write_labels, config, taxonomy)
    return done


def _finish(args, result, taxonomy) -> int:
    summary = dict(result.summary)
    curated = _curate(args, result.out, taxonomy)
    if args.json:
        print(json.dumps({**summary, **curated}, indent=2, ensure_ascii=False))
        return 0
    print(f"scanned {summary['total']} item(s): {summary['scanned']} scanned, {summary['duplicates']} duplicate(s), "
          f"{summary['failed']} failed, {summary['flagged']} flagged ({summary['flagged_means']}); "
          f"{summary['images_per_second']} images/s; summary {result.out / 'summary.json'}"
          + (f", report {result.report}" if result.report else ""))
    if "clean" in curated:
        c = curated["clean"]
        print(f"clean copy {c['path']}: kept {c['kept']}, removed {c['removed']} (listed in {c['removed_path']})")
    if "labels" in curated:
        lab = curated["labels"]
        print(f"labels {lab['path']}: {lab['written']} PSA-VLM record(s), {lab['skipped']} without a usable result; "
              f"image root {lab['image_root']}")
    return 0


def command(args) -> int:
    from pathlib import Path

    from safevlm.errors import UsageError
    from safevlm.scan.pipeline import ScanOptions, run_scan

    missing = [flag for flag, value in (("--model", args.model), ("--input", args.inputs), ("--out", args.out))
               if not value]
    if missing:
        raise UsageError(f"{', '.join(missing)} required (or `safevlm scan merge DIR... --out DIR`)")
    shard, out, device = args.shard, args.out, args.device
    distributed = shard_from_environment() if shard is None else None
    if distributed is not None:  # accelerate launch: one shard per process, each in its own folder
        rank, world, local_rank = distributed
        shard = (rank, world)
        out = str(Path(out) / f"shard-{rank:05d}-of-{world:05d}")
        if device is None:
            import torch

            device = f"cuda:{local_rank}" if torch.cuda.is_available() else None
    shard = shard or (0, 1)
    _precheck_clean(args, shard)
    options = ScanOptions(
        inputs=args.inputs, out=out, model=args.model, adapter=args.adapter, policy=args.policy, format=args.format,
        images=args.images, prompt=args.prompt, prompt_field=args.prompt_field, image_field=args.image_field,
        batch_size=args.batch_size, num_workers=args.num_workers, resume=args.resume, shard=shard, limit=args.limit,
        threshold=args.threshold, device=device, dtype=args.dtype, allow_base_mismatch=args.allow_base_mismatch,
        report=args.report, report_top=args.report_top, progress=args.progress,
    )
    result = run_scan(options)
    code = _finish(args, result, result.taxonomy)
    if distributed is not None and not args.json:
        parent = Path(args.out)
        print(f"shard {shard[0]}/{shard[1]} done; when all are: safevlm scan merge {parent}/shard-*-of-{shard[1]:05d} "
              f"--out {parent}/merged")
    return code


def command_merge(args) -> int:
    from safevlm.scan.merge import merge_scans

    result = merge_scans(args.folders, args.out, device=args.device, dtype=args.dtype, report=args.report)
    return _finish(args, result, result.taxonomy)
