"""Opening dataset images safely.

Every image a dataset names goes through :func:`open_image`, which applies the same rules
everywhere (readers, ``safevlm data check``, the collator):

* **paths stay inside the image root**: absolute paths and paths that climb out of the root
  (``../../x``, or a symbolic link that points outside) are refused;
* **decompression bombs are refused** before decoding: an image whose width × height is
  over Pillow's limit (``PIL.Image.MAX_IMAGE_PIXELS``, 89,478,485 by default) is an error;
* **broken files are errors with a reason**: missing, zero bytes, not an image, truncated;
* **every decodable mode becomes RGB**: CMYK, palette (with or without transparency),
  16-bit and 32-bit grayscale (scaled, not clipped), RGBA / LA (composited on white),
  grayscale and 1-bit; EXIF orientation is applied.
"""

from __future__ import annotations

import io
import os
import posixpath
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from safevlm.data.records import SafetyRecord

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image as PILImage


class ImageError(ValueError):
    """An image that cannot be used; the message says which file and why."""


def _lexical_relative(path: str) -> str:
    """Normalised relative form of a dataset image path, or raise if it leaves the root."""
    if not isinstance(path, str) or not path.strip():
        raise ImageError(f"image path must be a non-empty string, got {path!r}")
    if "\x00" in path:
        raise ImageError(f"image path {path!r} contains a NUL byte")
    unified = path.replace("\\", "/")
    if unified.startswith("/") or os.path.isabs(path) or (len(unified) > 1 and unified[1] == ":"):
        raise ImageError(f"absolute image path {path!r} refused: image paths must be relative to the image root")
    normalised = posixpath.normpath(unified)
    if normalised == ".." or normalised.startswith("../"):
        raise ImageError(f"image path {path!r} escapes the image root")
    return normalised


def check_image_path(path: str) -> None:
    """Raise :class:`ImageError` if a dataset image path is absolute or climbs out of the root.

    A purely lexical check (no file system access), used even when image checks are off.
    """
    _lexical_relative(path)


def resolve_image_path(path: str, image_root: str | os.PathLike) -> Path:
    """The file a dataset image path names under ``image_root``; refuses escapes.

    Raises :class:`ImageError` for absolute paths, ``..`` escapes and symbolic links that
    lead outside the root. The file need not exist.
    """
    relative = _lexical_relative(path)
    root = Path(image_root).resolve()
    full = (root / relative).resolve()
    if full != root and root not in full.parents:
        raise ImageError(f"image path {path!r} escapes the image root {str(root)!r} (it resolves to {str(full)!r})")
    return full


def _to_uint8_gray(img: "PILImage.Image") -> "PILImage.Image":
    """Scale a 16/32-bit integer or float grayscale image to 8 bits (full range, no clipping)."""
    import numpy as np
    from PIL import Image

    arr = np.asarray(img)
    if img.mode == "F":
        arr = arr.astype(np.float64)
        arr = arr * 255.0 if arr.size and np.nanmax(arr) <= 1.0 else arr
        out = np.clip(np.nan_to_num(arr), 0, 255)
    else:  # "I;16", "I;16B", "I;16L", "I;16N", "I" (32-bit) - treated as 16-bit samples
        out = np.clip(arr.astype(np.float64), 0, 65535) / 257.0
    return Image.fromarray(np.rint(out).astype(np.uint8))  # uint8 2-D -> "L"


def to_rgb(img: "PILImage.Image", background: tuple[int, int, int] = (255, 255, 255)) -> "PILImage.Image":
    """Convert any Pillow image to RGB: alpha is composited onto ``background`` (white).

    Palette images with transparency, RGBA, LA and their premultiplied forms are composited;
    16-bit / 32-bit / float grayscale are rescaled to 8 bits; CMYK, YCbCr, LAB, HSV, L, 1 and
    plain palette images are converted.
    """
    from PIL import Image

    mode = img.mode
    if mode == "RGB":
        return img.copy()
    if mode.startswith("I") or mode == "F":
        return _to_uint8_gray(img).convert("RGB")
    if mode == "P" and "transparency" in img.info or mode == "PA":
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, background + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img.convert("RGB")


def _describe(source: "str | bytes | os.PathLike") -> str:
    return f"{len(source)} bytes of image data" if isinstance(source, bytes) else str(source)


def decode_image(source: "str | bytes | os.PathLike", max_pixels: int | None = None) -> "PILImage.Image":
    """Decode a trusted file path or encoded bytes into an RGB image, with the safety checks.

    ``max_pixels`` defaults to ``PIL.Image.MAX_IMAGE_PIXELS`` (``None`` there means no limit).
    Raises :class:`ImageError` naming the file and the reason.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not isinstance(source, bytes):
        file = Path(source)
        if not file.exists():
            raise ImageError(f"missing image file: {str(file)!r}")
        if not file.is_file():
            raise ImageError(f"image path is not a file: {str(file)!r}")
        if file.stat().st_size == 0:
            raise ImageError(f"empty image file (0 bytes): {str(file)!r}")
        stream = open(file, "rb")
    else:
        if len(source) == 0:
            raise ImageError("empty image data (0 bytes)")
        stream = io.BytesIO(source)
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    name = _describe(source)
    try:
        with warnings.catch_warnings():
            # We enforce the limit ourselves, with a message that carries the numbers.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            try:
                img = Image.open(stream)
            except Image.DecompressionBombError as err:
                raise ImageError(f"image over the decompression-bomb limit: {name}: {err}") from None
            except UnidentifiedImageError:
                raise ImageError(f"not an image (Pillow cannot identify the format): {name}") from None
            width, height = img.size
            if limit is not None and width * height > limit:
                raise ImageError(
                    f"image is {width}x{height} = {width * height:,} pixels, over the decompression-bomb "
                    f"limit of {limit:,} pixels: {name}"
                )
            try:
                img.load()
            except (OSError, SyntaxError, ValueError, EOFError) as err:
                raise ImageError(f"truncated or corrupt image ({err}): {name}") from None
            try:
                img = ImageOps.exif_transpose(img)
            except Exception:  # a broken EXIF block must not reject an otherwise good image
                pass
            return to_rgb(img)
    finally:
        stream.close()


def open_image(
    record_or_path: "SafetyRecord | str | bytes | os.PathLike",
    image_root: "str | os.PathLike | None" = None,
    max_pixels: int | None = None,
) -> "PILImage.Image":
    """Open a record's image (or a path, or bytes) as an RGB ``PIL.Image`` with the safety rules.

    * A :class:`SafetyRecord`'s string ``image`` is a dataset path: it is resolved under
      ``image_root`` (default: the current directory) and refused if absolute or escaping.
    * A plain ``str``/``Path`` with ``image_root`` given is treated the same way; with
      ``image_root=None`` it is the caller's own path and opened as given.
    * ``bytes`` are decoded directly.

    Raises :class:`ImageError` (a ``ValueError``) with the file and the reason.
    """
    if isinstance(record_or_path, SafetyRecord):
        image = record_or_path.image
        if image is None:
            raise ImageError(f"record {record_or_path.id!r} has no image")
        if isinstance(image, bytes):
            return decode_image(image, max_pixels)
        return decode_image(resolve_image_path(image, image_root or "."), max_pixels)
    if isinstance(record_or_path, bytes):
        return decode_image(record_or_path, max_pixels)
    if image_root is not None:
        return decode_image(resolve_image_path(str(record_or_path), image_root), max_pixels)
    return decode_image(record_or_path, max_pixels)


__all__ = ["ImageError", "check_image_path", "decode_image", "open_image", "resolve_image_path", "to_rgb"]
