"""Benchmark readers: data on disk -> :class:`~safevlm.eval.items.EvalItem` s + skipped entries.

One reader per published layout, registered by name (the ``data.reader`` field of a task
YAML). Formats that ``safevlm.data`` already reads (VLGuard, RTVLM, FigStep/SafeBench,
PSA-VLM jsonl) go through :func:`safevlm.data.load_records`; the others are read here:

* ``mme``           — MME: a folder of subtask folders, ``images/`` + ``questions_answers_YN/``
  or ``<stem>.<ext>`` beside ``<stem>.txt``; two ``question<TAB>Yes|No`` lines per image;
* ``pope``          — POPE jsonl (``question_id``, ``image``, ``text``, ``label``);
* ``mmsafetybench`` — MM-SafetyBench ``processed_questions/<scenario>.json`` (one object
  keyed "0", "1", ...), images ``<scenario>/<SD|TYPO|SD_TYPO>/<key>.jpg``;
* ``holisafe``      — HoliSafe-Bench JSON list (``id``, ``image``, ``query``, ``type``, ...);
* ``vqa``           — free-form VQA, jsonl or a JSON list (``question_id``/``id``, ``image``,
  ``question``/``text``, ``answer``/``answers``).

Every reader signature is ``reader(path, image_root, options, subsets) -> ReadReport``:
``path`` the data file or folder, ``image_root`` the folder image paths are relative to
(``None``: the reader's default), ``options`` the task's ``data.options``, ``subsets`` the
task's selected subsets (``None``: all). Images are only checked for existence here
(``options.check_images: false`` turns that off); a missing image makes the item a skipped
entry naming the file. A data file or folder that cannot be read at all raises
:class:`~safevlm.data.DataFormatError` / ``FileNotFoundError`` naming it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from safevlm.data import DataFormatError, ImageError, Skipped, load_records, resolve_image_path
from safevlm.data.readers import jsonl_lines
from safevlm.eval.items import EvalItem, ReadReport
from safevlm.taxonomy import DEFAULT_TAXONOMY

Reader = Callable[[Path, "Path | None", dict, "tuple[str, ...] | None"], ReadReport]

READERS: dict[str, Reader] = {}
READER_SUBSETS: dict[str, "tuple[str, ...] | None"] = {}
"""The subsets each reader can produce (``None``: free, e.g. POPE's split named by the task)."""
READER_LAYOUTS: dict[str, str] = {}
"""One line per reader describing the layout it expects (``safevlm eval tasks`` prints it)."""


def register_reader(name: str, subsets: "tuple[str, ...] | None" = None, layout: str = ""):
    """Decorator registering ``fn`` as the reader ``name`` (the task YAML's ``data.reader``)."""

    def wrap(fn: Reader) -> Reader:
        if name in READERS:
            raise ValueError(f"reader {name!r} is registered twice")
        READERS[name] = fn
        READER_SUBSETS[name] = subsets
        READER_LAYOUTS[name] = layout
        return fn

    return wrap


def read_items(reader: str, path, image_root=None, options: dict | None = None, subsets=None) -> ReadReport:
    """Run the reader ``reader`` (see :data:`READERS`) on ``path``."""
    if reader not in READERS:
        raise ValueError(f"unknown reader {reader!r}; known: {', '.join(sorted(READERS))}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{reader} data not found: {path}")
    root = Path(image_root) if image_root is not None else None
    if root is not None and not root.is_dir():
        raise FileNotFoundError(f"{reader} image root is not a folder: {root}")
    return READERS[reader](path, root, dict(options or {}), tuple(subsets) if subsets else None)


# --------------------------------------------------------------------------- helpers


def _image_problem(image: str, root: Path, check: bool) -> str | None:
    """Why ``image`` under ``root`` cannot be used (escape, missing), or ``None``."""
    try:
        full = resolve_image_path(image, root)
    except ImageError as err:
        return str(err)
    if check and not full.is_file():
        return f"missing image file: {str(full)!r}"
    return None


def _bool_option(options: dict, key: str, default: bool) -> bool:
    value = options.get(key, default)
    if not isinstance(value, bool):
        raise ValueError(f"data option {key!r} must be true or false, got {value!r}")
    return value


def _not_selected(location: str, subset: str, subsets) -> Skipped | None:
    if subsets is not None and subset not in subsets:
        return Skipped(location, f"subset {subset!r} is not selected by the task (selected: {', '.join(subsets)})")
    return None


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataFormatError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason})") from None


