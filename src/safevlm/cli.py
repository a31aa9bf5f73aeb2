"""`safevlm <command>`: one module per command in ``safevlm.commands``; logic lives in the library."""

from __future__ import annotations

import argparse
import importlib
import sys

# Each module in safevlm.commands defines ``register(subparsers)``, which adds its parser
# and sets ``func`` to a ``command(args) -> int | None`` function. Keep the list sorted.
COMMAND_MODULES: tuple[str, ...] = (
    "chat",
    "classify",
    "data",
    "demo",
    "merge",
    "params",
    "serve",
    "tiny",
    "train",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="safevlm",
        description="Safety modules (PSA-VLM) for vision-language models: train, guard, scan, serve.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="<command>")
    for name in COMMAND_MODULES:
        importlib.import_module(f"safevlm.commands.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        code = args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"safevlm {args.command}: error: {err}", file=sys.stderr)
        return 2
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
