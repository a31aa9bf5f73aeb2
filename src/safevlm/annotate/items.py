"""What raters rate: the items of an ``eval run`` folder, a ``scan`` output or a JSONL file.

Two kinds of item:

* ``answer`` — a model's answer to a prompt (and an image): the rater says whether the answer
  is safe, gives the 1–10 safety score of the LLM judge's rubric and the input's risk type.
  From an ``eval run`` folder (every stored answer whose generation did not fail), the item id
  is :func:`safevlm.eval.ratings.rating_item_id` of (model, adapter, policy, task, item id):
  opaque, so the page never learns which system answered, and the same id ``safevlm eval
  agreement`` uses for the run's judges and safety head.
* ``input`` — an image (and a prompt, if any) alone: the rater gives the input's risk type and
  risk level. From a ``scan`` output folder (every ``scanned`` row; duplicates are left out,
  they are the same image and prompt as a scanned row), id ``"s-" + the scan row's id``.

A JSONL file holds one item a line: ``{"id": str, "prompt": str|null, "answer": str|null,
"image": str|null}`` (``image`` relative to the file's folder); an item with an ``answer`` is
an ``answer`` item, else an ``input`` item; ids are kept as given.

Images are never copied: an :class:`ImageRef` says where the pixels are, and
:meth:`ImageRef.open` reads them through the one image path (:mod:`safevlm.data.images`),
refusing a path that leaves the item's root.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from safevlm.data.images import ImageError, decode_image, open_image, resolve_image_path
from safevlm.errors import UsageError

KINDS: tuple[str, ...] = ("answer", "input")
SCAN_PREFIX = "s-"


class ItemsError(UsageError):
    """An items source that cannot be read; the message names the file, line and field."""


@dataclass(frozen=True)
class ImageRef:
    """Where an item's image is: a ``path`` relative to ``root`` (checked on every open: no
    absolute path, no ``..``, no symbolic link out of ``root``), or a scan input item
    (``scan_item``, a :class:`safevlm.scan.sources.Item`: a file, tar member, parquet or
    datasets row, or bytes rendered in memory)."""

    root: str | None = None
    path: str | None = None
    scan_item: object | None = field(default=None, compare=False, repr=False)

    def file(self) -> Path | None:
        """The image file on disk (checked against the root), or ``None`` when the image is not a
        file of its own (a tar member, a table row, bytes)."""
        if self.path is not None:
            return resolve_image_path(self.path, self.root)
        item = self.scan_item
        if item is not None and getattr(item, "kind", None) == "file":
            return resolve_image_path(self.path_in_root(item.path), self.root)
        return None

    def path_in_root(self, full: str) -> str:
        return Path(os.path.relpath(full, self.root)).as_posix()

    def open(self, max_pixels: int | None = None):
        """The RGB ``PIL.Image`` (raises :class:`~safevlm.data.images.ImageError`)."""
        if self.path is not None:
            return open_image(self.path, image_root=self.root, max_pixels=max_pixels)
        item = self.scan_item
        if item is None:
            raise ImageError("the item has no image")
        if item.kind == "file":
            return decode_image(self.file(), max_pixels)
        from safevlm.scan.sources import read_item

        try:
            data, _ = read_item(item)
        except OSError as err:
            raise ImageError(f"cannot read the image of {item.source}: {err}") from None
        if data is None:
            raise ImageError(f"{item.source} has no image")
        return decode_image(data, max_pixels)


@dataclass(frozen=True)
class RatingItem:
    """One item to rate.

    Attributes:
        id: the rating id (see the module docstring).
        kind: ``"answer"`` or ``"input"``.
        prompt: the prompt (for answers: the one the model was given), or ``None``.
        answer: the model's answer (``answer`` items), else ``None``.
        image: where the image is, or ``None`` (text only, or an image rendered in memory that
            the run did not keep).
        image_text: for an image the run did not keep (FigStep), the text the image held.
        origin: where the item came from (run key, task, item id / scan row id): never shown
            on the rating page, kept for exports.
        predictions: automatic verdicts on the item as rating dicts (``rater``, ``label``,
            ``score``, ``risk_type``, ``risk_level``): the run's judges and safety head, or the
            scan's head; pre-annotations for Label Studio, never shown on the rating page.
    """

    id: str
    kind: str
    prompt: str | None = None
    answer: str | None = None
    image: ImageRef | None = None
    image_text: str | None = None
    origin: dict = field(default_factory=dict, compare=False)
    predictions: tuple[dict, ...] = field(default=(), compare=False)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"item kind must be one of {', '.join(KINDS)}, got {self.kind!r}")


@dataclass
class ItemSet:
    """The items of one source, in source order, by id."""

    source: str
    format: str
    items: list[RatingItem]

    def __post_init__(self):
        self.by_id = {item.id: item for item in self.items}
        if len(self.by_id) != len(self.items):
            seen: set[str] = set()
            dup = next(i.id for i in self.items if i.id in seen or seen.add(i.id))
            raise ItemsError(f"{self.source}: item id {dup!r} occurs twice")

    def __len__(self) -> int:
        return len(self.items)

    def __contains__(self, item_id: str) -> bool:
        return item_id in self.by_id

    def get(self, item_id: str) -> RatingItem | None:
        return self.by_id.get(item_id)

    @property
    def kinds(self) -> set[str]:
        return {item.kind for item in self.items}


# -- eval run folders --------------------------------------------------------------------------------
def _eval_run_items(run_dir: Path) -> ItemSet:
    from safevlm.eval.ratings import rating_item_id, run_ratings
    from safevlm.eval.runner import RESULTS_NAME
    from safevlm.eval.store import ResultsStore

    automatic: dict[str, list[dict]] = {}
    for rating in run_ratings(run_dir).ratings:
        automatic.setdefault(rating.item, []).append(rating.to_dict())
    items = []
    with ResultsStore(run_dir / RESULTS_NAME) as store:
        for key in store.keys():
            for task in store.tasks(key):
                for item_id, stored in sorted(store.answers(key, task).items()):
                    if stored.answer is None:  # generation failed: nothing to rate
                        continue
                    item = stored.item
                    rid = rating_item_id(*key.as_tuple(), task, item_id)
                    image = None
                    if isinstance(item.image, str):
                        image = ImageRef(root=item.image_root or str(run_dir), path=item.image)
                    image_text = None if image is not None else item.metadata.get("judge_context")
                    items.append(RatingItem(
                        id=rid, kind="answer", prompt=stored.prompt, answer=stored.answer, image=image,
                        image_text=image_text,
                        origin={"model": key.model, "adapter": key.adapter, "policy": key.policy, "task": task,
                                "item_id": item_id, "category": item.category},
                        predictions=tuple(automatic.get(rid, ())),
                    ))
    if not items:
        raise ItemsError(f"{run_dir}: the eval run holds no answers to rate")
    return ItemSet(str(run_dir), "eval-run", items)


# -- scan output folders -----------------------------------------------------------------------------
def _scan_root(scan_item, options: dict) -> str:
    """The folder a scan item's image file must stay inside: the conversation file's image root
    (``--images``, default its folder) for records, the input folder for image folders."""
    spec = Path(scan_item.input)
    if scan_item.record_location is not None:
        return str(options.get("images") or spec.parent)
    return str(spec if spec.is_dir() else spec.parent)


def _scan_items(out: Path) -> ItemSet:
    from safevlm.scan.merge import read_config
    from safevlm.scan.outputs import SCAN_FILE, iter_rows
    from safevlm.scan.sources import enumerate_inputs

    options = read_config(out).get("options", {})
    inputs = list(options.get("inputs") or [])
    missing = [spec for spec in inputs if not any(c in spec for c in "*?[") and not Path(spec).exists()]
    if missing:
        raise ItemsError(f"{out}: the scan's input {missing[0]!r} is not found from {os.getcwd()!r} "
                         "(run from the folder the scan ran in)")
    listings = enumerate_inputs(inputs, options.get("format"), options.get("images"), options.get("prompt_field"),
                                options.get("image_field"))
    by_id = {it.id: it for listing in listings for it in listing.items}
    items = []
    for _, row in iter_rows(out / SCAN_FILE):
        if row.get("status") != "scanned":
            continue
        scan_item = by_id.get(row["id"])
        if scan_item is None:
            raise ItemsError(f"{out / SCAN_FILE}: item {row['id']!r} is no longer in the scan's inputs")
        image = None
        if scan_item.kind != "none":
            image = ImageRef(root=_scan_root(scan_item, options), scan_item=scan_item)
        head = {"rater": "head", "label": None, "score": None, "risk_type": row.get("risk_type"),
                "risk_level": row.get("risk_level")}
        if isinstance(head["risk_level"], int):
            head["label"] = "safe" if head["risk_level"] == 0 else "unsafe"
        items.append(RatingItem(
            id=SCAN_PREFIX + row["id"], kind="input", prompt=row.get("prompt"), image=image,
            origin={"scan": str(out), "id": row["id"], "source": row.get("source")},
            predictions=(head,) if row.get("risk_type") is not None else (),
        ))
    if not items:
        raise ItemsError(f"{out}: the scan holds no scanned items to rate")
    return ItemSet(str(out), "scan", items)


# -- JSONL files -------------------------------------------------------------------------------------
def _jsonl_items(path: Path) -> ItemSet:
    from safevlm.data import Skipped
    from safevlm.data.readers import jsonl_lines, read_text

    root = path.resolve().parent
    items = []
    for where, number, row in jsonl_lines(path, read_text(path)):
        if isinstance(row, Skipped):  # a broken line: the round needs every item, so it is an error
            raise ItemsError(f"{where}: broken line: {row.reason}")
        unknown = sorted(set(row) - {"id", "prompt", "answer", "image"})
        if unknown:
            raise ItemsError(f"{where}: unknown field(s) {', '.join(map(repr, unknown))}; allowed: id, prompt, answer, image")
        if not isinstance(row.get("id"), str) or not row["id"].strip():
            raise ItemsError(f"{where}: field 'id' must be a non-empty string, got {row.get('id')!r}")
        for name in ("prompt", "answer", "image"):
            if row.get(name) is not None and not isinstance(row[name], str):
                raise ItemsError(f"{where}: field {name!r} must be a string or null, got {type(row[name]).__name__}")
        image = None
        if row.get("image") is not None:
            try:
                resolve_image_path(row["image"], root)
            except ImageError as err:
                raise ItemsError(f"{where}: field 'image': {err}") from None
            image = ImageRef(root=str(root), path=row["image"])
        if row.get("prompt") is None and row.get("answer") is None and image is None:
            raise ItemsError(f"{where}: item {row['id']!r} has no prompt, answer or image to rate")
        items.append(RatingItem(id=row["id"], kind="answer" if row.get("answer") is not None else "input",
                                prompt=row.get("prompt"), answer=row.get("answer"), image=image,
                                origin={"file": str(path), "line": number}))
    return ItemSet(str(path), "jsonl", items)


def load_items(source: "str | os.PathLike") -> ItemSet:
    """The items of ``source``: an eval run folder (``results.sqlite``), a scan output folder
    (``scan_config.json`` + ``scan.jsonl``, or its ``scan.jsonl``) or a JSONL items file.
    Raises :class:`ItemsError` (a :class:`~safevlm.errors.UsageError`) naming what is wrong."""
    from safevlm.eval.runner import RESULTS_NAME
    from safevlm.scan.outputs import CONFIG_FILE, SCAN_FILE

    path = Path(source)
    if not path.exists():
        raise ItemsError(f"--items {str(path)!r} does not exist")
    if path.is_dir():
        if (path / RESULTS_NAME).is_file():
            return _eval_run_items(path)
        if (path / CONFIG_FILE).is_file():
            return _scan_items(path)
        raise ItemsError(f"--items {str(path)!r} is neither an eval run folder (no {RESULTS_NAME}) "
                         f"nor a scan output folder (no {CONFIG_FILE})")
    if path.name == SCAN_FILE and (path.parent / CONFIG_FILE).is_file():
        return _scan_items(path.parent)
    return _jsonl_items(path)


__all__ = ["KINDS", "SCAN_PREFIX", "ImageRef", "ItemSet", "ItemsError", "RatingItem", "load_items"]
