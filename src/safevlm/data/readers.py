"""Readers for published safety data formats, and :func:`load_records`.

Formats (``format=`` / ``--format``; auto-detected when omitted):

* ``psavlm``  — PSA-VLM jsonl: ``safe_type``, ``safe_level``, ``image``, ``conversations``
  with ``from: USER/ASSISTANT``;
* ``llava``   — LLaVA json list (or jsonl): ``conversations`` with ``from: human/gpt``;
  every sample is clean, (safe, 0);
* ``vlguard`` — VLGuard json list: safe / unsafe records with ``instr-resp`` lists;
* ``rtvlm``   — RTVLM task jsonl files; the task is the file name (``celebrity.jsonl``) or
  given as ``rtvlm:celebrity``;
* ``figstep`` — FigStep / SafeBench csv; each row's image is the FigStep rendering.

Every reader maps its source's labels through a YAML table in ``safevlm/data/mappings``.
A record that cannot be used becomes a :class:`~safevlm.data.records.Skipped` with its
location and reason; a file that cannot be read at all raises
:class:`~safevlm.data.records.DataFormatError` naming the file (and line and column).
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from safevlm.data import figstep
from safevlm.data.images import ImageError, check_image_path, decode_image, resolve_image_path
from safevlm.data.mappings import load_mapping, resolve_label
from safevlm.data.records import (
    IMAGE_PLACEHOLDER,
    DataFormatError,
    LoadReport,
    LoadWarning,
    SafetyRecord,
    Skipped,
    Turn,
)
from safevlm.taxonomy import DEFAULT_TAXONOMY, Taxonomy

FORMATS: tuple[str, ...] = ("figstep", "llava", "psavlm", "rtvlm", "vlguard")


class _Skip(Exception):
    """Raised inside a reader to skip one record with a reason."""


@dataclass
class _Context:
    path: Path
    taxonomy: Taxonomy
    image_root: Path | None
    check_images: bool
    mapping: dict
    task: str | None = None
    options: dict = field(default_factory=dict)
    figstep_font: str | None = None
    font_note: str | None = None  # set when FigStep images are rendered with another font


# --------------------------------------------------------------------------- file helpers


def read_text(path: Path) -> str:
    """File text (UTF-8, BOM removed); raises DataFormatError for empty or non-UTF-8 files."""
    raw = path.read_bytes()
    if not raw.strip():
        raise DataFormatError(f"{path}: the file is empty ({len(raw)} bytes), no records to load")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataFormatError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason})") from None
    if not text.strip():
        raise DataFormatError(f"{path}: the file holds only whitespace, no records to load")
    return text


def jsonl_lines(path: Path, text: str) -> Iterator[tuple[str, int, "dict | Skipped"]]:
    """``(location, line number, object or Skipped)`` per non-blank line of a jsonl text."""
    # split on "\n" only: JSON strings may contain U+2028 etc., which str.splitlines() splits on
    for lineno, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        location = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            yield location, lineno, Skipped(location, f"malformed JSON: {err.msg} (column {err.colno})")
            continue
        if not isinstance(obj, dict):
            yield location, lineno, Skipped(location, f"expected a JSON object, got {type(obj).__name__}")
            continue
        yield location, lineno, obj


def _json_list(path: Path, text: str) -> list:
    """The top-level JSON list of a ``.json`` file; DataFormatError with line:column otherwise."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataFormatError(f"{path}:{err.lineno}:{err.colno}: malformed JSON: {err.msg}") from None
    if not isinstance(data, list):
        raise DataFormatError(f"{path}: expected a JSON list of records, got a JSON {type(data).__name__}")
    return data


def _objects(path: Path, text: str) -> Iterator[tuple[str, int, "dict | Skipped"]]:
    """Records of a JSON list file or a jsonl file, as ``(location, index, object or Skipped)``."""
    if text.lstrip().startswith("["):
        for i, obj in enumerate(_json_list(path, text)):
            location = f"{path}[{i}]"
            if not isinstance(obj, dict):
                yield location, i, Skipped(location, f"expected a JSON object, got {type(obj).__name__}")
            else:
                yield location, i, obj
    else:
        yield from jsonl_lines(path, text)


# --------------------------------------------------------------------------- field helpers


