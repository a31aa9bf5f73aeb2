"""`safevlm eval run | compare | tasks | sweep | report | agreement`: measure a base, base + adapter, base + adapter + policy.

Thin commands over ``safevlm.eval`` (docs/eval.md): every check of a user's input (task
names, data root, judge flags, policy) happens before the model is loaded.
"""

from __future__ import annotations

import json
import sys

from safevlm.errors import UsageError


def _model_arguments(parser, adapter_required: bool = False) -> None:
    from safevlm.commands.classify import device_argument
    from safevlm.loading import DTYPE_HELP, DTYPES

    parser.add_argument("--model", required=True,
                        help="Base model: a Hugging Face LLaVA folder (with its processor) or tiny:<preset>[@seed].")
    parser.add_argument("--adapter", required=adapter_required, default=None,
                        help="Safety adapter folder." + ("" if adapter_required else
                             " Without one the base model alone answers (its own generate, no safety modules)."))
    parser.add_argument("--device", default=None, type=device_argument, help="cpu, cuda, cuda:1, mps (default: cuda if available).")
    parser.add_argument("--dtype", default="auto", choices=list(DTYPES), help=DTYPE_HELP)
    parser.add_argument("--allow-base-mismatch", action="store_true",
                        help="Load an adapter trained on a base with other weights (a warning instead of an error).")