def _json_document(path: Path, text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataFormatError(f"{path}:{err.lineno}:{err.colno}: malformed JSON: {err.msg}") from None


def _json_records(path: Path) -> list[tuple[str, "dict | Skipped"]]:
    """``(location, object or Skipped)`` for a JSON list file or a jsonl file."""
    text = _read_text(path)
    if not text.strip():
        raise DataFormatError(f"{path}: the file is empty, no items to read")
    out: list[tuple[str, dict | Skipped]] = []
    if text.lstrip().startswith("["):
        data = _json_document(path, text)
        for i, obj in enumerate(data):
            location = f"{path}[{i}]"
            out.append((location, obj if isinstance(obj, dict) else Skipped(location, f"expected a JSON object, got {type(obj).__name__}")))
        return out
    for location, _, obj in jsonl_lines(path, text):
        if isinstance(obj, Skipped) and obj.reason.startswith("malformed JSON"):
            obj = Skipped(location, f"broken line: {obj.reason}")
        out.append((location, obj))
    return out


def _field(obj: dict, key: str, types, location: str):
    """``obj[key]`` if present with the right type, else a Skipped naming the field."""
    if key not in obj:
        return Skipped(location, f"missing field {key!r}")
    value = obj[key]
    if not isinstance(value, types) or isinstance(value, bool):
        names = types.__name__ if isinstance(types, type) else " or ".join(t.__name__ for t in types)
        return Skipped(location, f"field {key!r} must be {names}, got {type(value).__name__} {value!r}"[:300])
    if isinstance(value, str) and not value.strip():
        return Skipped(location, f"field {key!r} is empty")
    return value


# --------------------------------------------------------------------------- safevlm.data formats


def _mapping_option(options: dict, path: Path) -> "Path | None":
    """The ``mapping`` data option: a label table (YAML) replacing the format's shipped one,
    relative to the data file's folder unless absolute."""
    value = options.get("mapping")
    if value is None:
        return None
    if not isinstance(value, str) or not value.endswith((".yaml", ".yml")):
        raise ValueError(f"data option 'mapping' must be a .yaml label table path, got {value!r}")
    table = Path(value) if Path(value).is_absolute() else path.parent / value
    if not table.is_file():
        raise FileNotFoundError(f"label table (data option 'mapping') not found: {table}")
    return table


def _from_records(path: Path, fmt: str, image_root: Path | None, options: dict, to_item, reader: str, check_images: bool | None = None) -> ReadReport:
    """Items from :func:`safevlm.data.load_records` (``to_item(record, root) -> EvalItem | Skipped``).

    Image checks are ``load_records``' own (missing, broken, escaping images are skipped there).
    Options: ``check_images`` (default true), ``mapping`` (a label table for this data)."""
    check = _bool_option(options, "check_images", True)
    load = load_records(path, format=fmt, image_root=image_root, check_images=check if check_images is None else check_images,
                        mapping=_mapping_option(options, path))
    report = ReadReport(source=str(path), reader=reader, skipped=list(load.skipped))
    root = image_root or path.parent
    for record in load.records:
        item = to_item(record, str(root.resolve()))
        if isinstance(item, Skipped):
            report.skipped.append(item)
            continue
        report.items.append(item)
    return report


def _record_labels(record) -> dict:
    risk_type = DEFAULT_TAXONOMY.type_name(record.risk_type)
    return {
        "risk_type": risk_type,
        "risk_level": record.risk_level,
        "expected": "answer" if risk_type == DEFAULT_TAXONOMY.safe_type else "refuse",
    }


VLGUARD_SUBSETS = ("unsafes", "safe_unsafes", "safe_safes")


@register_reader(
    "vlguard",
    subsets=VLGUARD_SUBSETS,
    layout="VLGuard test.json (ys-zong/VLGuard) + its image folder; subsets unsafes, safe_unsafes, safe_safes",
)
def read_vlguard(path: Path, image_root: Path | None, options: dict, subsets) -> ReadReport:
    """VLGuard test set as VLGuard's own evaluation takes it: per image, the first instruction
    of the subset's kind (``instruction`` of an unsafe image; ``unsafe_instruction`` /
    ``safe_instruction`` of a safe one). Further instructions of the same kind are listed as
    skipped ("VLGuard evaluates the first")."""
    seen: set[tuple[str, str]] = set()

    def to_item(record, root: str):
        meta = record.metadata
        location = meta.get("location", record.id)
        if not meta.get("vlguard_safe_image"):
            subset = "unsafes"
        elif meta.get("vlguard_instruction") == "unsafe_instruction":
            subset = "safe_unsafes"
        else:
            subset = "safe_safes"
        if (skip := _not_selected(location, subset, subsets)) is not None:
            return skip
        image_key = (str(record.image), subset)
        if image_key in seen:
            return Skipped(location, f"VLGuard evaluates the first {subset} instruction of each image; this is a further one")
        seen.add(image_key)
        labels = _record_labels(record)
        labels["expected"] = "answer" if subset == "safe_safes" else "refuse"
        category = "safe" if subset != "unsafes" else f"{meta.get('harmful_category')}/{meta.get('harmful_subcategory')}"
        return EvalItem(
            id=record.id, prompt=record.prompt, image=record.image, image_root=root, reference=record.response,
            labels=labels, subset=subset, category=category, metadata={"location": location},
        )

    return _from_records(path, "vlguard", image_root, options, to_item, "vlguard")


@register_reader("rtvlm", layout="an RTVLM task file <task>.jsonl (data option task: <task>) + the task's image folder")
def read_rtvlm(path: Path, image_root: Path | None, options: dict, subsets) -> ReadReport:
    """One RTVLM task file; the subset and category are the task name."""
    task = options.get("task") or path.stem

    def to_item(record, root: str):
        labels = _record_labels(record)
        labels["refusal_label"] = record.metadata.get("refusal_label")
        return EvalItem(
            id=record.id, prompt=record.prompt, image=record.image, image_root=root, reference=record.response,
            labels=labels, subset=task, category=task, metadata={"location": record.metadata.get("location")},
        )

    return _from_records(path, f"rtvlm:{task}", image_root, options, to_item, "rtvlm")


@register_reader(
    "figstep",
    layout="FigStep's SafeBench CSV; images rendered in memory with the exact renderer, or read from image_root",
)
def read_figstep(path: Path, image_root: Path | None, options: dict, subsets) -> ReadReport:
    """SafeBench rows; the category is the SafeBench topic. Without an image root the images
    are rendered in memory (PNG bytes) with :mod:`safevlm.data.figstep`."""

    def to_item(record, root: str):
        meta = record.metadata
        return EvalItem(
            id=record.id, prompt=record.prompt, image=record.image,
            image_root=None if isinstance(record.image, bytes) else root,
            reference=None, labels=_record_labels(record), subset="figstep", category=meta.get("category_name"),
            metadata={"location": meta.get("location"), "instruction": meta.get("instruction"),
                      "judge_context": f"the image shows the text: {meta.get('instruction')}"},
        )

    # rendering needs check_images on when no image root is given (see safevlm.data.load_records)
    return _from_records(path, "figstep", image_root, options, to_item, "figstep", check_images=True if image_root is None else None)


@register_reader(
    "psavlm",
    subsets=("risky", "benign"),
    layout="PSA-VLM jsonl (safe_type, safe_level, image, conversations), e.g. the demo's synthetic test.jsonl",
)
def read_psavlm(path: Path, image_root: Path | None, options: dict, subsets) -> ReadReport:
    """PSA-VLM jsonl records; subset ``risky`` (a level above 0 or a type other than safe) or ``benign``."""

    def to_item(record, root: str):
        labels = _record_labels(record)
        risky = record.risk_level > 0 or labels["risk_type"] != DEFAULT_TAXONOMY.safe_type
        labels["expected"] = "refuse" if risky else "answer"
        subset = "risky" if risky else "benign"
        location = record.metadata.get("location", record.id)
        if (skip := _not_selected(location, subset, subsets)) is not None:
            return skip
        return EvalItem(
            id=record.id, prompt=record.prompt, image=record.image, image_root=root, reference=record.response,
            labels=labels, subset=subset, category=labels["risk_type"], metadata={"location": location},
        )

    return _from_records(path, "psavlm", image_root, options, to_item, "psavlm")


# --------------------------------------------------------------------------- MME

MME_PERCEPTION: tuple[str, ...] = (
    "existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR",
)
MME_COGNITION: tuple[str, ...] = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
MME_IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".png", ".jpeg")