def _require(obj: dict, key: str, types: type | tuple = object, what: str = ""):
    if key not in obj:
        raise _Skip(f"missing field {key!r}{what}")
    value = obj[key]
    if not isinstance(value, types):
        names = types.__name__ if isinstance(types, type) else " or ".join(t.__name__ for t in types)
        raise _Skip(f"field {key!r} must be {names}, got {type(value).__name__} {value!r}"[:300])
    return value


def _text(value, where: str) -> str:
    if not isinstance(value, str):
        raise _Skip(f"{where} must be a string, got {type(value).__name__}")
    return value


def _image_field(obj: dict, key: str = "image") -> str | None:
    value = _require(obj, key, (str, type(None)))
    if value is not None and not value.strip():
        raise _Skip(f"field {key!r} is an empty string")
    return value


def _conversation(obj: dict, roles: dict[str, str]) -> list[Turn]:
    """Turns from a LLaVA-style ``conversations`` list (``from`` / ``value``)."""
    conversations = _require(obj, "conversations", list)
    if not conversations:
        raise _Skip("field 'conversations' is empty")
    turns = []
    for j, message in enumerate(conversations):
        where = f"conversations[{j}]"
        if not isinstance(message, dict):
            raise _Skip(f"{where} must be an object with 'from' and 'value'")
        if "from" not in message or "value" not in message:
            missing = "from" if "from" not in message else "value"
            raise _Skip(f"missing field {where}.{missing!r}")
        speaker = str(message["from"]).strip()
        role = roles.get(speaker.lower())
        if role is None:
            raise _Skip(f"{where}.from {speaker!r} is not a known speaker (known: {', '.join(sorted(roles))})")
        turns.append(Turn(role, _text(message["value"], f"{where}.value")))
    if not any(t.role == "user" for t in turns):
        raise _Skip("the conversation has no user turn")
    return turns


def _label(entry: dict, ctx: _Context, where: str) -> tuple[int, int]:
    try:
        return resolve_label(entry, ctx.taxonomy, where)
    except ValueError as err:  # a broken table is the table's fault, not the record's
        raise DataFormatError(str(err)) from None


# --------------------------------------------------------------------------- readers


def _read_psavlm(ctx: _Context, text: str) -> Iterator[tuple[str, "SafetyRecord | Skipped"]]:
    types = {str(k): v for k, v in ctx.mapping["types"].items()}
    roles = {str(k).lower(): v for k, v in ctx.mapping["roles"].items()}
    for location, index, obj in _objects(ctx.path, text):
        if isinstance(obj, Skipped):
            yield location, obj
            continue
        try:
            turns = _conversation(obj, roles)
            image = _image_field(obj)
            raw_type = _require(obj, "safe_type", (int, str))
            raw_level = _require(obj, "safe_level", (int, str))
            type_name = types.get(str(raw_type).strip(), str(raw_type).strip())
            if isinstance(raw_type, bool) or type_name not in ctx.taxonomy.type_names:
                raise _Skip(
                    f"unknown safe_type {raw_type!r} (known: {', '.join(f'{k}={v}' for k, v in types.items())})"
                )
            try:
                level = ctx.taxonomy.level_id(raw_level)
            except ValueError as err:
                raise _Skip(f"unknown safe_level {raw_level!r}: {err}") from None
            metadata = dict(obj.get("metadata") or {})
            metadata.update({"location": location, "safe_type": raw_type, "safe_level": raw_level})
            yield (
                location,
                SafetyRecord(
                    id=str(obj.get("id", f"{ctx.path.stem}-{index}")),
                    image=image,
                    turns=turns,
                    risk_level=level,
                    risk_type=ctx.taxonomy.type_id(type_name),
                    source=str(obj.get("source", "psavlm")),
                    metadata=metadata,
                ),
            )
        except _Skip as skip:
            yield location, Skipped(location, str(skip))


def _read_llava(ctx: _Context, text: str) -> Iterator[tuple[str, "SafetyRecord | Skipped"]]:
    risk_type, risk_level = _label(ctx.mapping["label"], ctx, "llava:label")
    roles = {str(k).lower(): v for k, v in ctx.mapping["roles"].items()}
    for location, index, obj in _objects(ctx.path, text):
        if isinstance(obj, Skipped):
            yield location, obj
            continue
        try:
            turns = _conversation(obj, roles)
            image = _image_field(obj) if "image" in obj else None
            yield (
                location,
                SafetyRecord(
                    id=str(obj.get("id", f"{ctx.path.stem}-{index}")),
                    image=image,
                    turns=turns,
                    risk_level=risk_level,
                    risk_type=risk_type,
                    source="llava",
                    metadata={"location": location},
                ),
            )
        except _Skip as skip:
            yield location, Skipped(location, str(skip))


