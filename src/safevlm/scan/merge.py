"""``safevlm scan merge DIR... --out DIR``: one scan from the shard scans of ``--shard I/N``.

The shards must be the N shards of one scan (same inputs, model, adapter, policy, prompt
options; I = 0..N-1 each once). Rows are merged in item order (each shard writes its rows in
item order) and duplicates are decided again over all shards: the first item (by index) with
given image bytes and prompt is ``scanned``, every later one a ``duplicate`` of it with its
result, exactly as one unsharded scan decides. summary.json and report.html are then written
as by a scan; ``images_per_second`` is the sum of the shards' rates (they ran side by side).
"""

from __future__ import annotations

import heapq
import json
from collections.abc import Iterator
from pathlib import Path

from safevlm.errors import UsageError
from safevlm.scan.outputs import (
    CONFIG_FILE,
    FAILED_FILE,
    RESULT_FIELDS,
    SCAN_FILE,
    SUMMARY_FILE,
    AppendFile,
    dedupe_key,
    iter_rows,
    read_row_at,
    write_json_atomic,
)

_FLUSH_ROWS = 1000


def read_config(folder: Path) -> dict:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise UsageError(f"{str(folder)!r} is not a scan folder (no {CONFIG_FILE})")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UsageError(f"{path}: not valid JSON ({err.msg})") from None


def check_shards(configs: list[tuple[Path, dict]]) -> dict:
    """The common config of the shard folders (shard set to 0/1); UsageError naming what differs
    or which shard is missing / given twice."""
    from safevlm.scan.pipeline import IDENTITY_FIELDS

    first_dir, first = configs[0]
    counts = {cfg["options"]["shard"][1] for _, cfg in configs}
    if len(counts) != 1:
        raise UsageError(f"the folders are shards of different splits (N = {sorted(counts)})")
    count = counts.pop()
    for folder, cfg in configs[1:]:
        for key in IDENTITY_FIELDS:
            if key != "shard" and cfg["options"].get(key) != first["options"].get(key):
                raise UsageError(f"{str(folder)!r} and {str(first_dir)!r} scanned with different {key} "
                                 f"({cfg['options'].get(key)!r} vs {first['options'].get(key)!r})")
    seen: dict[int, Path] = {}
    for folder, cfg in configs:
        index = cfg["options"]["shard"][0]
        if index in seen:
            raise UsageError(f"shard {index}/{count} is given twice: {str(seen[index])!r} and {str(folder)!r}")
        seen[index] = folder
    missing = [i for i in range(count) if i not in seen]
    if missing:
        raise UsageError(f"shard(s) {', '.join(f'{i}/{count}' for i in missing)} missing; give all {count} shard folders")
    merged = json.loads(json.dumps(first))
    merged["options"]["shard"] = [0, 1]
    merged["items_in_shard"] = sum(cfg.get("items_in_shard", 0) for _, cfg in configs)
    merged["merged_from"] = [str(folder) for folder, _ in configs]
    return merged


def _ordered(path: Path) -> Iterator[tuple[int, dict]]:
    last = -1
    for _, row in iter_rows(path):
        if row["index"] <= last:
            raise UsageError(f"{path}: rows are not in item order (index {row['index']} after {last})")
        last = row["index"]
        yield row["index"], row


def _merged(paths: list[Path]) -> Iterator[dict]:
    for _, row in heapq.merge(*(_ordered(p) for p in paths), key=lambda pair: pair[0]):
        yield row


def merge_scans(folders: list[str], out: str, device: str | None = None, dtype: str = "auto",
                report: bool = True, progress: bool = False, model=None, processor=None):
    """Merge shard folders into ``out`` (new or empty); returns a :class:`~safevlm.scan.pipeline.ScanResult`."""
    from safevlm.scan.pipeline import finish, options_from_config

    if not folders:
        raise UsageError("give the shard folders to merge")
    dirs = [Path(f) for f in folders]
    for folder in dirs:
        if not folder.is_dir():
            raise FileNotFoundError(f"no such scan folder: {folder}")
    out_dir = Path(out)
    if out_dir.resolve() in {d.resolve() for d in dirs}:
        raise UsageError(f"--out {out!r} is one of the shard folders; merge into a new folder")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UsageError(f"--out {out!r} exists and is not an empty folder; choose another --out")
    configs = [(d, read_config(d)) for d in dirs]
    config = check_shards(configs)
    summaries = []
    for d in dirs:
        try:
            summaries.append(json.loads((d / SUMMARY_FILE).read_text(encoding="utf-8")))
        except (OSError, ValueError):
            raise UsageError(f"{str(d)!r} has no {SUMMARY_FILE}: that shard's scan has not finished "
                             "(rerun it with --resume)") from None
    out_dir.mkdir(parents=True, exist_ok=True)
    scan_out = AppendFile(out_dir / SCAN_FILE)
    originals: dict[bytes, int] = {}  # key -> offset of its scanned row in the merged scan.jsonl
    pending: list[dict] = []  # rows not written yet, and the scanned ones among them by key
    pending_first: dict[bytes, dict] = {}

    def flush():
        for row, offset in zip(pending, scan_out.append(pending)):
            if row["status"] == "scanned":
                originals.setdefault(dedupe_key(row.get("sha256"), row.get("prompt")), offset)
        pending.clear()
        pending_first.clear()

    try:
        for row in _merged([d / SCAN_FILE for d in dirs]):
            key = dedupe_key(row.get("sha256"), row.get("prompt"))
            original = pending_first.get(key)
            if original is None and key in originals:
                original = read_row_at(out_dir / SCAN_FILE, originals[key])
            if original is not None:
                row.update(status="duplicate", duplicate_of=original["id"], **{k: original.get(k) for k in RESULT_FIELDS})
            else:
                row.update(status="scanned", duplicate_of=None)
                pending_first[key] = row
            pending.append(row)
            if len(pending) >= _FLUSH_ROWS:
                flush()
        flush()
    finally:
        scan_out.close()
    failed_out = AppendFile(out_dir / FAILED_FILE)
    try:
        batch = []
        for row in _merged([d / FAILED_FILE for d in dirs]):
            batch.append(row)
            if len(batch) >= _FLUSH_ROWS:
                failed_out.append(batch)
                batch = []
        failed_out.append(batch)
    finally:
        failed_out.close()
    write_json_atomic(out_dir / CONFIG_FILE, config)
    options = options_from_config(config, out=str(out_dir), report=report, progress=progress, device=device,
                                  dtype=dtype)
    if model is None:
        from safevlm.loading import load_model_and_processor

        model, processor = load_model_and_processor(options.model, options.adapter, device=device, dtype=dtype)
    per_shard = [{"folder": str(d), "shard": s.get("shard"), "total": s.get("total"),
                  "images_per_second": s.get("images_per_second")} for d, s in zip(dirs, summaries)]
    rate = sum(float(s.get("images_per_second") or 0.0) for s in summaries)
    elapsed = max(float(s.get("elapsed_s") or 0.0) for s in summaries)
    policy_name = summaries[0].get("policy", config.get("policy_name"))
    return finish(out_dir, model, processor, options, model.config.taxonomy, config["listing"], rate, elapsed,
                  policy_name, per_shard=per_shard)


__all__ = ["check_shards", "merge_scans", "read_config"]