def _task_arguments(parser, repeat: bool = True) -> None:
    parser.add_argument("--task", action="append" if repeat else "store", required=True, metavar="NAME|FILE.yaml",
                        help="A shipped task (safevlm eval tasks lists them) or a task YAML file"
                        + ("; repeatable." if repeat else "."))
    parser.add_argument("--data-root", default=None, metavar="DIR",
                        help="The folder the tasks' data paths are relative to (default: $SAFEVLM_DATA_ROOT or the current folder).")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="Only the first N items of each task.")
    parser.add_argument("--batch-size", type=int, default=8, metavar="N", help="Inputs per model call (default 8).")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="Evaluate a base model, base + adapter, or base + adapter + policy on benchmark tasks.",
        description="Safety scores (ASR, refusal, over-refusal, RTVLM judge score), general ability (MME, POPE, VQA) "
        "and the safety head's accuracy and calibration, with offline or LLM judges; resumable runs, reports, "
        "comparisons and threshold sweeps (docs/eval.md).",
    )
    sub = parser.add_subparsers(dest="eval_command", metavar="<action>")

    run = sub.add_parser(
        "run", help="Evaluate one system on tasks into a run folder (resumable).",
        description="Generate answers (greedy by default) for every item of each task, judge them and compute the task's "
        "metrics. Without --adapter the base model answers alone; with --adapter the safety head runs on every input "
        "and its decision is stored beside the answer (every input answered); with --adapter and --policy the policy "
        "refuses or hints as when serving. The run folder gets manifest.json, results.sqlite, metrics.json, report.md "
        "and report.html; run the same command again after a crash to resume without redoing anything.",
    )
    _model_arguments(run)
    run.add_argument("--policy", default=None,
                     help="Policy for guarded generation (a shipped name or a YAML file); needs --adapter.")
    _task_arguments(run)
    run.add_argument("--judge", action="append", default=None, choices=["rules", "semantic", "openai"],
                     help="Judge(s) in priority order (default: each task's own); repeat to compare judges "
                     "(their agreement is reported).")
    run.add_argument("--judge-base-url", default=None, metavar="URL",
                     help="OpenAI-compatible endpoint of the LLM judge, e.g. http://localhost:8000/v1.")
    run.add_argument("--judge-model", default=None, metavar="M", help="The LLM judge's model name.")
    run.add_argument("--judge-api-key-env", default="OPENAI_API_KEY", metavar="VAR",
                     help="Environment variable holding the judge's API key (default OPENAI_API_KEY).")
    run.add_argument("--judge-concurrency", type=int, default=4, metavar="N", help="LLM judge requests in flight (default 4).")
    run.add_argument("--retry-unjudged", action="store_true", help="Ask the judges again for stored unjudged verdicts.")
    run.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                     help="New tokens per answer for every task (default: each task's own).")
    run.add_argument("--temperature", type=float, default=0.0, help="Sampling temperature (0, the default: greedy).")
    run.add_argument("--seed", type=int, default=0, help="Seed of the safety modules' sampling (recorded in the manifest).")
    run.add_argument("--out", required=True, metavar="RUN_DIR", help="The run folder (created; an existing run resumes).")
    run.add_argument("--json", action="store_true",
                     help="Print one JSON object: run, tasks (name -> n, answered, skipped, unjudged, metrics), groups.")
    run.set_defaults(func=command_run)

    compare = sub.add_parser(
        "compare", help="The paper-style table of two runs (A = baseline, B = candidate) with deltas.",
        description="Every metric of the tasks the two runs share, B - A, marked better / worse by the metric's "
        "direction. Runs judged by different judges or rubrics are refused unless --force.",
    )
    compare.add_argument("run_a", metavar="RUN_A", help="Baseline run folder (e.g. the base model).")
    compare.add_argument("run_b", metavar="RUN_B", help="Candidate run folder (e.g. base + adapter).")
    compare.add_argument("--force", action="store_true", help="Compare runs judged differently (the table says so).")
    compare.add_argument("--all", action="store_true", help="Also list per-category / per-subset rows.")
    compare.add_argument("--json", action="store_true", help="Print the comparison as JSON.")
    compare.set_defaults(func=command_compare)

    tasks = sub.add_parser("tasks", help="List the shipped tasks with the data layout each expects.",
                           description="Each shipped task: what it measures, the reader, where its data goes under "
                           "--data-root, its subsets, metrics and default judge.")
    tasks.add_argument("--json", action="store_true", help="Print the list as JSON.")
    tasks.set_defaults(func=command_tasks)

    sweep = sub.add_parser(
        "sweep", help="Refusal on risky vs over-refusal on benign across policy thresholds; write a policy for a target.",
        description="Sets every refusing rule of --policy to one refuse threshold per point and counts how often it "
        "refuses risky items (labels expect a refusal) and benign ones. Head outputs come from the model (guard mode, "
        "the LLM never runs: --model/--adapter/--task) or from a finished run (--run RUN_DIR --task T; end to end when "
        "the run answered every input). Writes sweep.png, sweep.md and sweep.json; --target-over-refusal X picks the "
        "lowest threshold with over-refusal <= X and --write-policy FILE.yaml writes that policy.",
    )
    sweep.add_argument("--run", default=None, metavar="RUN_DIR", help="Read the head outputs stored by this run.")
    sweep.add_argument("--model", default=None, help="Base model (with --adapter), when not reading a run.")
    sweep.add_argument("--adapter", default=None, help="Safety adapter folder, when not reading a run.")
    sweep.add_argument("--task", required=True, metavar="NAME|FILE.yaml", help="The (validation) task to sweep on.")
    sweep.add_argument("--data-root", default=None, metavar="DIR", help="Data root of the task (with --model).")
    sweep.add_argument("--limit", type=int, default=None, metavar="N", help="Only the first N items (with --model).")
    sweep.add_argument("--batch-size", type=int, default=16, metavar="N", help="Inputs per guard call (default 16).")
    sweep.add_argument("--policy", default="default", help="Base policy whose refuse thresholds are swept (default: default).")
    sweep.add_argument("--refuse-level", default=None, metavar="LEVEL",
                       help="Also set every refusing rule's refuse_level (low, medium, high or 1..3).")
    sweep.add_argument("--thresholds", default=None, metavar="SPEC",
                       help="start:stop:step (stop included) or a comma list; default 0.05:1:0.05.")
    sweep.add_argument("--target-over-refusal", type=float, default=None, metavar="X",
                       help="Choose the lowest threshold whose over-refusal on benign items is at most X (0..1).")
    sweep.add_argument("--write-policy", default=None, metavar="FILE.yaml", help="Write the chosen policy here.")
    sweep.add_argument("--out", default=None, metavar="DIR",
                       help="Folder for sweep.png / sweep.md / sweep.json (default with --run: the run folder, "
                       "whose report then shows the sweep).")
    from safevlm.commands.classify import device_argument
    from safevlm.loading import DTYPE_HELP, DTYPES

    sweep.add_argument("--device", default=None, type=device_argument, help="cpu, cuda, cuda:1, mps (with --model).")
    sweep.add_argument("--dtype", default="auto", choices=list(DTYPES), help=DTYPE_HELP + " With --model.")
    sweep.add_argument("--json", action="store_true", help="Print the sweep as JSON (without the per-item rows).")
    sweep.set_defaults(func=command_sweep)

    report = sub.add_parser("report", help="Rebuild report.md and report.html of a run folder.",
                            description="Writes report.md (+ report_files/) and a self-contained report.html from "
                            "the run's stored results (and its sweep, if one was written into the folder).")
    report.add_argument("run_dir", metavar="RUN_DIR", help="The run folder.")
    report.add_argument("--samples", type=int, default=6, metavar="N", help="Sample answers per task (default 6).")
    report.set_defaults(func=command_report)

    agreement = sub.add_parser(
        "agreement", help="Agreement between human raters, LLM judges and the safety head, with bootstrap CIs.",
        description="Percent agreement and Cohen's kappa on the safe/unsafe label, quadratic-weighted kappa on the "
        "1-10 scores (items both sources rated), Krippendorff's alpha across all raters, each with a bootstrap 95% "
        "CI over items. Sources: a rater's name, 'humans' (majority of the human raters), 'judge:NAME' and 'head' "
        "(from --run). Default: humans vs the first judge (else the head).",
    )
    agreement.add_argument("--ratings", required=True, metavar="FILE.jsonl|ratings.sqlite",
                           help="Ratings: JSONL lines {item, rater, label, score, risk_type} or a safevlm annotate store.")
    agreement.add_argument("--run", default=None, metavar="RUN_DIR",
                           help="An eval run folder: adds the raters judge:<NAME> and head on the same item ids, and "
                           "rejects ratings of items that are not answers of this run.")
    agreement.add_argument("--a", default=None, metavar="SOURCE", help="First source (rater name, humans, judge:NAME, head).")
    agreement.add_argument("--b", default=None, metavar="SOURCE", help="Second source.")
    agreement.add_argument("--n-boot", type=int, default=1000, metavar="N", help="Bootstrap resamples (default 1000).")
    agreement.add_argument("--seed", type=int, default=0, help="Bootstrap seed (default 0).")
    agreement.add_argument("--out", default=None, metavar="DIR",
                           help="Write agreement.json, confusion.png (labels) and confusion_scores.png here.")
    agreement.add_argument("--json", action="store_true", help="Print the numbers as one JSON object.")
    agreement.set_defaults(func=command_agreement)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)