def _vlguard_unsafe_label(obj: dict, ctx: _Context) -> tuple[tuple[int, int], dict]:
    category = str(_require(obj, "harmful_category", str)).strip()
    subcategory = str(_require(obj, "harmful_subcategory", str)).strip()
    table = ctx.mapping["unsafe"]
    for key in (f"{category}/{subcategory}", f"{category}/*"):
        if key in table:
            return _label(table[key], ctx, f"vlguard:unsafe/{key}"), {
                "harmful_category": category,
                "harmful_subcategory": subcategory,
            }
    raise _Skip(f"unknown VLGuard category {category}/{subcategory!s} (known: {', '.join(sorted(table))})")


def _read_vlguard(ctx: _Context, text: str) -> Iterator[tuple[str, "SafetyRecord | Skipped"]]:
    safe_label = _label(ctx.mapping["safe"], ctx, "vlguard:safe")
    pair_label = _label(ctx.mapping["safe_image_unsafe_instruction"], ctx, "vlguard:safe_image_unsafe_instruction")
    for location, index, obj in _objects(ctx.path, text):
        if isinstance(obj, Skipped):
            yield location, obj
            continue
        try:
            image = _image_field(obj)
            is_safe = _require(obj, "safe", bool)
            pairs = _require(obj, "instr-resp", list)
            if not pairs:
                raise _Skip("field 'instr-resp' is empty")
            base_id = str(obj.get("id", f"{ctx.path.stem}-{index}"))
            unsafe_label, unsafe_meta = (None, {}) if is_safe else _vlguard_unsafe_label(obj, ctx)
        except _Skip as skip:
            yield location, Skipped(location, str(skip))
            continue
        entry_ids: set[str] = set()
        for j, pair in enumerate(pairs):
            item_location = f"{location}.instr-resp[{j}]"
            try:
                if not isinstance(pair, dict):
                    raise _Skip("expected an object with an instruction and a response")
                metadata = {"location": item_location, "vlguard_safe_image": is_safe, **unsafe_meta}
                if is_safe:
                    if "safe_instruction" in pair:
                        key, (risk_type, risk_level), text_risk = "safe_instruction", safe_label, False
                    elif "unsafe_instruction" in pair:
                        key, (risk_type, risk_level), text_risk = "unsafe_instruction", pair_label, True
                    else:
                        raise _Skip("missing field 'safe_instruction' or 'unsafe_instruction'")
                    record_id = f"{base_id}:safe" if key == "safe_instruction" else f"{base_id}:unsafe"
                else:
                    key, (risk_type, risk_level), text_risk = "instruction", unsafe_label, False
                    record_id = base_id
                if record_id in entry_ids:  # several instructions of one kind: number them
                    record_id = f"{record_id}#{j}"
                entry_ids.add(record_id)
                # text_risk: the instruction is risky while the image is safe
                metadata.update({"vlguard_instruction": key, "text_risk": text_risk})
                instruction = _text(_require(pair, key), f"instr-resp[{j}].{key}")
                response = _text(_require(pair, "response"), f"instr-resp[{j}].response")
                yield (
                    item_location,
                    SafetyRecord(
                        id=record_id,
                        image=image,
                        turns=[Turn("user", instruction), Turn("assistant", response)],
                        risk_level=risk_level,
                        risk_type=risk_type,
                        source="vlguard",
                        metadata=metadata,
                    ),
                )
            except _Skip as skip:
                yield item_location, Skipped(item_location, str(skip))


def _as_list(value, n: int, key: str) -> list:
    if isinstance(value, list):
        if len(value) != n:
            raise _Skip(f"field {key!r} has {len(value)} items but the prompt field has {n}")
        return value
    return [value] * n


