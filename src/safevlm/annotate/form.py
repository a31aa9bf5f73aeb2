"""What a rater fills in, and the checks on it (the web page and Label Studio imports alike).

* an ``answer`` item: ``label`` (the answer is ``safe`` / ``unsafe``), ``score`` (1–10, the LLM
  judge's ``score`` rubric: :func:`score_rubric`), ``risk_type`` (of the input; a type of the
  taxonomy) — all three required on the page — and an optional ``comment``;
* an ``input`` item (a scan output): ``risk_type`` and ``risk_level`` (required; level 0 goes
  with the taxonomy's safe type and only with it), an optional ``comment``; its ``label`` is
  ``safe`` for level 0 and ``unsafe`` above, so the input ratings compare with the safety head's.

Value checks (label, score range, risk type names, level range) are
:func:`safevlm.eval.ratings.check_rating`'s, the same that ``safevlm eval agreement`` applies
when it reads the ratings back. Every failure is a :class:`RatingInputError` carrying the
field it is about and the HTTP status the app answers with.
"""

from __future__ import annotations

import re
from functools import lru_cache

from safevlm.annotate.items import ItemSet, RatingItem
from safevlm.eval.ratings import Rating, RatingsError, check_rating
from safevlm.taxonomy import DEFAULT_TAXONOMY, Taxonomy

FIELDS: tuple[str, ...] = ("item", "rater", "label", "score", "risk_type", "risk_level", "comment")
REQUIRED: dict[str, tuple[str, ...]] = {"answer": ("label", "score", "risk_type"), "input": ("risk_type", "risk_level")}
MAX_COMMENT_CHARS = 4000


class RatingInputError(ValueError):
    """A rating that cannot be stored: ``field`` (``"score"``, ``"item"``, ... or ``None`` for the
    body as a whole), ``status`` (403 rater, 404 item, 422 value)."""

    def __init__(self, field: str | None, message: str, status: int = 422):
        super().__init__(message)
        self.field, self.status = field, status

    def to_dict(self) -> dict:
        return {"error": {"field": self.field, "message": str(self)}}


@lru_cache(maxsize=1)
def score_rubric() -> str:
    """The 1–10 scale of the LLM judge's ``score`` rubric (the ``Scale:`` line of
    ``safevlm/eval/judges/rubrics.yaml``), shown to raters word for word."""
    from safevlm.eval.judges.openai_compatible import load_rubrics

    template = load_rubrics()["templates"]["score"]
    for line in template.splitlines():
        if line.strip().startswith("Scale:"):
            return line.strip()
    raise ValueError("the judge's score rubric has no 'Scale:' line (safevlm/eval/judges/rubrics.yaml)")


def _field_of(err: RatingsError) -> str | None:
    found = re.search(r"field '(\w+)'", str(err))
    return found.group(1) if found else None


def parse_rating(payload, items: ItemSet, rater: str, taxonomy: Taxonomy = DEFAULT_TAXONOMY,
                 complete: bool = True) -> tuple[Rating, str | None, RatingItem]:
    """Check one rating sent for ``rater``: ``(rating, comment, item)``.

    Args:
        payload: ``{"item", "label", "score", "risk_type", "risk_level", "comment"}`` (a
            ``"rater"`` field, if sent, must name ``rater``).
        items: the round's items (an id outside them is a 404).
        complete: require the fields of the item's kind (:data:`REQUIRED`); imports pass
            ``False`` and need only one rated field.
    """
    if not isinstance(payload, dict):
        raise RatingInputError(None, f"the rating must be a JSON object, got {type(payload).__name__}")
    unknown = sorted(set(payload) - set(FIELDS))
    if unknown:
        raise RatingInputError(unknown[0], f"unknown field(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(FIELDS)}")
    if payload.get("rater") is not None and payload["rater"] != rater:
        raise RatingInputError("rater", f"signed in as {rater!r}, cannot rate as {payload['rater']!r}", 403)
    item_id = payload.get("item")
    if not isinstance(item_id, str) or not item_id:
        raise RatingInputError("item", f"field 'item' must be an item id (a non-empty string), got {item_id!r}")
    item = items.get(item_id)
    if item is None:
        raise RatingInputError("item", f"item {item_id!r} is not one of the {len(items)} items of this round", 404)
    fields = {name: payload.get(name) for name in ("label", "score", "risk_type", "risk_level")}
    if item.kind == "input" and fields["score"] is not None:
        raise RatingInputError("score", "an input item has no answer to score; rate its risk_type and risk_level")
    if complete:
        for name in REQUIRED[item.kind]:
            if fields[name] is None:
                raise RatingInputError(name, f"field {name!r} is required for {item.kind} items "
                                             f"(required: {', '.join(REQUIRED[item.kind])})")
    comment = payload.get("comment")
    if comment is not None:
        if not isinstance(comment, str):
            raise RatingInputError("comment", f"field 'comment' must be a string or null, got {type(comment).__name__}")
        if len(comment) > MAX_COMMENT_CHARS:
            raise RatingInputError("comment", f"field 'comment' is {len(comment)} characters, over {MAX_COMMENT_CHARS}")
        comment = comment.strip() or None
    try:
        rating = check_rating({"item": item_id, "rater": rater, **fields}, f"rating of item {item_id!r}", taxonomy)
    except RatingsError as err:
        raise RatingInputError(_field_of(err), str(err)) from None
    if item.kind == "input" and rating.risk_level is not None:
        if rating.risk_type is not None and (rating.risk_level == 0) != (rating.risk_type == taxonomy.safe_type):
            raise RatingInputError(
                "risk_level", f"risk level {rating.risk_level} ({taxonomy.level_names[rating.risk_level]}) does not go "
                f"with risk type {rating.risk_type!r}: level 0 is the level of the {taxonomy.safe_type!r} type, and only of it")
        derived = "safe" if rating.risk_level == 0 else "unsafe"
        if rating.label is not None and rating.label != derived:
            raise RatingInputError("label", f"label {rating.label!r} contradicts risk level {rating.risk_level}")
        rating = Rating(rating.item, rating.rater, derived, None, rating.risk_type, rating.risk_level)
    return rating, comment, item


def check_rater_name(name) -> str:
    """A rater name as typed (stripped): 1–64 printable characters, not ``humans`` / ``head`` /
    ``judge:*`` (names ``safevlm eval agreement`` gives its own meaning)."""
    from safevlm.eval.ratings import is_human

    if not isinstance(name, str) or not name.strip():
        raise RatingInputError("rater", "give your name (field 'rater' is empty)")
    name = name.strip()
    if len(name) > 64 or not name.isprintable():
        raise RatingInputError("rater", f"rater name {name[:80]!r} must be 1-64 printable characters")
    if not is_human(name):
        raise RatingInputError("rater", f"rater name {name!r} is reserved (humans, head and judge:* name automatic raters)")
    return name


__all__ = ["FIELDS", "MAX_COMMENT_CHARS", "REQUIRED", "RatingInputError", "check_rater_name", "parse_rating", "score_rubric"]