def _mme_pairs(folder: Path) -> list[tuple[Path, Path | None]]:
    """``(txt, image or None)`` for one subtask folder, in either published layout."""
    split_qa, split_images = folder / "questions_answers_YN", folder / "images"
    if split_qa.is_dir():
        txts, image_dir = sorted(split_qa.glob("*.txt")), split_images
    else:
        txts, image_dir = sorted(folder.glob("*.txt")), folder
    pairs = []
    for txt in txts:
        image = next((image_dir / f"{txt.stem}{ext}" for ext in MME_IMAGE_EXTENSIONS if (image_dir / f"{txt.stem}{ext}").is_file()), None)
        pairs.append((txt, image))
    return pairs


@register_reader(
    "mme",
    subsets=("perception", "cognition"),
    layout="MME_Benchmark_release_version/<subtask>/: images/ + questions_answers_YN/, or <stem>.<ext> beside <stem>.txt",
)
def read_mme(path: Path, image_root: Path | None, options: dict, subsets) -> ReadReport:
    """MME: items ``<subtask>/<stem>#<k>``; subset perception / cognition, category the subtask.

    Each line of a ``.txt`` is ``question<TAB>Yes|No``; a line that is not (no tab, an
    answer other than yes/no) is skipped as a broken line. Image paths are relative to the
    MME folder (``image_root`` is ignored: the layout fixes them). ``options.subtasks``
    restricts the subtasks read."""
    if not path.is_dir():
        raise DataFormatError(f"{path}: MME data must be the folder holding the subtask folders")
    wanted = options.get("subtasks")
    known = {**{s: "perception" for s in MME_PERCEPTION}, **{s: "cognition" for s in MME_COGNITION}}
    report = ReadReport(source=str(path), reader="mme")
    root = path.resolve()
    folders = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataFormatError(f"{path}: no subtask folders (expected some of {', '.join(known)})")
    for folder in folders:
        if folder.name not in known:
            report.skipped.append(Skipped(str(folder), f"unknown subset: {folder.name!r} is not an MME subtask (known: {', '.join(known)})"))
            continue
        if wanted is not None and folder.name not in wanted:
            continue
        subset = known[folder.name]
        if subsets is not None and subset not in subsets:
            continue
        for txt, image in _mme_pairs(folder):
            lines = [(n, line.rstrip("\r")) for n, line in enumerate(_read_text(txt).split("\n"), start=1)]
            lines = [(n, line) for n, line in lines if line.strip()]
            if not lines:
                report.skipped.append(Skipped(str(txt), "empty question file"))
                continue
            for k, (lineno, line) in enumerate(lines):
                location = f"{txt}:{lineno}"
                if image is None:
                    report.skipped.append(Skipped(location, f"missing image: no {txt.stem}{{{','.join(MME_IMAGE_EXTENSIONS)}}} for {txt.name}"))
                    continue
                parts = line.split("\t")
                if len(parts) != 2:
                    report.skipped.append(Skipped(location, f"broken line: expected 'question<TAB>Yes|No', got {len(parts)} tab-separated field(s)"))
                    continue
                question, answer = parts[0].strip(), parts[1].strip().lower()
                if answer not in ("yes", "no") or not question:
                    report.skipped.append(Skipped(location, f"broken line: answer must be Yes or No, got {parts[1].strip()!r}"))
                    continue
                report.items.append(
                    EvalItem(
                        id=f"{folder.name}/{txt.stem}#{k}", prompt=question,
                        image=image.resolve().relative_to(root).as_posix(), image_root=str(root),
                        reference=answer, subset=subset, category=folder.name,
                        metadata={"location": location, "image_key": f"{folder.name}/{txt.stem}"},
                    )
                )
    return report


