"""Safety data: one record type, readers for published formats, images, synthetic data, collator.

* :class:`SafetyRecord` / :class:`Turn` — the record every reader produces;
* :func:`load_records` — PSA-VLM, LLaVA, VLGuard, RTVLM and FigStep/SafeBench files, with
  labels mapped through YAML tables (``safevlm/data/mappings``) and a :class:`LoadReport`
  that accounts for every input record (loaded or skipped with a reason);
* :func:`open_image` — the one safe way to open a dataset image (root escapes refused,
  decompression-bomb limit, every mode converted to RGB);
* :func:`write_psavlm_jsonl` — write records in PSA-VLM's jsonl format;
* ``safevlm.data.figstep`` — FigStep-exact typographic rendering;
* :func:`build_messages` / ``safevlm.data.chat`` — conversations as the model reads them, the
  one implementation shared by training and guarded inference (and what the safety head reads);
* ``safevlm.data.synth`` — synthetic training data for the embedded tiny model;
* ``safevlm.data.collator`` — :class:`SafetyCollator` for training (imports torch lazily).

See ``docs/data.md`` for the formats and how their labels are mapped.
"""

from __future__ import annotations

from safevlm.data.chat import build_messages
from safevlm.data.images import ImageError, check_image_path, open_image, resolve_image_path, to_rgb
from safevlm.data.readers import FORMATS, detect_format, load_records, write_psavlm_jsonl
from safevlm.data.records import (
    IMAGE_PLACEHOLDER,
    DataFormatError,
    LoadReport,
    LoadWarning,
    SafetyRecord,
    Skipped,
    Turn,
    strip_image_placeholder,
)


def __getattr__(name: str):
    # The collator needs torch; import it only when asked for.
    if name == "SafetyCollator":
        from safevlm.data import collator

        return getattr(collator, name)
    raise AttributeError(f"module 'safevlm.data' has no attribute {name!r}")


__all__ = [
    "DataFormatError",
    "FORMATS",
    "IMAGE_PLACEHOLDER",
    "ImageError",
    "LoadReport",
    "LoadWarning",
    "SafetyCollator",
    "SafetyRecord",
    "Skipped",
    "Turn",
    "build_messages",
    "check_image_path",
    "detect_format",
    "load_records",
    "open_image",
    "resolve_image_path",
    "strip_image_placeholder",
    "to_rgb",
    "write_psavlm_jsonl",
]
