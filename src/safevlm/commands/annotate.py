"""`safevlm annotate serve | export | import | tokens`: human rating rounds; thin over :mod:`safevlm.annotate`."""

from __future__ import annotations

import json
import os

ITEMS_HELP = ("Eval run folder (its answers), scan output folder (its inputs) or an items JSONL file "
              '({"id", "prompt", "answer", "image"} a line).')


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "annotate",
        help="Human rating of answers / inputs: a rating web page, Label Studio export and import.",
        description="Run a rating round: raters sign in to a small web page and rate each item (safe / unsafe, the "
        "1-10 safety score of the LLM judge's rubric, the input's risk type; risk type and level for scan inputs), "
        "blind to the model that answered, in their own random order; every rating is saved at once into --db. "
        "Or rate in Label Studio (export / import). Agreement: `safevlm eval agreement`. See docs/annotate.md.",
    )
    sub = parser.add_subparsers(dest="annotate_command", metavar="<action>")

    serve = sub.add_parser("serve", help="Serve the rating page for a round.",
                           description="Serve the rating page (FastAPI + uvicorn) for the items of --items, saving "
                           "ratings into --db. Restart it any time: nothing is lost, raters stay signed in.")
    serve.add_argument("--items", required=True, metavar="RUN_DIR|SCAN_DIR|FILE.jsonl", help=ITEMS_HELP)
    serve.add_argument("--db", required=True, metavar="ratings.sqlite", help="The ratings store (created if missing).")
    serve.add_argument("--host", default="127.0.0.1", help="Interface to bind (default 127.0.0.1: this machine only).")
    serve.add_argument("--port", type=int, default=8008, help="Port (default 8008).")
    serve.add_argument("--raters", type=_names, default=None, metavar="NAME,...",
                       help="Only these raters may sign in (default: anyone who types a name).")
    serve.add_argument("--tokens", default=None, metavar="FILE.json",
                       help="Raters sign in with their token from this file (`safevlm annotate tokens` makes it).")
    serve.add_argument("--max-image-side", type=int, default=1024, metavar="PX",
                       help="Longest side of the images sent to the page (default 1024).")
    serve.set_defaults(func=command_serve)

    export = sub.add_parser("export", help="Write Label Studio tasks JSON (and its labeling config).",
                            description="Write the items as Label Studio tasks: data (image URL and path, prompt, "
                            "answer, the item id), the LLM judge's verdicts (or a scan's safety head) as predictions, "
                            "and with --db the ratings made so far as annotations. The labeling config goes beside "
                            "--out with suffix .xml.")
    export.add_argument("--items", required=True, metavar="RUN_DIR|SCAN_DIR|FILE.jsonl", help=ITEMS_HELP)
    export.add_argument("--format", required=True, choices=["label-studio"], help="Export format: label-studio.")
    export.add_argument("--out", required=True, metavar="tasks.json", help="The tasks file to write.")
    export.add_argument("--db", default=None, metavar="ratings.sqlite", help="Include these ratings as annotations.")
    export.add_argument("--predictions", type=_names, default=None, metavar="RATER,...",
                        help="Automatic raters to pre-annotate with (default: the LLM judges judge:openai:* of an eval "
                        "run, the head of a scan; e.g. judge:rules,head).")
    export.add_argument("--document-root", default=None, metavar="DIR",
                        help="Label Studio's LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT: image URLs are "
                        "/data/local-files/?d=PATH with PATH relative to it (default: /).")
    export.add_argument("--image-url", default=None, metavar="TEMPLATE",
                        help="Image URL template instead, with {path} (relative to --document-root) and {item}, "
                        "e.g. https://files.example.org/{path}.")
    export.add_argument("--embed-images", action="store_true",
                        help="Put every image into the tasks as a data: URL (a self-contained file).")
    export.set_defaults(func=command_export)

    imp = sub.add_parser("import", help="Read Label Studio's exported annotations into the ratings store.",
                         description="Read Label Studio's JSON export of tasks made by `safevlm annotate export` into "
                         "--db, checked like ratings on the page, in one transaction. Raters are the annotators' "
                         "emails (or labelstudio-<id>; --rater-map names them).")
    imp.add_argument("file", metavar="EXPORT.json", help="Label Studio's JSON export.")
    imp.add_argument("--items", required=True, metavar="RUN_DIR|SCAN_DIR|FILE.jsonl", help=ITEMS_HELP)
    imp.add_argument("--db", required=True, metavar="ratings.sqlite", help="The ratings store (created if missing).")
    imp.add_argument("--rater-map", default=None, metavar="FILE.json",
                     help='JSON object from Label Studio user (id or email) to rater name, e.g. {"3": "alice"}.')
    imp.add_argument("--json", action="store_true", help="Print the import report as JSON.")
    imp.set_defaults(func=command_import)

    tokens = sub.add_parser("tokens", help="Make sign-in tokens for raters.",
                            description="Add a random token for each rater to a tokens file (mode 0600; existing "
                            "tokens are kept). Serve with --tokens FILE; a rater signs in with name and token, or "
                            "opens http://HOST:PORT/?token=TOKEN.")
    tokens.add_argument("--raters", type=_names, required=True, metavar="NAME,...", help="The raters.")
    tokens.add_argument("--out", required=True, metavar="FILE.json", help="The tokens file (created or extended).")
    tokens.set_defaults(func=command_tokens)

    parser.set_defaults(func=lambda args: parser.print_help() or 2)