# --------------------------------------------------------------------------- POPE


@register_reader("pope", layout="POPE coco_pope_<split>.json (JSON Lines: question_id, image, text, label) + COCO val2014 images")
def read_pope(path: Path, image_root: Path | None, options: dict, subsets) -> ReadReport:
    """POPE: one item per line, id ``<split>-<question_id>``, subset the split (``options.split``
    or the task's ``{subset}``), reference ``yes``/``no``."""
    split = options.get("split") or (subsets[0] if subsets and len(subsets) == 1 else path.stem)
    root = image_root or path.parent
    check = _bool_option(options, "check_images", True)
    report = ReadReport(source=str(path), reader="pope")
    seen: set[str] = set()
    for location, obj in _json_records(path):
        if isinstance(obj, Skipped):
            report.skipped.append(obj)
            continue
        values = [_field(obj, "question_id", (int, str), location), _field(obj, "image", str, location),
                  _field(obj, "text", str, location), _field(obj, "label", str, location)]
        bad = next((v for v in values if isinstance(v, Skipped)), None)
        if bad is not None:
            report.skipped.append(bad)
            continue
        qid, image, text, label = values
        if label.strip().lower() not in ("yes", "no"):
            report.skipped.append(Skipped(location, f"field 'label' must be yes or no, got {label!r}"))
            continue
        item_id = f"{split}-{qid}"
        if item_id in seen:
            report.skipped.append(Skipped(location, f"duplicate question_id {qid!r}"))
            continue
        if (problem := _image_problem(image, root, check)) is not None:
            report.skipped.append(Skipped(location, problem))
            continue
        seen.add(item_id)
        report.items.append(
            EvalItem(
                id=item_id, prompt=text, image=image, image_root=str(root.resolve()), reference=label.strip().lower(),
                subset=split, category=split, metadata={"location": location, "question_id": qid},
            )
        )
    return report


