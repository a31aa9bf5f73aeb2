"""``report.html``: counts, the type x level table, the risk-score histogram, and per risk type
the top-scoring thumbnails with their scores, prompts and the head's attention as an overlay.

The shown items are read again from their inputs (the scan keeps no pixels) and run once more
through the same preprocessing and head, with the head's attention captured
(:mod:`safevlm.scan.attention`). Thumbnails of risk level >= 2 are blurred until clicked.
"""

from __future__ import annotations

import base64
import io
import logging
import os
from pathlib import Path

from safevlm.scan.outputs import REPORT_FILE, type_risk_score

logger = logging.getLogger("safevlm.scan")

THUMBNAIL_SIDE = 160
BLUR_FROM_LEVEL = 2


def model_view_box(size: tuple[int, int], image_processor) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of the original image that the image processor keeps: a
    shortest-edge resize then a centre crop (CLIP, LLaVA-1.5), or the whole image when it only
    resizes. The attention grid covers exactly this box."""
    width, height = size
    resize = getattr(image_processor, "do_resize", False)
    target = getattr(image_processor, "size", None) or {}
    if resize and "shortest_edge" in target:
        sx = sy = target["shortest_edge"] / min(width, height)
    elif resize and "height" in target and "width" in target:
        sx, sy = target["width"] / width, target["height"] / height
    else:
        sx = sy = 1.0
    if getattr(image_processor, "do_center_crop", False):
        crop = getattr(image_processor, "crop_size", None) or {}
        cw, ch = crop.get("width", width * sx), crop.get("height", height * sy)
        left, top = (width * sx - cw) / 2, (height * sy - ch) / 2
        box = (left / sx, top / sy, (left + cw) / sx, (top + ch) / sy)
        return (max(0.0, box[0]), max(0.0, box[1]), min(float(width), box[2]), min(float(height), box[3]))
    return (0.0, 0.0, float(width), float(height))


def _data_uri(image, fmt: str) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 82} if fmt == "JPEG" else {}))
    mime = "image/jpeg" if fmt == "JPEG" else "image/png"
    return f"data:{mime};base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"


def thumbnail(image, image_processor, side: int = THUMBNAIL_SIDE, whole: bool = False) -> str:
    """A JPEG data: URI of the part of ``image`` the model sees, ``side`` x ``side`` (``whole``:
    all of it, as tiled and dynamic-resolution bases see it)."""
    box = (0.0, 0.0, float(image.size[0]), float(image.size[1])) if whole else model_view_box(image.size, image_processor)
    return _data_uri(image.resize((side, side), resample=3, box=box), "JPEG")  # 3 = bicubic


def heatmap_overlay(grid, side: int = THUMBNAIL_SIDE) -> str:
    """A PNG data: URI (RGBA, ``side`` x ``side``) of an attention grid: bilinear upsampling,
    scaled from the map's minimum (transparent) to its maximum (opaque yellow), red to yellow.
    A flat map (every patch alike) gives a transparent overlay."""
    import numpy as np
    from PIL import Image

    values = np.asarray(grid, dtype=np.float32)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    spread = high - low
    values = (values - low) / spread if spread > 1e-6 * max(abs(high), 1e-12) else np.zeros_like(values)
    up = np.asarray(Image.fromarray(values).resize((side, side), resample=2), dtype=np.float32)  # 2 = bilinear
    up = np.clip(up, 0.0, 1.0)
    rgba = np.zeros((side, side, 4), dtype=np.uint8)
    rgba[..., 0] = 255
    rgba[..., 1] = np.rint(255 * up).astype(np.uint8)
    rgba[..., 3] = np.rint(200 * up ** 1.5).astype(np.uint8)
    return _data_uri(Image.fromarray(rgba), "PNG")


def _histogram(counts: list[int], width: int = 520, height: int = 140) -> dict:
    peak = max(counts) if counts and max(counts) > 0 else 1
    step = width / max(len(counts), 1)
    bars = []
    for i, n in enumerate(counts):
        h = round(height * n / peak, 1)
        lo, hi = i / len(counts), (i + 1) / len(counts)
        bars.append({"x": round(i * step + 1, 1), "y": round(height - h, 1), "w": round(step - 2, 1), "h": h,
                     "count": n, "label": f"{lo:.2f}-{hi:.2f}"})
    return {"width": width, "height": height, "bars": bars}


def _cards(report_data: dict, taxonomy, options, model, processor, items=None) -> dict[str, list[dict]]:
    """Per risk type, a card per top row: scores, prompt, thumbnail and attention overlay."""
    from safevlm.scan.attention import attention_maps
    from safevlm.scan.pipeline import ItemBatches
    from safevlm.scan.sources import enumerate_inputs

    tops: dict[str, list[dict]] = report_data["top"]
    wanted = {row["id"] for rows in tops.values() for row in rows}
    if items is None and wanted:
        try:
            items = [it for li in enumerate_inputs(options.inputs, options.format, options.images,
                                                   options.prompt_field, options.image_field) for it in li.items]
        except (ValueError, OSError) as err:  # the inputs moved since the scan: cards without pictures
            logger.warning("report: cannot read the inputs again (%s); thumbnails left out", err)
    items = {it.id: it for it in items or () if it.id in wanted}
    loader = ItemBatches([], processor, model.backbone.fixed_image_tokens, options.prompt)
    grids = {}
    for type_name, rows in tops.items():
        cards = []
        for row in rows:
            card = {
                "id": row["id"], "source": row.get("source"), "prompt": row.get("prompt"),
                "action": row.get("action"), "risk_level": row.get("risk_level"),
                "risk_level_name": row.get("risk_level_name"),
                "type_score": type_risk_score(row, type_name, taxonomy),
                "blurred": isinstance(row.get("risk_level"), int) and row["risk_level"] >= BLUR_FROM_LEVEL,
                "thumbnail": None, "heatmap": None, "note": None,
            }
            item = items.get(row["id"])
            if item is None:
                card["note"] = "image not found again in the inputs"
            else:
                images: list = []
                prep = loader.prepare(item, images)
                if prep.error is not None:
                    card["note"] = f"cannot show: {prep.error[1]}"
                elif images:
                    card["thumbnail"] = thumbnail(images[0], processor.image_processor,
                                                  whole=model.config.variable_image_features)
                    grid = attention_maps(model, processor, [prep], loader.finish([prep], images))[0]
                    if grid is not None:
                        card["heatmap"] = heatmap_overlay(grid)
            cards.append(card)
        grids[type_name] = cards
    return grids


def attention_note(config) -> str:
    if config.projector_kind == "cabstractor":
        side = int(config.num_safety_features ** 0.5)
        return f"cabstractor: {config.num_safety_features} pooled safety features on a {side} x {side} grid, upsampled"
    from safevlm.scan.attention import grid_of

    if config.variable_image_features:
        return "mlp projector: one safety feature per patch; each image's own rows x cols feature grid (the whole image)"
    side = grid_of(config)[1]
    return f"mlp projector: one safety feature per patch, a {side} x {side} patch grid"


def render_report(summary: dict, report_data: dict, grids: dict, taxonomy, title: str, note: str) -> str:
    """The page's HTML (jinja2, autoescaped)."""
    import jinja2

    from safevlm.scan.template import REPORT_TEMPLATE

    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    heat = report_data["heat"]
    heat_max = max([n for row in heat.values() for n in row] + [1])
    return env.from_string(REPORT_TEMPLATE).render(
        title=title, summary=summary, level_names=list(taxonomy.level_names), heat=heat, heat_max=heat_max,
        histogram=report_data["histogram"], hist=_histogram(report_data["histogram"]), grids=grids,
        failed_rows=report_data["failed_rows"], thumb=THUMBNAIL_SIDE, attention_note=note,
    )


def write_report(out: Path, summary: dict, report_data: dict, model, processor, options, items=None) -> Path:
    """Write ``out/report.html`` (atomically) and return its path. ``items``: the scan's items
    (listed again from ``options.inputs`` when None) to read the shown images from."""
    taxonomy = model.config.taxonomy
    grids = _cards(report_data, taxonomy, options, model, processor, items)
    html = render_report(summary, report_data, grids, taxonomy, ", ".join(options.inputs), attention_note(model.config))
    path = Path(out) / REPORT_FILE
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(html, encoding="utf-8")
    os.replace(tmp, path)
    return path


__all__ = ["attention_note", "heatmap_overlay", "model_view_box", "render_report", "thumbnail", "write_report"]
