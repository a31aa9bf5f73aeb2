"""Dataset scanning: the safety head over a whole dataset, resumable and sharded.

``safevlm scan`` runs guard mode (one vision pass + safety projector + head per image, the
language model never) over image folders, conversation files, parquet / ``datasets`` folders
and WebDataset shards, and writes ``scan.jsonl``, ``failed.jsonl``, ``summary.json`` and a
self-contained ``report.html``; a clean copy of a conversation file and PSA-VLM labels come
from the same rows. See ``docs/scan.md``.

* :func:`run_scan` / :class:`ScanOptions` — the scan (``safevlm.scan.pipeline``);
* :func:`merge_scans` — one scan from the ``--shard I/N`` folders (``safevlm.scan.merge``);
* :func:`write_clean`, :func:`write_labels` — curation (``safevlm.scan.curation``);
* :func:`enumerate_inputs` — the inputs' items in scan order (``safevlm.scan.sources``);
* :func:`attention_maps` — the head's attention over the image patches (``safevlm.scan.attention``).
"""

from __future__ import annotations

from safevlm.scan.attention import attention_maps
from safevlm.scan.curation import write_clean, write_labels
from safevlm.scan.merge import merge_scans
from safevlm.scan.pipeline import ScanOptions, ScanResult, run_scan
from safevlm.scan.sources import INPUT_FORMATS, enumerate_inputs

__all__ = [
    "INPUT_FORMATS",
    "ScanOptions",
    "ScanResult",
    "attention_maps",
    "enumerate_inputs",
    "merge_scans",
    "run_scan",
    "write_clean",
    "write_labels",
]
