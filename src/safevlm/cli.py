"""`safevlm <command>`: one module per command in ``safevlm.commands``; logic lives in the library.

User mistakes end as ``safevlm <command>: error: <message>`` and exit status 2, without a
traceback (see :func:`is_user_error`); anything else keeps its traceback. A closed output
pipe (``safevlm data check FILE | head``) ends quietly.
"""

from __future__ import annotations

import argparse
import importlib
import linecache
import os
import sys
from pathlib import Path

# Each module in safevlm.commands defines ``register(subparsers)``, which adds its parser
# and sets ``func`` to a ``command(args) -> int | None`` function. Keep the list sorted.
COMMAND_MODULES: tuple[str, ...] = (
    "annotate",
    "calibrate",
    "chat",
    "classify",
    "data",
    "demo",
    "eval",
    "merge",
    "params",
    "policy",
    "scan",
    "serve",
    "tiny",
    "train",
)

_PACKAGE_DIR = str(Path(__file__).resolve().parent) + os.sep
# OSErrors that name a path the user gave (a file that is missing, a folder where a file goes...)
_PATH_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)


def build_parser() -> argparse.ArgumentParser:
    from safevlm import __version__

    parser = argparse.ArgumentParser(
        prog="safevlm",
        description="Safety modules (PSA-VLM) for vision-language models: data, train, merge, classify, chat, serve, scan.",
    )
    parser.add_argument("--version", action="version", version=f"safevlm {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="<command>")
    for name in COMMAND_MODULES:
        importlib.import_module(f"safevlm.commands.{name}").register(subparsers)
    return parser


def _raised_by_safevlm(err: BaseException) -> bool:
    """True when a ``raise`` statement in safevlm's own code raised ``err``.

    safevlm raises ``ValueError`` only to reject an input, with a message written for the
    user; a ``ValueError`` from torch, transformers or a failed operation (``int("x")``) has
    its last frame elsewhere, or on a line that is not a ``raise``, and is a bug.
    """
    tb = err.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    filename = tb.tb_frame.f_code.co_filename
    if not os.path.abspath(filename).startswith(_PACKAGE_DIR):
        return False
    return linecache.getline(filename, tb.tb_lineno).lstrip().startswith("raise ")


def is_user_error(err: BaseException) -> bool:
    """Whether ``err`` is a user mistake to report in one line (exit 2) rather than a bug.

    * a ``ValueError`` subclass defined by safevlm (``UsageError``, ``ImageError``,
      ``DataFormatError``, ``ConfigError``, ``PolicyOverrideError``, ...);
    * a plain ``ValueError`` raised by safevlm's own code (see :func:`_raised_by_safevlm`);
    * a missing / existing / wrong-kind / forbidden path (``FileNotFoundError``, ...).
    """
    if isinstance(err, _PATH_ERRORS):
        return True
    if not isinstance(err, ValueError):
        return False
    if type(err).__module__.split(".")[0] == "safevlm":
        return True
    return type(err) is ValueError and _raised_by_safevlm(err)


def _message(err: BaseException) -> str:
    if isinstance(err, OSError) and err.filename is not None and err.strerror and str(err).startswith("[Errno"):
        return f"{err.strerror}: {err.filename}"
    return str(err)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        code = args.func(args)
        sys.stdout.flush()
    except BrokenPipeError:
        # the reader of our output went away (`| head`): stop quietly, as `cat` does
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):  # stdout is not a real file (tests)
            pass
        return 141  # 128 + SIGPIPE, what a shell reports for a writer killed by a closed pipe
    except (ValueError, OSError) as err:
        if not is_user_error(err):
            raise
        print(f"safevlm {args.command}: error: {_message(err)}", file=sys.stderr)
        return 2
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
