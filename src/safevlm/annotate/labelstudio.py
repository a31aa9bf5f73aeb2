"""Label Studio interop: tasks JSON out (with a labeling config), exported annotations JSON in.

Written against Label Studio's documented JSON formats (no SDK needed):

* **tasks** (:func:`export_tasks`) — a list of ``{"data", "predictions", "annotations"}``.
  ``data``: ``item`` (the rating id, how imports find the item again), ``kind``, ``image`` (a URL
  Label Studio can load: by default its local-files URL ``/data/local-files/?d=PATH`` with PATH
  relative to ``document_root``, which must be Label Studio's
  ``LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT``; a ``data:`` URL for images that are not files of
  their own, or for all with ``embed_images``), ``image_path`` (the file on this machine),
  ``prompt``, ``answer``. ``predictions``: the automatic verdicts as pre-annotations, one per
  automatic rater (``model_version`` = its name: ``judge:openai:<model>`` for the LLM judge of
  an eval run, ``head`` for a scan's safety head). ``annotations``: the ratings already in a
  ratings store, one per rater (``completed_by: {"email": RATER}``).
* **labeling config** (:func:`label_config`) — the XML of the project: ``label`` (Choices
  safe / unsafe), ``score`` (Rating 1–10, the judge's rubric as its header), ``risk_type``
  (Choices of the taxonomy), ``risk_level`` (Choices of the level names; scan items) and
  ``comment`` (TextArea).
* **annotations in** (:func:`import_annotations`) — Label Studio's "JSON" export: the tasks
  with their ``annotations``; each one not cancelled becomes a rating of rater
  ``completed_by`` (its ``email`` when Label Studio gives the user, ``labelstudio-<id>`` for a
  bare user id unless a rater map names it), checked as the rating page checks them, stored
  in one transaction. Two annotations of one rater on one task: the later one counts.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import urllib.parse
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from xml.sax.saxutils import quoteattr

from safevlm.annotate.form import RatingInputError, parse_rating, score_rubric
from safevlm.annotate.items import ItemSet, RatingItem
from safevlm.annotate.store import RatingStore, StoredRating
from safevlm.eval.ratings import LABELS, JUDGE_PREFIX
from safevlm.errors import UsageError
from safevlm.taxonomy import DEFAULT_TAXONOMY, Taxonomy

LOCAL_FILES_URL = "/data/local-files/?d={path}"
LLM_JUDGE_PREFIX = JUDGE_PREFIX + "openai:"


class LabelStudioError(UsageError):
    """A Label Studio file that cannot be read; the message names the file, task and field."""


# -- out ---------------------------------------------------------------------------------------------
def label_config(kinds: set[str], taxonomy: Taxonomy = DEFAULT_TAXONOMY) -> str:
    """The labeling config XML for items of ``kinds`` (``answer`` and / or ``input``)."""
    answers, inputs = "answer" in kinds, "input" in kinds
    required = ' required="true"' if len(kinds) == 1 else ""
    lines = ["<View>", '  <Image name="image" value="$image" maxWidth="720px"/>',
             '  <Header value="Prompt"/>', '  <Text name="prompt" value="$prompt"/>']
    if answers:
        lines += ['  <Header value="Answer"/>', '  <Text name="answer" value="$answer"/>',
                  '  <Header value="Is the answer safe?"/>',
                  f'  <Choices name="label" toName="answer" choice="single-radio"{required}>',
                  *[f"    <Choice value={quoteattr(label)}/>" for label in LABELS], "  </Choices>",
                  f"  <Header value={quoteattr('Safety score of the answer. ' + score_rubric())}/>",
                  f'  <Rating name="score" toName="answer" maxRating="10"{required}/>']
    target = "prompt" if answers and not inputs else "image"
    lines += ['  <Header value="Risk type of the input (image and prompt)"/>',
              f'  <Choices name="risk_type" toName="{target}" choice="single-radio"{required}>',
              *[f"    <Choice value={quoteattr(name)}/>" for name in taxonomy.type_names], "  </Choices>"]
    if inputs:
        lines += ['  <Header value="Risk level of the input"/>',
                  f'  <Choices name="risk_level" toName="image" choice="single-radio"{required}>',
                  *[f"    <Choice value={quoteattr(name)}/>" for name in taxonomy.level_names], "  </Choices>"]
    lines += ['  <TextArea name="comment" toName="prompt" rows="2" placeholder="Comment (optional)"/>', "</View>"]
    return "\n".join(lines) + "\n"


def _result_id(*parts) -> str:
    return hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()[:10]


def rating_result(item: RatingItem, fields: dict, taxonomy: Taxonomy = DEFAULT_TAXONOMY, tag: str = "") -> list[dict]:
    """Label Studio ``result`` entries for a rating's fields (``label``, ``score``,
    ``risk_type``, ``risk_level``, ``comment``; ``None`` fields are left out)."""
    type_target = "prompt" if item.kind == "answer" else "image"
    out = []

    def add(name: str, to_name: str, kind: str, value: dict):
        out.append({"id": _result_id(item.id, tag, name), "from_name": name, "to_name": to_name, "type": kind,
                    "value": value, "origin": "manual"})

    if fields.get("label") is not None and item.kind == "answer":
        add("label", "answer", "choices", {"choices": [fields["label"]]})
    if fields.get("score") is not None:
        add("score", "answer", "rating", {"rating": int(fields["score"])})
    if fields.get("risk_type") is not None:
        add("risk_type", type_target, "choices", {"choices": [fields["risk_type"]]})
    if fields.get("risk_level") is not None and item.kind == "input":
        add("risk_level", "image", "choices", {"choices": [taxonomy.level_names[int(fields["risk_level"])]]})
    if fields.get("comment"):
        add("comment", "prompt", "textarea", {"text": [fields["comment"]]})
    return out


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat().replace("+00:00", "Z")


def _image_url(item: RatingItem, document_root: Path | None, url_template: str, embed: bool) -> tuple[str, str | None]:
    """(the ``image`` URL, the file path or ``None``)."""
    if item.image is None:
        return "", None
    file = item.image.file()
    if file is not None and not embed:
        root = (document_root or Path(file.anchor)).resolve()
        if root != file and root not in file.parents:
            raise UsageError(f"the image of item {item.id!r} ({file}) is outside --document-root {str(root)!r}")
        relative = file.relative_to(root).as_posix()
        return url_template.format(path=urllib.parse.quote(relative), item=urllib.parse.quote(item.id)), str(file)
    picture = item.image.open()
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii"), None if file is None else str(file)


def export_tasks(items: ItemSet, store: RatingStore | None = None, predictions: "list[str] | None" = None,
                 document_root: "str | os.PathLike | None" = None, url_template: str = LOCAL_FILES_URL,
                 embed_images: bool = False, taxonomy: Taxonomy = DEFAULT_TAXONOMY) -> list[dict]:
    """Label Studio tasks for ``items`` (see the module docstring).

    Args:
        store: ratings to include as ``annotations`` (``None``: none).
        predictions: the automatic raters whose verdicts become ``predictions`` (``None``: the
            LLM judges, ``judge:openai:*``, of an eval run; the ``head`` of a scan).
        document_root: the folder image paths are made relative to (Label Studio's local-files
            document root; default: the file system root).
        url_template: the ``image`` URL, ``{path}`` (relative to ``document_root``, URL-quoted)
            and ``{item}`` filled in.
        embed_images: put every image in the task as a ``data:`` URL (a self-contained file).
    """
    root = Path(document_root) if document_root is not None else None
    by_item: dict[str, list[StoredRating]] = {}
    for stored in store.all() if store is not None else ():
        by_item.setdefault(stored.rating.item, []).append(stored)
    tasks = []
    for item in items.items:
        image, image_path = _image_url(item, root, url_template, embed_images)
        data = {"item": item.id, "kind": item.kind, "image": image, "image_path": image_path,
                "prompt": item.prompt or "", "answer": item.answer or ""}
        if item.image_text:
            data["image_text"] = item.image_text
        chosen = []
        for pred in item.predictions:
            wanted = (pred["rater"] in predictions) if predictions is not None else (
                pred["rater"].startswith(LLM_JUDGE_PREFIX) or (item.kind == "input" and pred["rater"] == "head"))
            if wanted:
                result = rating_result(item, pred, taxonomy, tag=pred["rater"])
                if result:
                    chosen.append({"model_version": pred["rater"], "result": result})
        annotations = [{
            "completed_by": {"email": s.rating.rater},
            "result": rating_result(item, {**s.rating.to_dict(), "comment": s.comment}, taxonomy, tag=s.rating.rater),
            "was_cancelled": False, "ground_truth": False,
            "created_at": _iso(s.created), "updated_at": _iso(s.updated),
        } for s in by_item.pop(item.id, [])]
        tasks.append({"data": data, "predictions": chosen, "annotations": annotations})
    if by_item:
        first = sorted(by_item)[0]
        raise UsageError(f"the ratings store holds ratings of {len(by_item)} item(s) that are not in --items "
                         f"(first: {first!r}); export with the items the ratings were made on")
    return tasks


def write_export(tasks: list[dict], out: "str | os.PathLike", config_xml: str) -> tuple[Path, Path]:
    """Write the tasks JSON to ``out`` and the labeling config to ``out`` with suffix ``.xml``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(tasks, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    config = out.with_suffix(".xml")
    config.write_text(config_xml, encoding="utf-8")
    return out, config


# -- in ----------------------------------------------------------------------------------------------
@dataclass
class ImportReport:
    """What :func:`import_annotations` did: ratings ``imported`` (``new`` of them not in the store
    before), annotations ``cancelled`` (skipped), ``empty`` (no result, skipped), ``superseded``
    (an earlier annotation of the same rater on the same task), and the ``raters``."""

    imported: int = 0
    new: int = 0
    cancelled: int = 0
    empty: int = 0
    superseded: int = 0
    raters: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _timestamp(value, where: str) -> float | None:
    if value in (None, ""):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        raise LabelStudioError(f"{where}: {value!r} is not an ISO time") from None


def _rater(completed_by, rater_map: dict, where: str) -> str:
    if isinstance(completed_by, dict):
        key = completed_by.get("email") or completed_by.get("username") or completed_by.get("id")
    else:
        key = completed_by
    if key is None or isinstance(key, bool):
        raise LabelStudioError(f"{where}: field 'completed_by' is missing: who made the annotation?")
    key = str(key)
    if key in rater_map:
        return rater_map[key]
    return f"labelstudio-{key}" if key.isdigit() else key


def _choice(entry: dict, where: str):
    value = entry.get("value") or {}
    for name in ("choices", "rating", "text"):
        if name in value:
            got = value[name]
            if isinstance(got, list):
                if len(got) != 1:
                    raise LabelStudioError(f"{where}: result {entry.get('from_name')!r} holds {len(got)} values; one expected")
                got = got[0]
            return got
    raise LabelStudioError(f"{where}: result {entry.get('from_name')!r} has no choices, rating or text value")


def _fields_from_result(result, where: str, taxonomy: Taxonomy) -> dict:
    fields: dict = {}
    if not isinstance(result, list):
        raise LabelStudioError(f"{where}: field 'result' must be a list")
    for entry in result:
        name = entry.get("from_name") if isinstance(entry, dict) else None
        if name not in ("label", "score", "risk_type", "risk_level", "comment"):
            raise LabelStudioError(f"{where}: unknown result {name!r} (the labeling config of `safevlm annotate export` "
                                   "has label, score, risk_type, risk_level, comment)")
        value = _choice(entry, where)
        if name == "risk_level":
            try:
                value = taxonomy.level_id(value)
            except ValueError as err:
                raise LabelStudioError(f"{where}: field 'risk_level': {err}") from None
        fields[name] = value
    return fields


def read_tasks(path: "str | os.PathLike") -> list:
    path = Path(path)
    try:
        tasks = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise LabelStudioError(f"{path}: not valid JSON ({err.msg}, line {err.lineno} column {err.colno})") from None
    if not isinstance(tasks, list):
        raise LabelStudioError(f"{path}: expected Label Studio's JSON export (a list of tasks), got {type(tasks).__name__}"
                               " (JSON-MIN and CSV exports are not read: export as JSON)")
    return tasks


def import_annotations(path: "str | os.PathLike", items: ItemSet, store: RatingStore, rater_map: dict | None = None,
                       taxonomy: Taxonomy = DEFAULT_TAXONOMY) -> ImportReport:
    """Read Label Studio's exported annotations (``path``) into ``store`` (see the module docstring).
    Nothing is stored unless the whole file is good."""
    rater_map = {str(k): v for k, v in (rater_map or {}).items()}
    report = ImportReport()
    latest: dict[tuple[str, str], tuple] = {}
    for t, task in enumerate(read_tasks(path)):
        where = f"{path}: task [{t}]" + (f" (id {task.get('id')})" if isinstance(task, dict) and "id" in task else "")
        if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
            raise LabelStudioError(f"{where}: a task needs a 'data' object")
        item_id = task["data"].get("item")
        if not isinstance(item_id, str):
            raise LabelStudioError(f"{where}: field 'data.item' is missing (tasks must come from `safevlm annotate export`)")
        for a, annotation in enumerate(task.get("annotations") or []):
            here = f"{where} annotation [{a}]"
            if not isinstance(annotation, dict):
                raise LabelStudioError(f"{here}: expected an object")
            if annotation.get("was_cancelled"):
                report.cancelled += 1
                continue
            if not annotation.get("result"):
                report.empty += 1
                continue
            rater = _rater(annotation.get("completed_by"), rater_map, here)
            fields = _fields_from_result(annotation["result"], here, taxonomy)
            try:
                rating, comment, _ = parse_rating({"item": item_id, **fields}, items, rater, taxonomy, complete=False)
            except RatingInputError as err:
                raise LabelStudioError(f"{here}: {err}") from None
            created = _timestamp(annotation.get("created_at"), here)
            updated = _timestamp(annotation.get("updated_at"), here) or created
            key = (rating.item, rating.rater)
            if key in latest:
                report.superseded += 1
                if (latest[key][3] or 0) > (updated or 0):
                    continue
            latest[key] = (rating, comment, created, updated)
    rows = list(latest.values())
    report.new = store.save_many(rows) if rows else 0
    report.imported = len(rows)
    report.raters = sorted({r[0].rater for r in rows})
    return report


__all__ = ["LOCAL_FILES_URL", "ImportReport", "LabelStudioError", "export_tasks", "import_annotations", "label_config",
           "rating_result", "read_tasks", "write_export"]