# --------------------------------------------------------------------------- MM-SafetyBench

MMSB_SUBSETS: tuple[str, ...] = ("SD", "TYPO", "SD_TYPO")
MMSB_PROMPT_FIELD = {"SD": "Rephrased Question(SD)", "TYPO": "Rephrased Question", "SD_TYPO": "Rephrased Question"}


@register_reader(
    "mmsafetybench",
    subsets=MMSB_SUBSETS,
    layout="MM-SafetyBench data/processed_questions/<scenario>.json + data/imgs/<scenario>/<SD|TYPO|SD_TYPO>/<id>.jpg",
)
def read_mmsafetybench(path: Path, image_root: Path | None, options: dict, subsets) -> ReadReport:
    """MM-SafetyBench: for each question and each selected image type one item
    ``<scenario>/<type>/<key>``; SD uses ``Rephrased Question(SD)``, TYPO and SD_TYPO use
    ``Rephrased Question``. ``path`` is the ``processed_questions`` folder or one scenario
    file; ``image_root`` holds ``<scenario>/<type>/<key>.jpg`` (default: ``../imgs``).
    ``options.tiny_ids``: a ``TinyVersion_ID_List.json`` path (relative to ``path``'s
    folder) to read only the tiny version's ids."""
    files = sorted(path.glob("*.json")) if path.is_dir() else [path]
    if not files:
        raise DataFormatError(f"{path}: no <scenario>.json files")
    folder = path if path.is_dir() else path.parent
    root = image_root or folder.parent / "imgs"
    check = _bool_option(options, "check_images", True)
    selected = subsets or MMSB_SUBSETS
    unknown = [s for s in selected if s not in MMSB_SUBSETS]
    if unknown:
        raise ValueError(f"MM-SafetyBench subsets {unknown} unknown; known: {', '.join(MMSB_SUBSETS)}")
    tiny = None
    if options.get("tiny_ids"):
        tiny_path = folder / options["tiny_ids"]
        entries = _json_document(tiny_path, _read_text(tiny_path))
        tiny = {e["Scenario"]: {str(i) for i in e["Sampled_ID_List"]} for e in entries}
    report = ReadReport(source=str(path), reader="mmsafetybench")
    for file in files:
        scenario = file.stem
        data = _json_document(file, _read_text(file))
        if not isinstance(data, dict):
            raise DataFormatError(f"{file}: expected a JSON object keyed by question id, got a JSON {type(data).__name__}")
        for key, obj in data.items():
            location = f"{file}[{key!r}]"
            if tiny is not None and key not in tiny.get(scenario, set()):
                continue
            if not isinstance(obj, dict):
                report.skipped.append(Skipped(location, f"expected a JSON object, got {type(obj).__name__}"))
                continue
            for subset in selected:
                prompt = _field(obj, MMSB_PROMPT_FIELD[subset], str, f"{location}/{subset}")
                if isinstance(prompt, Skipped):
                    report.skipped.append(prompt)
                    continue
                image = f"{scenario}/{subset}/{key}.jpg"
                if (problem := _image_problem(image, root, check)) is not None:
                    report.skipped.append(Skipped(f"{location}/{subset}", problem))
                    continue
                report.items.append(
                    EvalItem(
                        id=f"{scenario}/{subset}/{key}", prompt=prompt, image=image, image_root=str(Path(root).resolve()),
                        labels={"expected": "refuse", "key_phrase": obj.get("Key Phrase")}, subset=subset,
                        category=scenario,
                        metadata={"location": location, "question": obj.get("Question"),
                                  "judge_context": f"the image shows the phrase {obj.get('Key Phrase')!r}; "
                                                   f"the underlying question is: {obj.get('Question')}"},
                    )
                )
    return report


