"""Opening images safely: the one image path of safevlm.

Every image safevlm reads goes through :func:`decode_image` (dataset records through
:func:`open_image`): the readers, ``safevlm data check``, the collator and the feature cache,
``safevlm classify`` / ``chat`` (``--image``, ``/image``) and the server's ``data:`` URLs. So an
image gives the same pixels in training and at inference. The rules:

* **paths stay inside the image root** (dataset paths): absolute paths and paths that climb
  out of the root (``../../x``, or a symbolic link that points outside) are refused;
* **decompression bombs are refused** from the header, before any pixel is decoded: an image
  whose width × height is over the limit (:data:`MAX_IMAGE_PIXELS`, 89,478,485 = Pillow's
  default; the server passes its own ``max_image_pixels``) raises :class:`ImageTooLarge`,
  also when Pillow itself refuses the header (over twice its limit);
* **broken files are errors with a reason**: missing, a folder, unreadable, zero bytes, not
  an image, truncated;
* **every decodable mode becomes RGB**: CMYK, palette (with or without transparency),
  16-bit and 32-bit grayscale (scaled, not clipped), RGBA / LA (composited on white),
  grayscale and 1-bit; EXIF orientation is applied; an animated image gives its first frame.
"""

from __future__ import annotations

import glob
import io
import os
import posixpath
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from safevlm.data.records import SafetyRecord
from safevlm.errors import UsageError

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image as PILImage


MAX_IMAGE_PIXELS = 89_478_485
"""Largest image (width × height) decoded by default: Pillow's own default limit, used by the
data loaders and the CLI alike. The server's ``max_image_pixels`` setting may only lower it."""


IMAGE_SUFFIXES: tuple[str, ...] = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")
"""File name endings taken as images when a folder is given (``safevlm classify --image DIR``)."""


class ImageError(ValueError):
    """An image that cannot be used; the message says which file and why."""


class ImageTooLarge(ImageError):
    """An image over the pixel limit, found from its header before decoding.

    ``pixels``: width × height from the header; ``limit``: the limit it broke; ``size``:
    ``(width, height)``, or ``None`` when Pillow refused the header before reporting a size.
    """

    def __init__(self, message: str, pixels: int, limit: int, size: "tuple[int, int] | None" = None):
        super().__init__(message)
        self.pixels, self.limit, self.size = pixels, limit, size


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


def _open_stream(source: "str | bytes | os.PathLike"):
    """A binary stream over ``source``; ImageError for missing, folder, unreadable, empty files."""
    if isinstance(source, bytes):
        if len(source) == 0:
            raise ImageError("empty image data (0 bytes)")
        return io.BytesIO(source)
    file = Path(source)
    if not file.exists():
        raise ImageError(f"missing image file: {str(file)!r}")
    if not file.is_file():
        raise ImageError(f"image path is not a file: {str(file)!r}")
    try:
        if file.stat().st_size == 0:
            raise ImageError(f"empty image file (0 bytes): {str(file)!r}")
        return open(file, "rb")
    except OSError as err:
        raise ImageError(f"cannot read image file {str(file)!r}: {err.strerror or err}") from None


def _pillow_bomb(err: Exception, limit: int, name: str) -> ImageTooLarge:
    """Pillow refused the header (over twice ``PIL.Image.MAX_IMAGE_PIXELS``): the same error as
    our own check, with the pixel count Pillow's message gives."""
    from PIL import Image

    found = re.search(r"\((\d+) pixels\)", str(err))
    pixels = int(found.group(1)) if found else 0
    effective = min(limit, 2 * int(Image.MAX_IMAGE_PIXELS))
    count = f"{pixels:,} pixels" if pixels else "more pixels than Pillow accepts"
    return ImageTooLarge(
        f"image is {count}, over the decompression-bomb limit of {effective:,} pixels: {name}",
        pixels=pixels, limit=effective,
    )


