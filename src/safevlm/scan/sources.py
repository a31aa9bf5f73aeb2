"""What a scan reads: every input becomes a list of :class:`Item` s, in a fixed order.

Formats (``--format``; detected from the path when omitted):

* ``images``     — an image file, or a folder of them (recursive, sorted; hidden files and
  folders left out; files whose name does not end in an image suffix are counted as
  ``ignored_files``, not scanned);
* ``llava``, ``psavlm``, ``vlguard``, ``rtvlm[:task]``, ``figstep`` — any file
  ``safevlm data`` reads (:func:`safevlm.data.load_records`); the prompt is the record's first
  user turn, images are resolved under ``--images`` (default: the file's folder);
* ``parquet``    — a ``.parquet`` file or a folder of them, with an image column (raw bytes,
  or a Hugging Face ``{bytes, path}`` struct);
* ``hf``         — a Hugging Face ``datasets`` folder written by ``save_to_disk``;
* ``webdataset`` — a ``.tar`` shard or a folder of them (LAION layout: ``KEY.jpg`` beside
  ``KEY.txt`` / ``KEY.json``); one item per key.

An item's ``id`` is unique within a scan (see :func:`enumerate_inputs`) and its ``index`` is
its position over all inputs: ``--shard I/N`` takes the items with ``index % N == I``.
Reading an item's bytes (:func:`read_item`) happens later, in the DataLoader workers.
"""

from __future__ import annotations

import glob
import os
import re
import tarfile
from dataclasses import dataclass, field, replace
from pathlib import Path

from safevlm.data.images import IMAGE_SUFFIXES, ImageError, resolve_image_path
from safevlm.errors import UsageError

RECORD_FORMATS: tuple[str, ...] = ("figstep", "llava", "psavlm", "rtvlm", "vlguard")
INPUT_FORMATS: tuple[str, ...] = ("images", *RECORD_FORMATS, "parquet", "hf", "webdataset")
FORMATS_HELP = "images, llava, psavlm, vlguard, rtvlm[:task], figstep, parquet, hf, webdataset"
IMAGE_COLUMNS: tuple[str, ...] = ("image", "img", "jpg", "jpeg", "png", "webp", "image_bytes")
WEBDATASET_IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
ID_SEPARATOR = "::"


class ScanInputError(UsageError):
    """An input that cannot be scanned at all (unknown format, no image column...)."""


@dataclass(frozen=True)
class Item:
    """One thing to scan: an image (with a prompt, or none), or a prompt alone.

    ``kind`` says where the image bytes are: ``file`` (``path``), ``bytes`` (``data``),
    ``tar`` (``size`` bytes at ``offset`` of the tar file ``path``), ``parquet`` / ``hf``
    (row ``offset`` of ``path``), ``none`` (text only). ``error`` is set for an item known to
    be unusable before reading (a skipped record, an image path that leaves the root).
    ``prompt_ref``: where a per-item prompt is read from (tar member offset and size, or a
    column name) when it is not known yet.
    """

    index: int
    id: str
    input: str
    source: str
    kind: str
    path: str | None = None
    offset: int = 0
    size: int = 0
    data: bytes | None = field(default=None, repr=False)
    prompt: str | None = None
    prompt_ref: tuple | None = None
    image_field: str | None = None
    error: tuple[str, str] | None = None  # (reason, message)
    record_location: str | None = None


@dataclass
class InputListing:
    """The items of one input, in order, and what was left out (``ignored`` file paths)."""

    input: str
    format: str
    items: list[Item]
    ignored: list[str] = field(default_factory=list)


