"""Checks on the folders a command writes, before anything is written.

* :func:`check_output_dir`: ``--out`` must not be a file, and an existing folder with
  files in it is replaced only with ``--overwrite`` (``tiny build``, ``merge``, ...);
* :func:`check_disjoint`: an output folder must not be, or lie inside, a folder the command
  reads (``merge --out`` inside ``--base``), nor contain one, since replacing the output
  would delete the input.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from safevlm.errors import UsageError


def check_output_dir(out: str | os.PathLike, overwrite: bool = False, flag: str = "--out") -> Path:
    """``out`` as a Path, if a command may write a folder there.

    Raises :class:`UsageError` if ``out`` is an existing file (or other non-folder), or a
    folder that is not empty while ``overwrite`` is false. An empty folder is fine.
    """
    path = Path(out)
    if path.exists() or path.is_symlink():
        if not path.is_dir():
            raise UsageError(f"{flag} {str(path)!r} is an existing file, not a folder; choose a folder")
        if not overwrite and any(path.iterdir()):
            raise UsageError(f"{flag} {str(path)!r} exists and is not empty; choose another {flag} or pass --overwrite")
    return path


def check_disjoint(
    out: str | os.PathLike, inputs: Mapping[str, "str | os.PathLike | None"], flag: str = "--out"
) -> None:
    """Refuse an output folder that is, or lies inside, or contains, one of the ``inputs``.

    ``inputs`` maps a name for the message (``"--base"``) to a folder the command reads
    (``None`` entries are ignored). Symbolic links are resolved. Raises :class:`UsageError`.
    """
    target = Path(out).resolve()
    for name, folder in inputs.items():
        if folder is None:
            continue
        source = Path(folder).resolve()
        if target == source:
            raise UsageError(f"{flag} {str(out)!r} is the {name} folder: writing it would replace what is being read")
        if source in target.parents:
            raise UsageError(
                f"{flag} {str(out)!r} lies inside the {name} folder {str(folder)!r}; choose a folder outside it"
            )
        if target in source.parents:
            raise UsageError(
                f"the {name} folder {str(folder)!r} lies inside {flag} {str(out)!r}: replacing {flag} would delete it"
            )


__all__ = ["check_disjoint", "check_output_dir"]