def _read_rtvlm(ctx: _Context, text: str) -> Iterator[tuple[str, "SafetyRecord | Skipped"]]:
    tasks = ctx.mapping["tasks"]
    task = ctx.task or ctx.path.stem
    if task not in tasks:
        raise DataFormatError(
            f"{ctx.path}: unknown RTVLM task {task!r}; name the file after its task or pass "
            f"--format rtvlm:<task>, one of {', '.join(sorted(tasks))}"
        )
    spec = tasks[task]
    risk_type = _label({"type": spec["type"], "level": 0}, ctx, f"rtvlm:tasks/{task}")[0]
    refusal_levels = ctx.mapping["refusal_levels"]
    min_level = int(ctx.mapping.get("min_level", 0))
    for location, lineno, obj in jsonl_lines(ctx.path, text):
        if isinstance(obj, Skipped):
            yield location, obj
            continue
        try:
            prompts = _require(obj, spec["prompt"], (str, list))
            n = len(prompts) if isinstance(prompts, list) else 1
            if n == 0:
                raise _Skip(f"field {spec['prompt']!r} is an empty list")
            prompts = _as_list(prompts, n, spec["prompt"])
            answers = _as_list(obj.get(spec["answer"]), n, spec["answer"])
            if "level" in spec:
                labels = [None] * n
            else:
                labels = _as_list(_require(obj, spec["refusal"], (str, list)), n, spec["refusal"])
            try:
                image = spec["image"].format_map({**obj, "line": lineno - 1})
            except KeyError as err:
                raise _Skip(f"missing field {err.args[0]!r} (needed for the image name {spec['image']!r})") from None
            except (IndexError, ValueError, AttributeError) as err:
                raise _Skip(f"cannot build the image name {spec['image']!r}: {err}") from None
            extra = {k: v for k, v in obj.items() if k not in (spec["prompt"], spec["answer"], spec.get("refusal"))}
        except _Skip as skip:
            yield location, Skipped(location, str(skip))
            continue
        for q in range(n):
            item_location = location if n == 1 else f"{location}#q{q}"
            try:
                prompt = _text(prompts[q], f"{spec['prompt']}[{q}]" if n > 1 else spec["prompt"])
                if labels[q] is None:
                    level = int(spec["level"])
                elif labels[q] in refusal_levels:
                    level = max(int(refusal_levels[labels[q]]), min_level)
                else:
                    raise _Skip(f"unknown refusal label {labels[q]!r} (known: {', '.join(refusal_levels)})")
                turns = [Turn("user", prompt)]
                if answers[q] is not None:
                    turns.append(Turn("assistant", _text(answers[q], f"{spec['answer']}")))
                metadata = {"location": item_location, "task": task, "refusal_label": labels[q]}
                metadata.update(
                    {k: (v[q] if isinstance(v, list) and len(v) == n and n > 1 else v) for k, v in extra.items()}
                )
                yield (
                    item_location,
                    SafetyRecord(
                        id=f"{task}-{lineno - 1}" + (f"#q{q}" if n > 1 else ""),
                        image=image,
                        turns=turns,
                        risk_level=level,
                        risk_type=risk_type,
                        source="rtvlm",
                        metadata=metadata,
                    ),
                )
            except _Skip as skip:
                yield item_location, Skipped(item_location, str(skip))


def _read_figstep(ctx: _Context, text: str) -> Iterator[tuple[str, "SafetyRecord | Skipped"]]:
    categories = ctx.mapping["categories"]
    reader = csv.DictReader(io.StringIO(text, newline=""))
    missing = [c for c in (*figstep.REQUIRED_COLUMNS, "category_name") if c not in (reader.fieldnames or [])]
    if missing:
        raise DataFormatError(f"{ctx.path}: missing column(s) {', '.join(missing)}; found {reader.fieldnames}")
    render = ctx.image_root is None and ctx.check_images
    font = None
    if render:
        try:
            font = figstep.load_figstep_font(font_path=ctx.figstep_font)
        except figstep.FigStepFontError as err:
            raise figstep.FigStepFontError(
                f"{ctx.path}: cannot render its FigStep images: {err}; or give pre-rendered images (--images DIR)"
            ) from None
        if not figstep.is_figstep_font(font):
            ctx.font_note = f"FigStep images rendered with {figstep.describe_font(font)}"
    for row in reader:
        location = f"{ctx.path}:{reader.line_num}"
        try:
            if None in row:
                raise _Skip(
                    f"the row has {len(reader.fieldnames) + len(row[None])} fields, the header {len(reader.fieldnames)}"
                )
            for col in ("category_id", "task_id", "category_name", "instruction", "dataset"):
                if row.get(col) is None or not str(row[col]).strip():
                    raise _Skip(f"missing field {col!r}")
            for col in ("category_id", "task_id"):
                if not row[col].strip().isdigit():
                    raise _Skip(f"field {col!r} must be an integer, got {row[col]!r}")
            name = row["category_name"].strip()
            if name not in categories:
                raise _Skip(f"unknown SafeBench category {name!r} (known: {', '.join(categories)})")
            entry = categories[name]
            if int(row["category_id"]) != int(entry["id"]):
                raise _Skip(f"category_id {row['category_id']} does not match {name!r} (id {entry['id']})")
            risk_type, risk_level = _label(entry, ctx, f"safebench:categories/{name}")
            image_name = figstep.figstep_image_name(row["dataset"].strip(), row["category_id"], row["task_id"])
            image = figstep.render_figstep_png(row["instruction"], font) if render else image_name
            metadata = {
                "location": location,
                "dataset": row["dataset"].strip(),
                "category_id": int(row["category_id"]),
                "task_id": int(row["task_id"]),
                "category_name": name,
                "question": row.get("question"),
                "instruction": row["instruction"],
                "image_name": image_name,
            }
            yield (
                location,
                SafetyRecord(
                    id=f"{row['dataset'].strip()}_{int(row['category_id'])}_{int(row['task_id'])}",
                    image=image,
                    turns=[Turn("user", figstep.FIGSTEP_PROMPT)],
                    risk_level=risk_level,
                    risk_type=risk_type,
                    source="figstep",
                    metadata=metadata,
                ),
            )
        except _Skip as skip:
            yield location, Skipped(location, str(skip))