# ------------------------------------------------------------------------------------------ run
def _decoding(args) -> dict:
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise UsageError(f"--temperature must be >= 0, got {args.temperature}")
    decoding = {}
    if args.max_new_tokens is not None:
        decoding["max_new_tokens"] = args.max_new_tokens
    if args.temperature > 0:
        decoding.update(do_sample=True, temperature=args.temperature)
    return decoding


def _progress():
    """``progress(task, stage, done, total)`` drawing one tqdm bar per (task, stage) on stderr."""
    from tqdm.auto import tqdm

    bars: dict = {}

    def progress(task, stage, done, total):
        key = (task, stage)
        if key not in bars:
            for bar in bars.values():
                bar.close()
            bars.clear()
            bars[key] = tqdm(total=total, desc=f"{task}: {stage}", file=sys.stderr, dynamic_ncols=True, disable=None)
        bar = bars[key]
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return progress


def command_run(args) -> int:
    from pathlib import Path

    from safevlm.eval.evaluate import build_judges, check_data, load_tasks, run_evaluation, summary
    from safevlm.eval.generation import check_model_path, load_system
    from safevlm.policy import load_policy

    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be >= 1, got {args.limit}")
    if args.judge_concurrency < 1:
        raise UsageError(f"--judge-concurrency must be >= 1, got {args.judge_concurrency}")
    if args.policy is not None and args.adapter is None:
        raise UsageError("--policy needs --adapter: a policy acts on the safety head's output, and the base alone has none")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {args.out!r} is a file; give a run folder")
    decoding = _decoding(args)
    tasks = load_tasks(args.task)
    judges = build_judges(args.judge, tasks, base_url=args.judge_base_url, model=args.judge_model,
                          api_key_env=args.judge_api_key_env, concurrency=args.judge_concurrency)
    check_data(tasks, args.data_root)
    if args.policy is not None:
        load_policy(args.policy)
    check_model_path(args.model)
    system = load_system(args.model, args.adapter, args.policy, device=args.device, dtype=args.dtype, decoding=decoding,
                         seed=args.seed, allow_base_mismatch=args.allow_base_mismatch)
    payload = run_evaluation(system, tasks, out, judges, data_root=args.data_root, limit=args.limit,
                             batch_size=args.batch_size, progress=_progress(), retry_unjudged=args.retry_unjudged)
    result = summary(payload, tasks)
    if args.json:
        print(json.dumps({**result, "out": str(out)}, ensure_ascii=False))
        return 0
    _print_summary(result, system.mode)
    print(f"run folder: {out} (report.md, report.html, metrics.json, results.sqlite)")
    return 0


