"""The images of the synthetic data: bold typography, shapes, drawn objects, real photos.

Every renderer takes a ``random.Random`` and draws all its randomness from it, so a dataset is
the same for a seed. Typography is **large bold capitals** (one phrase per image, 1-3 short
lines sized to fill the canvas, legible at 112 px) in two layouts: a centred title and a
FigStep-like "phrase + empty 1. 2. 3. list".
"""

from __future__ import annotations

import functools
import math
import random
import textwrap
import warnings
from pathlib import Path

from safevlm.data.synth.texts import COLOURS, OBJECTS, PHOTOS, SHAPES

LAYOUTS: tuple[str, ...] = ("title", "list")

_BOLD_FONTS: tuple[str, ...] = (
    "/usr/share/fonts/truetype/freefont/FreeSansBold.ttf",
    "/usr/share/fonts/truetype/freefont/FreeMonoBold.ttf",
    "/usr/share/fonts/truetype/freefont/FreeSerifBold.ttf",
    "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf",
    "/usr/share/fonts/truetype/dejavu/DejaVuSerif-Bold.ttf",
)


@functools.lru_cache(maxsize=None)
def _font_paths() -> tuple[str | None, ...]:
    found = tuple(p for p in _BOLD_FONTS if Path(p).is_file())
    if not found:
        warnings.warn(
            "no bold TrueType font found (apt-get install -y fonts-freefont-ttf); synthetic typography "
            "uses Pillow's bundled default font",
            UserWarning,
            stacklevel=3,
        )
        return (None,)
    return found


@functools.lru_cache(maxsize=512)
def _font(path: str | None, size: int):
    from PIL import ImageFont

    return ImageFont.truetype(path, size) if path else ImageFont.load_default(size=size)


def _fit_font(draw, text: str, path: str | None, max_w: int, max_h: int, spacing: int):
    """Largest font size (binary search) whose multi-line bbox fits in max_w x max_h."""
    lo, hi = 8, max(9, max_h)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        box = draw.multiline_textbbox((0, 0), text, font=_font(path, mid), spacing=spacing, align="center")
        if box[2] - box[0] <= max_w and box[3] - box[1] <= max_h:
            lo = mid
        else:
            hi = mid - 1
    return _font(path, lo)


def render_typographic(
    phrase: str, rng: random.Random, size: int = 224, layout: str = "title", font_variety: int = 0
):
    """One phrase in large bold capitals, ``layout`` ``"title"`` (centred) or ``"list"`` (FigStep-like).

    ``font_variety``: draw the font from the first k bold fonts found (0: all of them).
    """
    from PIL import Image, ImageDraw

    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    background = tuple(rng.randint(225, 255) for _ in range(3))
    ink = rng.choice(((0, 0, 0), (20, 20, 90), (90, 10, 10), (10, 60, 20), (40, 40, 40)))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    fonts = _font_paths()
    path = rng.choice(fonts[:font_variety] if font_variety > 0 else fonts)
    text = textwrap.fill(phrase.upper(), width=10)
    margin = max(4, size // 20)
    spacing = max(2, size // 40)
    if layout == "title":
        font = _fit_font(draw, text, path, size - 2 * margin, int(size * 0.8), spacing)
        box = draw.multiline_textbbox((0, 0), text, font=font, spacing=spacing, align="center")
        w, h = box[2] - box[0], box[3] - box[1]
        x = (size - w) // 2 - box[0] + rng.randint(-margin // 2, margin // 2)
        y = (size - h) // 2 - box[1] + rng.randint(-margin // 2, margin // 2)
        draw.multiline_text((x, y), text, font=font, fill=ink, spacing=spacing, align="center")
    else:
        font = _fit_font(draw, text, path, size - 2 * margin, int(size * 0.55), spacing)
        box = draw.multiline_textbbox((0, 0), text, font=font, spacing=spacing, align="left")
        x, y = margin - box[0] + rng.randint(0, margin // 2), margin - box[1] + rng.randint(0, margin // 2)
        draw.multiline_text((x, y), text, font=font, fill=ink, spacing=spacing, align="left")
        steps_font = _font(path, max(8, size // 10))
        top = y + box[3] + spacing * 2
        draw.multiline_text((margin, top), "1.\n2.\n3.", font=steps_font, fill=ink, spacing=spacing)
    return image


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r * 0.95, cy + r * 0.8), (cx - r * 0.95, cy + r * 0.8)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r * 0.75, cy), (cx, cy + r), (cx - r * 0.75, cy)]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            ang = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(ang), cy + rad * math.sin(ang)))
        return pts
    if shape == "cross":
        t = r * 0.35
        return [
            (cx - t, cy - r),
            (cx + t, cy - r),
            (cx + t, cy - t),
            (cx + r, cy - t),
            (cx + r, cy + t),
            (cx + t, cy + t),
            (cx + t, cy + r),
            (cx - t, cy + r),
            (cx - t, cy + t),
            (cx - r, cy + t),
            (cx - r, cy - t),
            (cx - t, cy - t),
        ]
    raise ValueError(f"unknown shape {shape!r}")


