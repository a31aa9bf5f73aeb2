"""Human rating of safety judgements: the rating web page, its ratings store, Label Studio interop.

* ``safevlm.annotate.items``       — :func:`load_items`: the items of an eval run, a scan output or a JSONL file;
* ``safevlm.annotate.form``        — what a rater fills in and its checks (:func:`parse_rating`), the judge's rubric;
* ``safevlm.annotate.store``       — :class:`RatingStore`, the SQLite ratings file (``ratings`` table + the app's own);
* ``safevlm.annotate.app``         — :func:`create_app`, the FastAPI rating page (``safevlm annotate serve``);
* ``safevlm.annotate.labelstudio`` — Label Studio tasks export and annotations import.

The agreement between raters, judges and the safety head is ``safevlm eval agreement``
(:mod:`safevlm.eval.agreement`), which reads the same store. See ``docs/annotate.md``.
Submodules are imported on first use (the app needs the ``serve`` extra: fastapi, uvicorn).
"""

from __future__ import annotations

_LAZY = {
    "AnnotateSettings": "safevlm.annotate.app",
    "ItemSet": "safevlm.annotate.items",
    "RatingItem": "safevlm.annotate.items",
    "RatingStore": "safevlm.annotate.store",
    "create_app": "safevlm.annotate.app",
    "export_tasks": "safevlm.annotate.labelstudio",
    "import_annotations": "safevlm.annotate.labelstudio",
    "load_items": "safevlm.annotate.items",
    "parse_rating": "safevlm.annotate.form",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'safevlm.annotate' has no attribute {name!r}")


__all__ = sorted(_LAZY)