def _print_summary(result: dict, mode: str) -> None:
    from safevlm.eval.compare import _fmt
    from safevlm.eval.metrics import flatten, metric_info

    print(f"system: {mode}")
    for name, task in result["tasks"].items():
        print(f"{name}: n {task['n']}, answered {task['answered']}, skipped {task['skipped']}, unjudged {task['unjudged']}")
        info = metric_info(task["metrics"])
        for key, value in flatten(task["metrics"]).items():
            if "/" not in key:
                print(f"  {key:28s} {_fmt(value, info.get(key, {}).get('unit', 'number'))}")
        for key, metric in task["metrics"].items():
            if metric.get("note"):
                print(f"  note: {key}: {metric['note']}")


# ------------------------------------------------------------------------------------------ compare / tasks / report
def command_compare(args) -> int:
    from safevlm.eval.compare import compare_runs

    comparison = compare_runs(args.run_a, args.run_b, force=args.force)
    if args.json:
        print(json.dumps(comparison.to_dict(), ensure_ascii=False))
    else:
        print(comparison.format_markdown(top_level_only=not args.all))
    return 0


def command_tasks(args) -> int:
    from safevlm.eval.tasks import describe_tasks

    rows = describe_tasks()
    if args.json:
        print(json.dumps(rows, ensure_ascii=False))
        return 0
    for row in rows:
        print(f"{row['name']}: {row['description']}")
        data = row["path"] + (f" (images: {row['image_root']})" if row["image_root"] else "")
        print(f"  data:    {data}  [reader {row['reader']}: {row['layout']}]")
        if row["subsets"]:
            print(f"  subsets: {', '.join(row['subsets'])}")
        print(f"  metrics: {', '.join(row['metrics'])}; judge: {row['judge']}")
    return 0


def command_report(args) -> int:
    from safevlm.eval.report import write_report

    if args.samples < 0:
        raise UsageError(f"--samples must be >= 0, got {args.samples}")
    paths = write_report(args.run_dir, samples=args.samples)
    print(f"wrote {paths['markdown']} and {paths['html']}")
    return 0