_READERS = {
    "figstep": (_read_figstep, "safebench"),
    "llava": (_read_llava, "llava"),
    "psavlm": (_read_psavlm, "psavlm"),
    "rtvlm": (_read_rtvlm, "rtvlm"),
    "vlguard": (_read_vlguard, "vlguard"),
}


# --------------------------------------------------------------------------- detection


def _first_objects(path: Path, text: str, limit: int = 20) -> tuple[list[dict], str | None]:
    """Up to ``limit`` JSON objects from the start of a JSON list or jsonl text, and the first
    JSON syntax error seen (``"file:line:column: malformed JSON: ..."``), or None."""
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            return [], f"{path}:{err.lineno}:{err.colno}: malformed JSON: {err.msg}"
        return ([o for o in data[:limit] if isinstance(o, dict)] if isinstance(data, list) else []), None
    found, first_error = [], None
    for lineno, line in enumerate(text.split("\n"), start=1):
        if len(found) >= limit:
            break
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            first_error = first_error or f"{path}:{lineno}:{err.colno}: malformed JSON: {err.msg}"
            continue
        if isinstance(obj, dict):
            found.append(obj)
    return found, first_error


def detect_format(path: "str | os.PathLike", text: str | None = None) -> str:
    """Guess the format of a data file from its name and first records.

    Returns one of :data:`FORMATS` (``"rtvlm"`` for RTVLM task files); raises
    :class:`DataFormatError` explaining what was seen when no format fits.
    """
    path = Path(path)
    text = read_text(path) if text is None else text
    if path.suffix.lower() == ".csv":
        header = text.split("\n", 1)[0]
        if "instruction" in header and "category_name" in header:
            return "figstep"
        raise DataFormatError(f"{path}: a CSV without FigStep/SafeBench columns (header: {header.strip()[:200]!r})")
    objects, json_error = _first_objects(path, text)
    if not objects:
        if json_error:  # the file is broken: say where, before anything about formats
            raise DataFormatError(f"{json_error} (so the format cannot be detected)")
        raise DataFormatError(
            f"{path}: cannot detect the format: no JSON record found in the first lines; "
            f"pass --format, one of {', '.join(FORMATS)}"
        )
    keys = set().union(*(o.keys() for o in objects))
    if "instr-resp" in keys:
        return "vlguard"
    if "safe_type" in keys or "safe_level" in keys:
        return "psavlm"
    if "conversations" in keys:
        return "llava"
    if path.stem in load_mapping("rtvlm")["tasks"]:
        return "rtvlm"
    raise DataFormatError(
        f"{path}: cannot detect the format from keys {sorted(keys)[:12]}; pass --format, one of "
        f"{', '.join(FORMATS)} (RTVLM files are recognised by their task file name, or use rtvlm:<task>)"
    )


# --------------------------------------------------------------------------- loading