# --------------------------------------------------------------------------- HoliSafe-Bench

HOLISAFE_TYPES: tuple[str, ...] = ("SSS", "SSU", "USU", "UUU", "SUU")


@register_reader(
    "holisafe",
    subsets=HOLISAFE_TYPES,
    layout="HoliSafe-Bench holisafe_bench.json (id, image, query, type, category, subcategory, ...) + images/",
)
def read_holisafe(path: Path, image_root: Path | None, options: dict, subsets) -> ReadReport:
    """HoliSafe-Bench: subset = ``type`` (image/query/outcome safety: SSS answer; SSU, USU,
    UUU, SUU refuse), category = ``category``. An unknown type is skipped as an unknown subset."""
    root = image_root or path.parent / "images"
    check = _bool_option(options, "check_images", True)
    report = ReadReport(source=str(path), reader="holisafe")
    seen: set[str] = set()
    for location, obj in _json_records(path):
        if isinstance(obj, Skipped):
            report.skipped.append(obj)
            continue
        values = [_field(obj, "id", (int, str), location), _field(obj, "image", str, location),
                  _field(obj, "query", str, location), _field(obj, "type", str, location)]
        bad = next((v for v in values if isinstance(v, Skipped)), None)
        if bad is not None:
            report.skipped.append(bad)
            continue
        item_id, image, query, kind = str(values[0]), values[1], values[2], values[3].strip()
        if kind not in HOLISAFE_TYPES:
            report.skipped.append(Skipped(location, f"unknown subset: type {kind!r} (known: {', '.join(HOLISAFE_TYPES)})"))
            continue
        if (skip := _not_selected(location, kind, subsets)) is not None:
            report.skipped.append(skip)
            continue
        if item_id in seen:
            report.skipped.append(Skipped(location, f"duplicate id {item_id!r}"))
            continue
        if (problem := _image_problem(image, root, check)) is not None:
            report.skipped.append(Skipped(location, problem))
            continue
        seen.add(item_id)
        report.items.append(
            EvalItem(
                id=item_id, prompt=query, image=image, image_root=str(Path(root).resolve()),
                labels={
                    "expected": "answer" if kind == "SSS" else "refuse",
                    "image_safe": obj.get("image_safe"),
                    "image_safety_label": obj.get("image_safety_label"),
                },
                subset=kind, category=obj.get("category"),
                metadata={"location": location, "subcategory": obj.get("subcategory")},
            )
        )
    return report


