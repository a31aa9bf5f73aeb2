"""Image inputs of the server: ``data:`` URLs with base64 images, and (only when the server
was started with ``--allow-remote-images``) http(s) URLs.

Sizes are checked before anything is decoded: the base64 text's length bounds the decoded
size, and the image header gives the pixel count before any pixel is decompressed.
"""

from __future__ import annotations

import base64
import binascii

from safevlm.serve.protocol import APIError

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")


def _bad(code: str, message: str, status: int = 400) -> APIError:
    return APIError(status, code, message, param="messages")


def parse_data_url(url: str, max_image_bytes: int) -> bytes:
    """The bytes of a ``data:image/...;base64,...`` URL; APIError for anything else."""
    header, sep, payload = url.partition(",")
    if not sep or not header.startswith("data:"):
        raise _bad("invalid_image_url", "an image data URL must look like data:image/png;base64,<data>")
    params = header[len("data:"):].split(";")
    media_type = params[0].strip().lower()
    if "base64" not in [p.strip().lower() for p in params[1:]]:
        raise _bad("invalid_image_url", "image data URLs must be base64-encoded (data:image/...;base64,<data>)")
    if media_type and not media_type.startswith("image/"):
        raise _bad("invalid_image", f"the data URL holds {media_type!r}, not an image")
    # base64 encodes 3 bytes in 4 characters: check the size before decoding anything
    limit_chars = 4 * -(-max_image_bytes // 3)
    payload = payload.strip()
    if len(payload) > limit_chars + 4:
        estimate = len(payload) * 3 // 4
        raise _bad(
            "image_too_large",
            f"the image is about {estimate} bytes; the limit is {max_image_bytes} bytes",
            status=413,
        )
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as err:
        raise _bad("invalid_base64", f"the image data is not valid base64 ({err})") from None
    if len(raw) > max_image_bytes:
        raise _bad("image_too_large", f"the image is {len(raw)} bytes; the limit is {max_image_bytes} bytes", status=413)
    if not raw:
        raise _bad("invalid_image", "the image data is empty")
    return raw


def open_image(raw: bytes, max_image_pixels: int):
    """An RGB PIL image from encoded bytes, through :func:`safevlm.data.images.decode_image` (the
    same pixels as training and the CLI); the pixel count is checked from the header first.

    APIError 413 ``image_too_large`` over ``max_image_pixels`` (never above the data loaders'
    ``MAX_IMAGE_PIXELS``; also for headers Pillow itself refuses as decompression bombs), 400
    ``invalid_image`` for anything else that is wrong.
    """
    from safevlm.data.images import MAX_IMAGE_PIXELS, ImageError, ImageTooLarge, decode_image

    max_image_pixels = min(max_image_pixels, MAX_IMAGE_PIXELS)
    try:
        return decode_image(raw, max_pixels=max_image_pixels, formats=ALLOWED_FORMATS)
    except ImageTooLarge as err:
        size = f"{err.size[0]}x{err.size[1]} = " if err.size else ""
        found = f"is {size}{err.pixels} pixels" if err.pixels else "has more pixels than the decoder accepts"
        raise _bad("image_too_large", f"the image {found}; the limit is {min(err.limit, max_image_pixels)}",
                   status=413) from None
    except ImageError as err:
        message = str(err).removesuffix(f": {len(raw)} bytes of image data")
        if "is not an image" in message:
            message = "the data is not an image (supported: " + ", ".join(ALLOWED_FORMATS) + ")"
        raise _bad("invalid_image", message) from None


def decode_image_url(url: str, settings) -> tuple[str, bytes | None]:
    """Classify an image URL: ``("data", bytes)`` for a data URL (checked and decoded), or
    ``("remote", None)`` for an http(s) URL the server may fetch; APIError otherwise."""
    if url.startswith("data:"):
        return "data", parse_data_url(url, settings.max_image_bytes)
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme in ("http", "https"):
        if not settings.allow_remote_images:
            raise _bad(
                "remote_images_disabled",
                "this server does not fetch image URLs; send the image as a data: URL with base64 "
                "(or start the server with --allow-remote-images)",
            )
        return "remote", None
    raise _bad("invalid_image_url", f"unsupported image URL scheme {scheme or url[:16]!r}; use data: (or http(s) when allowed)")


async def fetch_remote(url: str, settings) -> bytes:
    """Download an http(s) image with the size and time limits (only with --allow-remote-images)."""
    import httpx

    if not settings.allow_remote_images:  # defence in depth: never fetch unless told to
        raise _bad("remote_images_disabled", "this server does not fetch image URLs")
    try:
        async with httpx.AsyncClient(timeout=settings.remote_image_timeout_s, follow_redirects=True,
                                     max_redirects=3) as client:
            async with client.stream("GET", url) as response:
                if response.status_code != 200:
                    raise _bad("image_fetch_failed", f"fetching the image URL gave HTTP {response.status_code}")
                declared = response.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > settings.max_image_bytes:
                    raise _bad("image_too_large", f"the image is {declared} bytes; the limit is "
                               f"{settings.max_image_bytes} bytes", status=413)
                chunks, total = [], 0
                async for chunk in response.aiter_bytes():
                    total += len(chunk)
                    if total > settings.max_image_bytes:
                        raise _bad("image_too_large", f"the image exceeds the limit of {settings.max_image_bytes} bytes",
                                   status=413)
                    chunks.append(chunk)
    except httpx.HTTPError as err:
        raise _bad("image_fetch_failed", f"fetching the image URL failed ({type(err).__name__})") from None
    return b"".join(chunks)


async def load_image(url: str, settings, fetched: dict[str, str] | None = None):
    """A validated RGB PIL image from a data: URL or (when allowed) an http(s) URL.

    ``fetched``: when given, a downloaded image's bytes are recorded there as a data URL
    (``{url: "data:image/...;base64,..."}``): the guard proxy forwards those bytes, the ones the
    guard judged, never the URL (which could serve another image the second time)."""
    from starlette.concurrency import run_in_threadpool

    kind, raw = await run_in_threadpool(decode_image_url, url, settings)
    if kind == "remote":
        raw = await fetch_remote(url, settings)
    image = await run_in_threadpool(open_image, raw, settings.max_image_pixels)
    if kind == "remote" and fetched is not None:
        fetched[url] = f"data:{_media_type(raw)};base64," + base64.b64encode(raw).decode("ascii")
    return image


_SIGNATURES = ((b"\x89PNG", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF8", "image/gif"), (b"BM", "image/bmp"))


def _media_type(raw: bytes) -> str:
    """The media type of image bytes :func:`open_image` accepted, from their signature."""
    if raw[:4] == b"RIFF" and raw[8:12] == b"WEBP":
        return "image/webp"
    return next((media for magic, media in _SIGNATURES if raw.startswith(magic)), "application/octet-stream")


__all__ = ["ALLOWED_FORMATS", "decode_image_url", "fetch_remote", "load_image", "open_image", "parse_data_url"]