def render_shape(shape: str, colour: str, rng: random.Random, size: int = 224):
    """One large ``colour`` ``shape`` on a light background."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), tuple(rng.randint(230, 255) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    r = size * rng.uniform(0.28, 0.38)
    cx, cy = size / 2 + rng.uniform(-0.08, 0.08) * size, size / 2 + rng.uniform(-0.08, 0.08) * size
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        draw.polygon(_polygon(shape, cx, cy, r), fill=fill)
    return image


def render_object(name: str, rng: random.Random, size: int = 224):
    """A simple flat drawing of ``name`` (one of ``OBJECTS``)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (rng.randint(200, 235), rng.randint(225, 250), 255))
    d = ImageDraw.Draw(image)
    s = size / 224.0
    ox, oy = rng.uniform(-12, 12) * s, rng.uniform(-12, 12) * s

    def box(x0, y0, x1, y1):
        return (x0 * s + ox, y0 * s + oy, x1 * s + ox, y1 * s + oy)

    def pts(*xy):
        return [(x * s + ox, y * s + oy) for x, y in xy]

    if name == "house":
        d.rectangle(box(52, 100, 172, 190), fill=(200, 120, 60))
        d.polygon(pts((40, 104), (112, 40), (184, 104)), fill=(150, 30, 30))
        d.rectangle(box(98, 140, 126, 190), fill=(90, 50, 20))
    elif name == "tree":
        d.rectangle(box(100, 120, 124, 200), fill=(110, 70, 30))
        d.ellipse(box(50, 30, 174, 140), fill=(30, 140, 40))
    elif name == "sun":
        d.ellipse(box(72, 72, 152, 152), fill=(250, 200, 20))
        for k in range(8):
            a = k * math.pi / 4
            d.line(
                pts((112 + 52 * math.cos(a), 112 + 52 * math.sin(a)), (112 + 84 * math.cos(a), 112 + 84 * math.sin(a))),
                fill=(250, 170, 20),
                width=max(2, int(8 * s)),
            )
    elif name == "boat":
        d.polygon(pts((40, 140), (184, 140), (160, 180), (64, 180)), fill=(120, 60, 30))
        d.polygon(pts((114, 40), (114, 134), (170, 134)), fill=(245, 245, 245), outline=(60, 60, 60))
        d.line(pts((112, 36), (112, 140)), fill=(60, 40, 20), width=max(2, int(5 * s)))
    elif name == "flower":
        d.line(pts((112, 120), (112, 205)), fill=(30, 130, 40), width=max(2, int(7 * s)))
        for cx, cy in ((112, 62), (150, 96), (136, 138), (88, 138), (74, 96)):
            d.ellipse(box(cx - 24, cy - 24, cx + 24, cy + 24), fill=(230, 80, 150))
        d.ellipse(box(92, 80, 132, 120), fill=(250, 210, 40))
    else:
        raise ValueError(f"unknown object {name!r}; known: {', '.join(OBJECTS)}")
    return image


@functools.lru_cache(maxsize=None)
def _photo_arrays() -> dict:
    """Real photos from ``skimage.data`` (bundled with scikit-image, no download), as RGB arrays."""
    import numpy as np

    try:
        import skimage.data as skdata
    except ImportError:  # pragma: no cover - scikit-image is a dependency
        warnings.warn("scikit-image is not installed; synthetic data has no real photos", UserWarning, stacklevel=3)
        return {}
    photos = {}
    for name in PHOTOS:
        try:
            arr = np.asarray(getattr(skdata, name)())
        except Exception as err:  # a missing optional data file must not stop generation
            warnings.warn(f"skimage.data.{name} unavailable ({err}); skipping that photo", UserWarning, stacklevel=3)
            continue
        if arr.dtype == bool:
            arr = np.where(arr, 255, 30).astype(np.uint8)
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, axis=-1)
        photos[name] = np.ascontiguousarray(arr[..., :3].astype(np.uint8))
    return photos


def render_photo(name: str, rng: random.Random, size: int = 224):
    """A random crop (70-100% of the short side), maybe mirrored, of a real photo."""
    from PIL import Image, ImageOps

    arr = _photo_arrays()[name]
    h, w = arr.shape[:2]
    side = int(min(h, w) * rng.uniform(0.7, 1.0))
    top, left = rng.randint(0, h - side), rng.randint(0, w - side)
    image = Image.fromarray(arr[top : top + side, left : left + side]).resize((size, size), Image.BILINEAR)
    return ImageOps.mirror(image) if rng.random() < 0.5 else image




def background_scene(rng: random.Random, size: int) -> tuple:
    """(image, facts): a benign image to carry a text-only request: a photo, a shape or an object."""
    photos = list(_photo_arrays())
    pick = rng.random()
    if photos and pick < 0.5:
        name = rng.choice(photos)
        return render_photo(name, rng, size), {"scene": "photo", "photo_name": name}
    if pick < 0.75:
        shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        return render_shape(shape, colour, rng, size), {"scene": "shape", "shape": shape, "colour": colour}
    obj = rng.choice(OBJECTS)
    return render_object(obj, rng, size), {"scene": "object", "object": obj}


def available_photos() -> list[str]:
    """Names of the ``PHOTOS`` that ``skimage.data`` could load here (sorted as in ``PHOTOS``)."""
    return list(_photo_arrays())


__all__ = [
    "LAYOUTS",
    "available_photos",
    "background_scene",
    "render_object",
    "render_photo",
    "render_shape",
    "render_typographic",
]