# -- detection ------------------------------------------------------------------------------------
def _is_image_name(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_SUFFIXES


def detect_input_format(path: str) -> str:
    """The format of an input path (see the module docstring); ScanInputError if none fits."""
    from safevlm.data import detect_format
    from safevlm.data.records import DataFormatError

    p = Path(path)
    if p.is_dir():
        if (p / "dataset_dict.json").is_file():
            splits = sorted(d.name for d in p.iterdir() if d.is_dir())
            raise ScanInputError(f"{path} is a DatasetDict folder; give one split folder, e.g. {path}/{splits[0] if splits else 'train'}")
        if (p / "state.json").is_file() and (p / "dataset_info.json").is_file():
            return "hf"
        top = [f for f in p.iterdir() if f.is_file()]
        if any(f.suffix == ".tar" for f in top):
            return "webdataset"
        if any(f.suffix == ".parquet" for f in top):
            return "parquet"
        return "images"
    if not p.exists():
        raise FileNotFoundError(f"--input {path!r}: no such file or folder")
    suffix = p.suffix.lower()
    if suffix == ".parquet":
        return "parquet"
    if suffix == ".tar":
        return "webdataset"
    if suffix in IMAGE_SUFFIXES:
        return "images"
    if suffix in (".json", ".jsonl", ".csv"):
        try:
            return detect_format(p)
        except DataFormatError as err:
            raise ScanInputError(f"--input {path!r}: {err}") from None
    raise ScanInputError(
        f"--input {path!r}: cannot tell its format from the name; pass --format, one of {FORMATS_HELP}"
    )


def _expand(spec: str) -> list[str]:
    """An input as given, or the sorted files a glob pattern matches."""
    if not os.path.exists(spec) and any(c in spec for c in "*?["):
        matches = sorted(m for m in glob.glob(spec, recursive=True) if os.path.isfile(m))
        if not matches:
            raise FileNotFoundError(f"--input {spec!r}: no file matches the pattern")
        return matches
    if not os.path.exists(spec):
        raise FileNotFoundError(f"--input {spec!r}: no such file or folder")
    return [spec]


# -- listing per format ------------------------------------------------------------------------------
def _list_images(spec: str) -> InputListing:
    root = Path(spec)
    if root.is_file():
        return InputListing(spec, "images", [Item(0, root.name, spec, spec, "file", path=spec)])
    items, ignored = [], []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            full = os.path.join(folder, name)
            rel = Path(os.path.relpath(full, root)).as_posix()
            if _is_image_name(name):
                items.append(Item(0, rel, spec, full, "file", path=full))
            else:
                ignored.append(full)
    return InputListing(spec, "images", items, ignored)


def _list_records(spec: str, fmt: str, image_root: str | None) -> InputListing:
    from safevlm.data import load_records
    from safevlm.data.records import SafetyRecord

    path = Path(spec)
    render = fmt.startswith("figstep") and image_root is None  # FigStep images rendered in memory
    report = load_records(path, format=fmt, image_root=image_root, check_images=render)
    root = Path(image_root) if image_root is not None else path.parent
    located: list[tuple[str, object]] = [(r.metadata.get("location", r.id), r) for r in report.records]
    located += [(s.location, s) for s in report.skipped]
    prefix = len(str(path))
    located.sort(key=lambda pair: [int(n) for n in re.findall(r"\d+", pair[0][prefix:])])  # file order
    items = []
    for location, entry in located:
        if not isinstance(entry, SafetyRecord):
            items.append(Item(0, location, spec, location, "none", error=("bad_record", entry.reason),
                              record_location=location))
            continue
        record = entry
        base = dict(index=0, id=record.id, input=spec, source=location, record_location=location,
                    prompt=record.prompt)
        if record.image is None:
            items.append(Item(kind="none", **base))
        elif isinstance(record.image, bytes):
            items.append(Item(kind="bytes", data=record.image, **base))
        else:
            try:
                full = resolve_image_path(record.image, root)
            except ImageError as err:
                items.append(Item(kind="none", error=("path_escape", str(err)), **base))
                continue
            items.append(Item(kind="file", path=str(full), **base))
    return InputListing(spec, report.format, items)


def _files_with_suffix(spec: str, suffix: str) -> list[str]:
    p = Path(spec)
    if p.is_dir():
        files = sorted(str(f) for f in p.rglob(f"*{suffix}") if f.is_file())
        if not files:
            raise ScanInputError(f"--input {spec!r}: the folder holds no {suffix} files")
        return files
    return [spec]


def _parquet_columns(path: str) -> list[str]:
    import pyarrow.parquet as pq

    return list(pq.ParquetFile(path).schema_arrow.names)


def _pick_image_column(names: list[str], image_field: str | None, where: str) -> str:
    if image_field is not None:
        if image_field not in names:
            raise ScanInputError(f"{where}: no column {image_field!r} (--image-field); columns: {names}")
        return image_field
    for name in IMAGE_COLUMNS:
        if name in names:
            return name
    raise ScanInputError(
        f"{where}: no image column found (looked for {', '.join(IMAGE_COLUMNS)}); columns: {names}; pass --image-field"
    )


def _check_prompt_column(names: list[str], prompt_field: str | None, where: str) -> None:
    if prompt_field is not None and prompt_field not in names:
        raise ScanInputError(f"{where}: no column {prompt_field!r} (--prompt-field); columns: {names}")


def _list_parquet(spec: str, image_field: str | None, prompt_field: str | None) -> InputListing:
    pq = _require_module("pyarrow.parquet", "parquet input")
    items = []
    for file in _files_with_suffix(spec, ".parquet"):
        try:
            meta = pq.ParquetFile(file)
        except Exception as err:  # pyarrow raises its own error types for broken files
            raise ScanInputError(f"--input {file!r}: not a readable parquet file ({err})") from None
        names = list(meta.schema_arrow.names)
        column = _pick_image_column(names, image_field, file)
        _check_prompt_column(names, prompt_field, file)
        name = Path(file).name
        for row in range(meta.metadata.num_rows):
            items.append(Item(0, f"{name}[{row}]", spec, f"{file}[{row}]", "parquet", path=file, offset=row,
                              image_field=column, prompt_ref=("column", prompt_field) if prompt_field else None))
    return InputListing(spec, "parquet", items)


def _list_hf(spec: str, image_field: str | None, prompt_field: str | None) -> InputListing:
    datasets = _require_module("datasets", "Hugging Face datasets input")
    try:
        ds = datasets.load_from_disk(spec)
    except Exception as err:  # datasets raises FileNotFoundError / its own errors for other folders
        raise ScanInputError(f"--input {spec!r}: not a datasets folder written by save_to_disk ({err})") from None
    if isinstance(ds, datasets.DatasetDict):
        raise ScanInputError(f"--input {spec!r} is a DatasetDict; give one split folder ({', '.join(ds)})")
    names = list(ds.column_names)
    column = _pick_image_column(names, image_field, spec)
    _check_prompt_column(names, prompt_field, spec)
    items = [Item(0, str(row), spec, f"{spec}[{row}]", "hf", path=spec, offset=row, image_field=column,
                  prompt_ref=("column", prompt_field) if prompt_field else None)
             for row in range(len(ds))]
    return InputListing(spec, "hf", items)


def webdataset_key(member_name: str) -> tuple[str, str]:
    """``("dir/000123", "jpg")`` for ``dir/000123.jpg``: WebDataset's key is the member path up
    to the first dot of its base name, the extension the rest (lower-cased)."""
    folder, _, base = member_name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower() if dot else ""


def _list_webdataset(spec: str, prompt_field: str | None) -> InputListing:
    items = []
    for file in _files_with_suffix(spec, ".tar"):
        try:
            tar = tarfile.open(file, "r:")
        except (tarfile.TarError, OSError) as err:
            raise ScanInputError(f"--input {file!r}: not a readable tar file ({err})") from None
        groups: dict[str, dict[str, tarfile.TarInfo]] = {}
        with tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = webdataset_key(member.name)
                if key.rpartition("/")[2].startswith("."):
                    continue
                groups.setdefault(key, {})[ext] = member
        name = Path(file).name
        for key, members in groups.items():
            source = f"{file}:{key}"
            image_ext = next((e for e in WEBDATASET_IMAGE_EXTENSIONS if e in members), None)
            prompt_ref = None
            if prompt_field is not None:
                text = members.get(prompt_field)
                prompt_ref = ("tar", text.offset_data, text.size) if text is not None else ("missing", prompt_field)
            base = dict(index=0, id=f"{name}/{key}", input=spec, source=source, path=file, prompt_ref=prompt_ref)
            if image_ext is None:
                found = ", ".join(sorted(members)) or "nothing"
                items.append(Item(kind="none", error=("no_image", f"key {key!r} has no image member "
                                  f"({'/'.join(WEBDATASET_IMAGE_EXTENSIONS)}); found: {found}"), **base))
                continue
            member = members[image_ext]
            items.append(Item(kind="tar", offset=member.offset_data, size=member.size,
                              **{**base, "source": f"{file}:{member.name}"}))
    return InputListing(spec, "webdataset", items)


def _require_module(name: str, what: str):
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        package = name.split(".")[0]
        raise ScanInputError(f"{what} needs the {package!r} package: pip install 'safevlm[scan]'") from None


# -- all inputs -----------------------------------------------------------------------------------------
def list_input(spec: str, fmt: str | None = None, image_root: str | None = None, prompt_field: str | None = None,
               image_field: str | None = None) -> InputListing:
    """The items of one ``--input`` (a path or a glob pattern), indices and ids local to it."""
    files = _expand(spec)
    if len(files) > 1:  # a glob: the files one by one, in sorted order, as one input
        listings = [list_input(f, fmt, image_root, prompt_field, image_field) for f in files]
        items = [replace(item, input=spec) for listing in listings for item in listing.items]
        ids = [i.id for i in items]
        if len(set(ids)) != len(ids):  # the same id in two matched files: qualify by file
            items = [replace(item, id=f"{item.source if item.kind in ('file', 'none') else item.path}"
                                      f"{ID_SEPARATOR}{item.id}") for item in items]
        return InputListing(spec, listings[0].format, items, [p for li in listings for p in li.ignored])
    path = files[0]
    fmt = fmt or detect_input_format(path)
    base_fmt = fmt.partition(":")[0]
    if base_fmt not in INPUT_FORMATS:
        raise ScanInputError(f"unknown --format {fmt!r}; allowed: {FORMATS_HELP}")
    if prompt_field is not None and base_fmt not in ("parquet", "hf", "webdataset"):
        raise ScanInputError(
            f"--prompt-field applies to parquet, hf and webdataset inputs; {path!r} is {base_fmt} "
            + ("(its prompt is each record's first user turn)" if base_fmt in RECORD_FORMATS else "(no per-image text)")
        )
    if image_root is not None and base_fmt not in RECORD_FORMATS:
        raise ScanInputError(f"--images applies to conversation files ({', '.join(RECORD_FORMATS)}); {path!r} is {base_fmt}")
    if base_fmt == "images":
        if not Path(path).is_dir() and not _is_image_name(path):
            raise ScanInputError(f"--input {path!r} is not an image file or folder")
        return _list_images(path)
    if base_fmt in RECORD_FORMATS:
        if Path(path).is_dir():
            raise ScanInputError(f"--input {path!r} is a folder; --format {fmt} reads a data file")
        return _list_records(path, fmt, image_root)
    if base_fmt == "parquet":
        return _list_parquet(path, image_field, prompt_field)
    if base_fmt == "hf":
        return _list_hf(path, image_field, prompt_field)
    return _list_webdataset(path, prompt_field)


def enumerate_inputs(specs: list[str], fmt: str | None = None, image_root: str | None = None,
                     prompt_field: str | None = None, image_field: str | None = None) -> list[InputListing]:
    """Every input's items with global indices and ids unique over the scan.

    Ids are the inputs' own (a file's path under its folder, a record's id, ``shard.tar/KEY``,
    ``file.parquet[ROW]``, a datasets row); when two inputs give the same id, every id is
    qualified with its input (``INPUT::ID``), so ids never depend on which item came first.
    """
    if not specs:
        raise UsageError("give at least one --input")
    if len(set(specs)) != len(specs):
        dup = next(s for s in specs if specs.count(s) > 1)
        raise UsageError(f"--input {dup!r} is given twice")
    listings = [list_input(s, fmt, image_root, prompt_field, image_field) for s in specs]
    ids = [item.id for listing in listings for item in listing.items]
    qualify = len(set(ids)) != len(ids)
    index = 0
    for listing in listings:
        renumbered = []
        for item in listing.items:
            new_id = f"{listing.input}{ID_SEPARATOR}{item.id}" if qualify else item.id
            renumbered.append(replace(item, index=index, id=new_id))
            index += 1
        listing.items = renumbered
    final = [item.id for listing in listings for item in listing.items]
    if len(set(final)) != len(final):
        seen, dup = set(), None
        for i in final:
            if i in seen:
                dup = i
                break
            seen.add(i)
        raise UsageError(f"item id {dup!r} occurs twice; an input is listed twice under different names")
    return listings


# -- reading (in DataLoader workers) -------------------------------------------------------------------
_TABLE_CACHE: dict = {}  # per worker process: the last parquet row group / datasets object read


def _parquet_row(path: str, row: int, columns: list[str]) -> dict:
    import pyarrow.parquet as pq

    stat = os.stat(path)
    key = ("pq", path, stat.st_mtime_ns, stat.st_size)  # a file rewritten in place is read again
    cached = _TABLE_CACHE.get(key)
    if cached is None:
        meta = pq.ParquetFile(path)
        starts, total = [], 0
        for g in range(meta.num_row_groups):
            starts.append(total)
            total += meta.metadata.row_group(g).num_rows
        cached = {"file": meta, "starts": starts, "group": None, "table": None}
        _TABLE_CACHE.clear()  # hold one file's row group at a time
        _TABLE_CACHE[key] = cached
    group = max(g for g, s in enumerate(cached["starts"]) if s <= row)
    if cached["group"] != (group, tuple(columns)):
        cached["table"] = cached["file"].read_row_group(group, columns=columns)
        cached["group"] = (group, tuple(columns))
    table = cached["table"]
    local = row - cached["starts"][group]
    return {c: table.column(c)[local].as_py() for c in columns}


def _hf_row(path: str, row: int, columns: list[str]) -> dict:
    import datasets

    key = ("hf", path, os.stat(os.path.join(path, "state.json")).st_mtime_ns)
    ds = _TABLE_CACHE.get(key)
    if ds is None:
        ds = datasets.load_from_disk(path)
        # the encoded bytes, not a decoded PIL image: the scan decodes (and hashes) them itself
        for name, feature in ds.features.items():
            if isinstance(feature, datasets.Image) and feature.decode:
                ds = ds.cast_column(name, datasets.Image(decode=False))
        _TABLE_CACHE[key] = ds
    return ds.select_columns(columns)[row]


def _cell_bytes(value, where: str) -> bytes:
    """Image bytes from a table cell: bytes, or a ``{"bytes", "path"}`` struct (Hugging Face)."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"])
        if value.get("path"):
            return Path(value["path"]).read_bytes()
    if value is None:
        raise ImageError(f"empty image cell (null): {where}")
    raise ImageError(f"the image cell holds {type(value).__name__}, not image bytes: {where}")


def _read_tar(path: str, offset: int, size: int) -> bytes:
    with open(path, "rb") as fh:
        fh.seek(offset)
        data = fh.read(size)
    if len(data) != size:
        raise ImageError(f"truncated tar member ({len(data)} of {size} bytes): {path}")
    return data


def read_item(item: Item) -> tuple[bytes | None, str | None]:
    """(image bytes or None for text-only, prompt) of an item. Raises ImageError / OSError."""
    prompt = item.prompt
    if item.kind == "file":
        data = Path(item.path).read_bytes()
    elif item.kind == "bytes":
        data = item.data
    elif item.kind == "tar":
        data = _read_tar(item.path, item.offset, item.size)
    elif item.kind in ("parquet", "hf"):
        columns = [item.image_field]
        if item.prompt_ref is not None:
            columns.append(item.prompt_ref[1])
        row = (_parquet_row if item.kind == "parquet" else _hf_row)(item.path, item.offset, columns)
        data = _cell_bytes(row[item.image_field], item.source)
        if item.prompt_ref is not None:
            value = row[item.prompt_ref[1]]
            prompt = None if value is None else str(value)
    else:
        data = None
    if item.prompt_ref is not None and item.prompt_ref[0] == "tar":
        prompt = _read_tar(item.path, item.prompt_ref[1], item.prompt_ref[2]).decode("utf-8", errors="replace").strip()
    return data, prompt


def listing_summary(listings: list[InputListing]) -> dict:
    """``{input: {"format", "items", "ignored_files"}}`` for the scan's config and summary."""
    return {li.input: {"format": li.format, "items": len(li.items), "ignored_files": len(li.ignored)}
            for li in listings}


__all__ = [
    "FORMATS_HELP",
    "INPUT_FORMATS",
    "Item",
    "InputListing",
    "RECORD_FORMATS",
    "ScanInputError",
    "detect_input_format",
    "enumerate_inputs",
    "list_input",
    "listing_summary",
    "read_item",
    "webdataset_key",
]