# ------------------------------------------------------------------------------------------ sweep
def command_sweep(args) -> int:
    from pathlib import Path

    from safevlm.eval import sweep as sw
    from safevlm.eval.evaluate import check_data
    from safevlm.eval.tasks import load_task
    from safevlm.policy import load_policy

    if (args.run is None) == (args.model is None):
        raise UsageError("give either --run RUN_DIR (stored head outputs) or --model and --adapter (run the guard)")
    if args.model is not None and args.adapter is None:
        raise UsageError("--model needs --adapter: the sweep reads the safety head")
    if args.target_over_refusal is not None and not 0 <= args.target_over_refusal <= 1:
        raise UsageError(f"--target-over-refusal must be in [0, 1], got {args.target_over_refusal}")
    if args.write_policy is not None and args.target_over_refusal is None:
        raise UsageError("--write-policy needs --target-over-refusal (the over-refusal the policy must meet)")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    thresholds = sw.parse_thresholds(args.thresholds) if args.thresholds else sw.DEFAULT_THRESHOLDS
    policy = load_policy(args.policy)
    if args.refuse_level is not None:
        try:
            policy.taxonomy.level_id(args.refuse_level)
        except ValueError as err:
            raise UsageError(f"--refuse-level: {err}") from None
        if policy.taxonomy.level_id(args.refuse_level) == 0:
            raise UsageError("--refuse-level must be a risky level (low, medium, high or 1..3), not 0")
    sw.policy_at(policy, 0.5, args.refuse_level)  # a policy that never refuses fails here, before any work
    task = load_task(args.task)
    if args.run is not None:
        out = Path(args.out or args.run)
        rows, facts = sw.rows_from_run(args.run, task.name, policy.taxonomy)
        basis, source, problems = facts["basis"], {"run": str(args.run), **facts}, []
    else:
        if args.out is None:
            raise UsageError("--out DIR is needed with --model (where sweep.png / sweep.md / sweep.json go)")
        out = Path(args.out)
        check_data([task], args.data_root)
        from safevlm.loading import load_model_and_processor

        model, processor = load_model_and_processor(args.model, args.adapter, device=args.device, dtype=args.dtype)
        rows, problems = sw.rows_from_model(model, processor, task, policy, data_root=args.data_root, limit=args.limit,
                                            batch_size=args.batch_size)
        basis, source = "policy", {"model": args.model, "adapter": args.adapter}
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {str(out)!r} is a file; give a folder")
    result = sw.run_sweep(rows, policy, out, task=task.name, basis=basis, thresholds=thresholds,
                          refuse_level=args.refuse_level, target=args.target_over_refusal,
                          policy_file=args.write_policy, source=source)
    if args.run is not None and out == Path(args.run) and (out / "metrics.json").is_file():
        from safevlm.eval.report import write_report

        write_report(out)
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "rows"}, ensure_ascii=False))
        return 0
    print(result["markdown"])
    for problem in problems[:10]:
        print(f"skipped: {problem}", file=sys.stderr)
    print(f"\nwrote {out / sw.SWEEP_PNG}, {out / sw.SWEEP_MD}, {out / sw.SWEEP_JSON}")
    return 0


# ------------------------------------------------------------------------------------------ agreement
def command_agreement(args) -> int:
    from pathlib import Path

    from safevlm.eval import agreement as ag
    from safevlm.eval.ratings import check_items, read_ratings, run_ratings

    if args.n_boot < 1:
        raise UsageError(f"--n-boot must be >= 1, got {args.n_boot}")
    if args.out is not None and Path(args.out).is_file():
        raise UsageError(f"--out {args.out!r} is a file; give a folder")
    ratings = read_ratings(args.ratings)
    if args.run is not None:
        automatic = run_ratings(args.run)
        check_items(ratings, automatic.items, f"the run {args.run}")
        ratings = [*ratings, *automatic.ratings]
    result = ag.compare_sources(ratings, args.a, args.b, n_boot=args.n_boot, seed=args.seed)
    if args.out is not None:
        out = Path(args.out)
        files = [ag.write_confusion_png(result, out / "confusion.png")]
        if result["n_scores"]:
            files.append(ag.write_confusion_png(result, out / "confusion_scores.png", field="confusion_scores"))
        (out / "agreement.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        result["files"] = [str(f) for f in files] + [str(out / "agreement.json")]
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
        return 0
    print(ag.format_table(result))
    for f in result.get("files", []):
        print(f"wrote {f}")
    return 0