def _check_image(record: SafetyRecord, ctx: _Context, cache: dict) -> str | None:
    """Reason the record's image is unusable, or None. Decodes images when checks are on."""
    image = record.image
    if image is None:
        return None
    try:
        if isinstance(image, str):
            check_image_path(image)
            if not ctx.check_images:
                return None
            key = resolve_image_path(image, ctx.image_root or ctx.path.parent)
        else:
            if not ctx.check_images:
                return None
            key = image
        if key not in cache:
            try:
                decode_image(key)
                cache[key] = None
            except ImageError as err:
                cache[key] = str(err)
        return cache[key]
    except ImageError as err:
        return str(err)


def load_records(
    path: "str | os.PathLike",
    format: str | None = None,
    image_root: "str | os.PathLike | None" = None,
    check_images: bool = True,
    taxonomy: Taxonomy = DEFAULT_TAXONOMY,
    mapping: "str | os.PathLike | None" = None,
    num_workers: int = 4,
    figstep_font: "str | os.PathLike | None" = None,
) -> LoadReport:
    """Load a dataset file into :class:`SafetyRecord` s, skipping (never dropping) bad records.

    Args:
        path: the data file.
        format: one of :data:`FORMATS` (``"rtvlm:<task>"`` names an RTVLM task); detected when ``None``.
        image_root: directory image paths are relative to; default: the data file's folder.
            For FigStep CSVs, ``None`` means "render the images in memory" (PNG bytes).
        check_images: open and decode every image (missing, empty, truncated, non-image,
            decompression bombs are skipped with the reason). Root escapes (absolute paths,
            ``..``) are refused either way.
        taxonomy: the risk taxonomy the labels are mapped into.
        mapping: a YAML table to use instead of the shipped one for this format.
        num_workers: threads decoding images when ``check_images`` is on.
        figstep_font: a font file to render FigStep images with instead of FreeMonoBold (a
            warning in the report says the images then differ from FigStep's).

    Returns:
        a :class:`LoadReport`; ``report.loaded + len(report.skipped) == report.total``.
        ``report.warnings`` lists loaded records whose label contradicts itself (the safe
        type with a risky level, a risky type with level 0).

    Raises:
        FileNotFoundError: no such file. DataFormatError (a ValueError): the file as a whole
        cannot be read (empty, not UTF-8, malformed JSON document, unknown format).
        FigStepFontError: FigStep images to render and FreeMonoBold (or ``figstep_font``) missing.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such data file: {path}")
    if not path.is_file():
        raise DataFormatError(f"{path} is not a file")
    text = read_text(path)
    fmt, _, task = (format or detect_format(path, text)).partition(":")
    if fmt not in _READERS:
        raise DataFormatError(f"unknown format {format!r}; known: {', '.join(FORMATS)} (and rtvlm:<task>)")
    reader, table = _READERS[fmt]
    if image_root is not None and not Path(image_root).is_dir():
        raise FileNotFoundError(f"image root is not a directory: {image_root}")
    ctx = _Context(
        path=path,
        taxonomy=taxonomy,
        image_root=Path(image_root) if image_root is not None else None,
        check_images=check_images,
        mapping=load_mapping(mapping if mapping is not None else table),
        task=task or None,
        figstep_font=None if figstep_font is None else str(figstep_font),
    )
    report = LoadReport(path=str(path), format=fmt if not task else f"{fmt}:{task}", taxonomy=taxonomy)
    items = list(reader(ctx, text))

    candidates = [(loc, item) for loc, item in items if isinstance(item, SafetyRecord)]
    cache: dict = {}
    if check_images and num_workers > 1 and len(candidates) > 1:
        # decode distinct images in parallel (Pillow releases the GIL while decoding)
        def warm(record: SafetyRecord) -> None:
            _check_image(record, ctx, cache)

        unique = {}
        for _, record in candidates:
            key = record.image if isinstance(record.image, bytes) else f"path:{record.image}"
            unique.setdefault(key, record)
        with ThreadPoolExecutor(max_workers=num_workers) as pool:
            list(pool.map(warm, unique.values()))

    seen: dict[str, str] = {}
    for location, item in items:
        if isinstance(item, Skipped):
            report.skipped.append(item)
            continue
        record = item
        reason = None
        if record.risk_type >= taxonomy.num_types or record.risk_level >= taxonomy.num_levels:
            reason = f"label (type {record.risk_type}, level {record.risk_level}) is outside the taxonomy"
        elif record.id in seen:
            reason = f"duplicate id {record.id!r} (first at {seen[record.id]})"
        else:
            reason = _check_image(record, ctx, cache)
        if reason is not None:
            report.skipped.append(Skipped(location, reason))
            continue
        seen[record.id] = location
        report.records.append(record)
        contradiction = _label_contradiction(record, taxonomy)
        if contradiction:
            report.warnings.append(LoadWarning(location, contradiction))
    if ctx.font_note:
        report.warnings.insert(0, LoadWarning(str(path), ctx.font_note))
    return report


def _label_contradiction(record: SafetyRecord, taxonomy: Taxonomy) -> str | None:
    """Why a record's (type, level) contradicts itself, or None: the safe type goes with level 0
    only, and a risky type with a level above 0."""
    safe = record.risk_type == taxonomy.safe_type_id
    if safe == (record.risk_level == 0):
        return None
    type_name, level_name = taxonomy.type_names[record.risk_type], taxonomy.level_names[record.risk_level]
    if safe:
        return f"contradictory label: type {type_name!r} (no risk) with risk level {record.risk_level} ({level_name})"
    return f"contradictory label: risk type {type_name!r} with risk level 0 ({level_name})"


# --------------------------------------------------------------------------- writing


def _psavlm_type(record: SafetyRecord, taxonomy: Taxonomy, inverse: dict[str, int]) -> "int | str":
    name = taxonomy.type_name(record.risk_type)
    return inverse.get(name, name)


def write_psavlm_jsonl(
    records,
    path: "str | os.PathLike",
    image_dir: "str | os.PathLike | None" = None,
    taxonomy: Taxonomy = DEFAULT_TAXONOMY,
) -> int:
    """Write records as PSA-VLM jsonl (readable back with ``format="psavlm"``); returns the count.

    Each line holds ``id``, ``image`` (relative path), ``safe_type`` (PSA-VLM's integer when
    the type is one of its seven, else the type name), ``safe_level``, ``conversations``
    (``from: USER/ASSISTANT/SYSTEM``; ``<image>\\n`` is put before the first user text when
    the record has an image and no placeholder), ``source`` and ``metadata``. Records whose
    image is bytes need ``image_dir``: the bytes are written there and referenced relative to
    the jsonl file's folder. The file is written atomically.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    inverse = {v: int(k) for k, v in load_mapping("psavlm")["types"].items()}
    speakers = {"user": "USER", "assistant": "ASSISTANT", "system": "SYSTEM"}
    tmp = path.with_name(path.name + ".tmp")
    count = 0
    with open(tmp, "w", encoding="utf-8") as fh:
        for record in records:
            image = record.image
            if isinstance(image, bytes):
                if image_dir is None:
                    raise ValueError(f"record {record.id!r} holds image bytes; pass image_dir= to write them as files")
                image = _write_image_bytes(record, Path(image_dir), path.parent)
            conversations, placed = [], False
            for turn in record.turns:
                text = turn.text
                if turn.role == "user" and not placed:
                    placed = True
                    if image is not None and IMAGE_PLACEHOLDER not in text:
                        text = f"{IMAGE_PLACEHOLDER}\n{text}"
                conversations.append({"from": speakers[turn.role], "value": text})
            line = {
                "id": record.id,
                "image": image,
                "safe_type": _psavlm_type(record, taxonomy, inverse),
                "safe_level": record.risk_level,
                "conversations": conversations,
                "source": record.source,
                "metadata": record.metadata,
            }
            try:
                fh.write(json.dumps(line, ensure_ascii=False) + "\n")
            except TypeError as err:
                raise ValueError(f"record {record.id!r}: metadata is not JSON-serialisable ({err})") from None
            count += 1
    os.replace(tmp, path)
    return count


def _write_image_bytes(record: SafetyRecord, image_dir: Path, base: Path) -> str:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(record.image)) as img:
            ext = (img.format or "png").lower().replace("jpeg", "jpg")
    except Exception:
        raise ValueError(f"record {record.id!r}: image bytes are not a readable image") from None
    image_dir.mkdir(parents=True, exist_ok=True)
    safe_id = "".join(c if c.isalnum() or c in "-_." else "_" for c in record.id)
    target = image_dir / f"{safe_id}.{ext}"
    target.write_bytes(record.image)
    return Path(os.path.relpath(target.resolve(), base.resolve())).as_posix()


__all__ = ["FORMATS", "detect_format", "jsonl_lines", "load_records", "read_text", "write_psavlm_jsonl"]