def _settings(args):
    from pydantic import ValidationError

    from safevlm.annotate.app import AnnotateSettings
    from safevlm.errors import UsageError

    try:
        return AnnotateSettings(items=args.items, db=args.db, host=args.host, port=args.port, raters=args.raters,
                                tokens=args.tokens, max_image_side=args.max_image_side)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise UsageError(f"--{field.replace('_', '-')}: {first['msg'].removeprefix('Value error, ')}") from None


def command_serve(args) -> int:
    from safevlm.annotate.app import run_server

    run_server(_settings(args))
    return 0


def command_export(args) -> int:
    from safevlm.annotate.items import load_items
    from safevlm.annotate.labelstudio import LOCAL_FILES_URL, export_tasks, label_config, write_export
    from safevlm.annotate.store import RatingStore
    from safevlm.errors import UsageError

    if args.db is not None and not os.path.isfile(args.db):
        raise UsageError(f"--db {args.db!r}: no such ratings store")
    items = load_items(args.items)
    store = RatingStore(args.db) if args.db else None
    tasks = export_tasks(items, store, predictions=args.predictions, document_root=args.document_root,
                         url_template=args.image_url or LOCAL_FILES_URL, embed_images=args.embed_images)
    out, config = write_export(tasks, args.out, label_config(items.kinds))
    predicted = sum(1 for t in tasks if t["predictions"])
    annotated = sum(len(t["annotations"]) for t in tasks)
    print(f"wrote {len(tasks)} Label Studio task(s) to {out} ({predicted} with predictions, {annotated} annotation(s)); "
          f"labeling config {config}")
    return 0


def command_import(args) -> int:
    from pathlib import Path

    from safevlm.annotate.items import load_items
    from safevlm.annotate.labelstudio import import_annotations
    from safevlm.annotate.store import RatingStore
    from safevlm.errors import UsageError

    rater_map = None
    if args.rater_map:
        try:
            rater_map = json.loads(Path(args.rater_map).read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise UsageError(f"--rater-map {args.rater_map}: not valid JSON ({err.msg})") from None
        if not isinstance(rater_map, dict) or not all(isinstance(v, str) and v for v in rater_map.values()):
            raise UsageError(f"--rater-map {args.rater_map}: expected a JSON object {{user: rater name}}")
    if not Path(args.file).is_file():
        raise UsageError(f"{args.file!r}: no such file")
    items = load_items(args.items)
    report = import_annotations(args.file, items, RatingStore(args.db), rater_map)
    if args.json:
        print(json.dumps(report.to_dict()))
        return 0
    print(f"imported {report.imported} rating(s) ({report.new} new) by {len(report.raters)} rater(s) "
          f"({', '.join(report.raters) or 'none'}) into {args.db}; skipped {report.cancelled} cancelled, "
          f"{report.empty} empty, {report.superseded} superseded annotation(s)")
    return 0


def command_tokens(args) -> int:
    from safevlm.annotate.app import make_tokens

    tokens = make_tokens(args.raters, args.out)
    for name in args.raters:
        print(f"{name.strip()}\t{tokens[name.strip()]}")
    print(f"{len(tokens)} rater(s) in {args.out}; serve with --tokens {args.out}")
    return 0
