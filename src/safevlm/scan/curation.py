"""Curation from a finished scan: a cleaned copy of the input, and labels for training.

* :func:`write_clean` — the input conversation file (LLaVA JSON / JSONL, PSA-VLM JSON /
  JSONL) without the records the scan flagged (the policy refused them, or their risk score
  reached ``--threshold``); every kept record is copied **byte for byte** from the input (its
  own line of a JSONL file, its own text span of a JSON list). The dropped records go to
  ``removed.jsonl`` with their scores. Records whose image could not be read are kept (they
  were not judged); ``failed.jsonl`` lists them.
* :func:`write_labels` — the scan as PSA-VLM training records (``safe_type``, ``safe_level``)
  for stage 1 after human review: level 0 is labelled ``safe``; a risky level gets the most
  probable risky type. Each record's ``metadata.scan`` keeps the probabilities and
  ``metadata.needs_review`` is true; image paths are relative to one image root (returned).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

from safevlm.errors import UsageError
from safevlm.scan.outputs import FAILED_FILE, REMOVED_FILE, SCAN_FILE, iter_rows

CLEANABLE_FORMATS = ("llava", "psavlm")


def _json_list_spans(text: str, path: Path) -> list[tuple[int, int]]:
    """(start, end) character span of each element of a top-level JSON list, in order."""
    decoder = json.JSONDecoder()
    at = text.index("[") + 1
    spans = []
    while True:
        while at < len(text) and text[at] in " \t\r\n":
            at += 1
        if at < len(text) and text[at] == "]":
            return spans
        try:
            _, end = decoder.raw_decode(text, at)
        except json.JSONDecodeError as err:
            raise UsageError(f"{path}: malformed JSON at character {err.pos} ({err.msg})") from None
        spans.append((at, end))
        at = end
        while at < len(text) and text[at] in " \t\r\n":
            at += 1
        if at < len(text) and text[at] == ",":
            at += 1
        elif at < len(text) and text[at] == "]":
            return spans
        else:
            raise UsageError(f"{path}: expected ',' or ']' at character {at} of the JSON list")


def cleanable_input(config: dict) -> tuple[str, str]:
    """(the input file, its format) a scan can write a clean copy of; UsageError otherwise."""
    listing = config.get("listing", {})
    if len(listing) != 1:
        raise UsageError(f"--write-clean needs a scan of one conversation file; this scan read {len(listing)} inputs")
    (spec, facts), = listing.items()
    if facts["format"] not in CLEANABLE_FORMATS or not Path(spec).is_file():
        raise UsageError(f"--write-clean writes LLaVA or PSA-VLM conversation files; {spec!r} is {facts['format']}")
    return spec, facts["format"]


def write_clean(scan_dir: str | os.PathLike, clean_path: str | os.PathLike, config: dict) -> dict:
    """Write the scan's input without its flagged records to ``clean_path`` and the dropped
    records to ``scan_dir/removed.jsonl``. Returns ``{"kept", "removed", "path", "removed_path"}``.

    Refused unless every record of the input has a row (a scan cut short by ``--limit``, or
    still running, would let unscanned records through).
    """
    scan_dir, clean_path = Path(scan_dir), Path(clean_path)
    spec, fmt = cleanable_input(config)
    source = Path(spec)
    if clean_path.resolve() == source.resolve():
        raise UsageError(f"--write-clean {str(clean_path)!r} is the input file itself; write the clean copy elsewhere")
    flagged: dict[str, dict] = {}
    seen = 0
    for _, row in iter_rows(scan_dir / SCAN_FILE):
        seen += 1
        if row.get("flagged"):
            flagged[row["source"]] = row
    seen += sum(1 for _ in iter_rows(scan_dir / FAILED_FILE))
    expected = config["listing"][spec]["items"]
    if config.get("options", {}).get("shard", [0, 1])[1] != 1 or seen != expected:
        raise UsageError(f"--write-clean needs the whole of {spec!r} scanned: {seen} of {expected} records have a "
                         "row (merge the shards, or finish the scan without --limit)")
    text = source.read_bytes().decode("utf-8-sig")
    prefix = str(source)
    kept_parts, removed = [], []
    if text.lstrip().startswith("["):
        spans = _json_list_spans(text, source)
        for i, (start, end) in enumerate(spans):
            location = f"{prefix}[{i}]"
            if location in flagged:
                removed.append((flagged[location], text[start:end]))
            else:
                kept_parts.append(text[start:end])
        body = "[\n" + ",\n".join(kept_parts) + "\n]\n" if kept_parts else "[]\n"
    else:
        for lineno, line in enumerate(text.split("\n"), start=1):
            location = f"{prefix}:{lineno}"
            if location in flagged:
                removed.append((flagged[location], line.rstrip("\r")))
            elif line.strip():
                kept_parts.append(line)
        body = "".join(part + "\n" for part in kept_parts)
    clean_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = clean_path.with_name(f".{clean_path.name}.tmp")
    tmp.write_text(body, encoding="utf-8")
    os.replace(tmp, clean_path)
    removed_path = scan_dir / REMOVED_FILE
    tmp = removed_path.with_name(f".{removed_path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for row, raw in removed:
            entry = {k: row.get(k) for k in ("id", "source", "action", "risk_score", "risk_level", "risk_type",
                                                "decided_by", "score")}
            entry["record"] = json.loads(raw)
            fh.write(json.dumps(entry, ensure_ascii=False) + "\n")
    os.replace(tmp, removed_path)
    return {"kept": len(kept_parts), "removed": len(removed), "path": str(clean_path), "removed_path": str(removed_path),
            "format": fmt}


def label_of(row: dict, taxonomy) -> tuple[int, int] | None:
    """(type id, level id) for a scan row: level 0 -> the safe type; a risky level -> the most
    probable risky type. None for a row without usable probabilities."""
    level = row.get("risk_level")
    probs = row.get("type_probs") or {}
    if not isinstance(level, int) or not 0 <= level < taxonomy.num_levels or not probs:
        return None
    if level == 0:
        return taxonomy.safe_type_id, 0
    risky = max(taxonomy.risk_type_names, key=lambda t: probs.get(t) or 0.0)
    return taxonomy.type_id(risky), level


def _image_name(item_id: str, data: bytes) -> str:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            ext = (img.format or "png").lower().replace("jpeg", "jpg")
    except Exception:  # the scan decoded it, so this does not happen; keep the bytes anyway
        ext = "bin"
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in item_id)
    return f"{safe}-{hashlib.sha256(item_id.encode()).hexdigest()[:8]}.{ext}"


def write_labels(scan_dir: str | os.PathLike, labels_path: str | os.PathLike, config: dict, taxonomy) -> dict:
    """Write every row with a result as a PSA-VLM record to ``labels_path``.

    Image paths are relative to one image root, returned as ``image_root`` (train with
    ``data.image_root`` / ``--images`` set to it): the folder that holds every image file the
    scan read, and ``<labels stem>_images/`` beside the labels file, where the images stored
    inside the inputs (parquet, datasets, WebDataset, rendered FigStep) are written.
    Returns ``{"written", "skipped", "path", "image_root"}``.
    """
    from safevlm.data import load_records, write_psavlm_jsonl
    from safevlm.data.records import SafetyRecord, Turn
    from safevlm.scan.pipeline import options_from_config
    from safevlm.scan.sources import RECORD_FORMATS, enumerate_inputs, read_item

    scan_dir, labels_path = Path(scan_dir), Path(labels_path)
    options = options_from_config(config, out=str(scan_dir))
    listings = enumerate_inputs(options.inputs, options.format, options.images, options.prompt_field,
                                options.image_field)
    items = {it.id: it for li in listings for it in li.items}
    turns_of: dict[str, list] = {}
    for li in listings:  # conversation files: keep each record's own turns
        if li.format.partition(":")[0] in RECORD_FORMATS:
            report = load_records(li.input, format=li.format, image_root=options.images, check_images=False)
            ids = {it.record_location: it.id for it in li.items}
            for record in report.records:
                turns_of[ids.get(record.metadata.get("location"), record.id)] = record.turns
    image_dir = (labels_path.parent / f"{labels_path.stem}_images").resolve()
    chosen, skipped = [], 0
    for _, row in iter_rows(scan_dir / SCAN_FILE):
        label, item = label_of(row, taxonomy), items.get(row["id"])
        if label is None or item is None:
            skipped += 1
            continue
        chosen.append((row, item, label))
    files = [Path(item.path).resolve() for _, item, _ in chosen if item.kind == "file"]
    stored = any(item.kind not in ("file", "none") for _, item, _ in chosen)
    anchors = [str(f.parent) for f in files] + ([str(image_dir)] if stored else [])
    root = Path(os.path.commonpath(anchors)) if anchors else labels_path.parent.resolve()
    records = []
    for row, item, label in chosen:
        if item.kind == "file":
            image = Path(item.path).resolve().relative_to(root).as_posix()
        elif item.kind == "none":
            image = None
        else:
            data, _ = read_item(item)
            target = image_dir / _image_name(row["id"], data)
            image_dir.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            image = target.relative_to(root).as_posix()
        turns = turns_of.get(row["id"]) or [Turn("user", row.get("prompt") or "")]
        records.append(SafetyRecord(
            id=row["id"], image=image, turns=turns, risk_level=label[1], risk_type=label[0], source="scan",
            metadata={"needs_review": True, "scan_source": row.get("source"),
                      "scan": {k: row.get(k) for k in ("status", "action", "risk_score", "level_probs", "type_probs")}},
        ))
    written = write_psavlm_jsonl(records, labels_path, taxonomy=taxonomy)
    return {"written": written, "skipped": skipped, "path": str(labels_path), "image_root": str(root)}


__all__ = ["CLEANABLE_FORMATS", "cleanable_input", "label_of", "write_clean", "write_labels"]
