"""Errors a user can fix: what the CLI reports as ``safevlm <command>: error: ...`` (exit 2).

safevlm signals a bad input (a flag, a path, a file's content) with a ``ValueError`` whose
message names the file, field or flag and the allowed values: :class:`UsageError` for flags
and paths, and the typed subclasses of the modules that read files
(``safevlm.data.ImageError``, ``safevlm.data.DataFormatError``, ...). ``safevlm.cli`` prints
those without a traceback; errors raised anywhere else keep their traceback (they are bugs).
"""

from __future__ import annotations


class UsageError(ValueError):
    """A flag or path the user gave cannot be used; the message says which and why."""


__all__ = ["UsageError"]