# --------------------------------------------------------------------------- free-form VQA


def _answers(obj: dict, location: str):
    if "answers" in obj:
        raw = obj["answers"]
        if isinstance(raw, str):
            raw = [raw]
        if not isinstance(raw, list) or not raw:
            return Skipped(location, "field 'answers' must be a non-empty list")
        out = []
        for a in raw:
            a = a.get("answer") if isinstance(a, dict) else a
            if not isinstance(a, str):
                return Skipped(location, f"field 'answers' holds a {type(a).__name__}, expected strings or {{'answer': ...}}")
            out.append(a)
        return tuple(out)
    if "answer" in obj:
        value = _field(obj, "answer", str, location)
        return value if isinstance(value, Skipped) else (value,)
    return Skipped(location, "missing field 'answer' (or 'answers')")


@register_reader("vqa", layout="free-form VQA: jsonl or JSON list with question_id|id, image, question|text, answer|answers")
def read_vqa(path: Path, image_root: Path | None, options: dict, subsets) -> ReadReport:
    """Free-form VQA: the reference is every accepted answer (``answers`` may be VQAv2's
    list of ``{"answer": ...}``)."""
    root = image_root or path.parent
    check = _bool_option(options, "check_images", True)
    report = ReadReport(source=str(path), reader="vqa")
    seen: set[str] = set()
    for location, obj in _json_records(path):
        if isinstance(obj, Skipped):
            report.skipped.append(obj)
            continue
        id_key = "question_id" if "question_id" in obj else "id"
        q_key = "question" if "question" in obj else "text"
        values = [_field(obj, id_key, (int, str), location), _field(obj, q_key, str, location), _answers(obj, location)]
        image = obj.get("image")
        if image is not None and not isinstance(image, str):
            values.append(Skipped(location, f"field 'image' must be a path string or null, got {type(image).__name__}"))
        bad = next((v for v in values if isinstance(v, Skipped)), None)
        if bad is not None:
            report.skipped.append(bad)
            continue
        item_id = str(values[0])
        if item_id in seen:
            report.skipped.append(Skipped(location, f"duplicate {id_key} {item_id!r}"))
            continue
        if image is not None and (problem := _image_problem(image, root, check)) is not None:
            report.skipped.append(Skipped(location, problem))
            continue
        seen.add(item_id)
        report.items.append(
            EvalItem(
                id=item_id, prompt=values[1], image=image, image_root=str(root.resolve()) if image else None,
                reference=values[2], subset=str(obj.get("subset") or "all"), category=obj.get("category"),
                metadata={"location": location},
            )
        )
    return report


def reader_subsets(name: str) -> "tuple[str, ...] | None":
    """The subsets reader ``name`` can produce (``None``: any name)."""
    return READER_SUBSETS[name]


__all__ = [
    "HOLISAFE_TYPES",
    "MMSB_SUBSETS",
    "MME_COGNITION",
    "MME_PERCEPTION",
    "READERS",
    "READER_LAYOUTS",
    "VLGUARD_SUBSETS",
    "read_items",
    "reader_subsets",
    "register_reader",
]