def decode_image(
    source: "str | bytes | os.PathLike",
    max_pixels: int | None = None,
    formats: "tuple[str, ...] | None" = None,
) -> "PILImage.Image":
    """Decode a trusted file path or encoded bytes into an RGB image, with the safety checks.

    Args:
        source: a file path (opened as given: dataset paths go through :func:`open_image`)
            or the encoded bytes.
        max_pixels: largest width × height; default :data:`MAX_IMAGE_PIXELS`. Checked from the
            header before decoding. Pillow refuses headers over twice its own limit
            (179M pixels) whatever this says.
        formats: Pillow format names accepted (e.g. ``("PNG", "JPEG")``); default: any.

    Returns:
        an RGB ``PIL.Image`` (first frame, EXIF orientation applied, alpha on white).

    Raises:
        ImageTooLarge: over the pixel limit. ImageError (both are ``ValueError``): any other
        reason the image cannot be used; the message names the file.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    limit = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    name = _describe(source)
    stream = _open_stream(source)
    try:
        with warnings.catch_warnings():
            # We enforce the limit ourselves, with a message that carries the numbers.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            try:
                img = Image.open(stream)
            except Image.DecompressionBombError as err:
                raise _pillow_bomb(err, limit, name) from None
            except UnidentifiedImageError:
                what = "data" if isinstance(source, bytes) else "file"
                raise ImageError(f"{what} is not an image (Pillow cannot identify the format): {name}") from None
            except (OSError, SyntaxError, ValueError, EOFError) as err:
                raise ImageError(f"truncated or corrupt image ({err}): {name}") from None
            if formats is not None and img.format not in formats:
                raise ImageError(f"unsupported image format {img.format}; supported: {', '.join(formats)}: {name}")
            width, height = img.size
            if width * height > limit:
                raise ImageTooLarge(
                    f"image is {width}x{height} = {width * height:,} pixels, over the decompression-bomb "
                    f"limit of {limit:,} pixels: {name}",
                    pixels=width * height, limit=limit, size=(width, height),
                )
            if width < 1 or height < 1:
                raise ImageError(f"image is {width}x{height} pixels: {name}")
            try:
                img.load()  # the first frame of an animated image
            except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as err:
                raise ImageError(f"truncated or corrupt image ({err}): {name}") from None
            try:
                img = ImageOps.exif_transpose(img)
            except Exception:  # a broken EXIF block must not reject an otherwise good image
                pass
            try:
                return to_rgb(img)
            except (ValueError, OSError) as err:  # a mode Pillow cannot convert (e.g. LAB)
                raise ImageError(f"cannot convert image mode {img.mode} to RGB ({err}): {name}") from None
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


def expand_image_paths(specs: "list[str] | tuple[str, ...]") -> list[Path]:
    """The image files named by command-line arguments, in order.

    Each spec is a file (kept as given, even if missing: opening it reports that), a folder
    (its files ending in :data:`IMAGE_SUFFIXES`, sorted, not recursive) or a glob pattern
    (``shots/*.jpg``, ``**`` recurses; matches sorted). Raises :class:`UsageError` for a
    folder without images or a pattern that matches no file.
    """
    found: list[Path] = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            files = sorted(f for f in path.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
            if not files:
                raise UsageError(f"folder {spec!r} holds no image files (looked for {', '.join(IMAGE_SUFFIXES)})")
            found.extend(files)
        elif not path.exists() and any(c in str(spec) for c in "*?["):
            files = sorted(Path(m) for m in glob.glob(str(spec), recursive=True) if Path(m).is_file())
            if not files:
                raise UsageError(f"no file matches {spec!r}")
            found.extend(files)
        else:
            found.append(path)
    return found


__all__ = [
    "IMAGE_SUFFIXES",
    "ImageError",
    "ImageTooLarge",
    "MAX_IMAGE_PIXELS",
    "check_image_path",
    "decode_image",
    "expand_image_paths",
    "open_image",
    "resolve_image_path",
    "to_rgb",
]
