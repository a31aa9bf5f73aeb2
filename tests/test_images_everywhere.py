"""One image path: the data loaders, `safevlm classify` / `chat` and the server decode every image
through ``safevlm.data.images.decode_image``, so tricky files give the same pixels everywhere
(training = inference), and size limits give the same kind of error everywhere."""

from __future__ import annotations

import asyncio
import base64
import io
from types import SimpleNamespace

import numpy as np
import pytest
from data_fixtures import png_bytes
from PIL import Image

from safevlm.commands import chat as chat_command
from safevlm.commands import classify as classify_command
from safevlm.data import ImageError, SafetyRecord, Turn, open_image
from safevlm.data.images import MAX_IMAGE_PIXELS, ImageTooLarge, decode_image
from safevlm.serve import images as serve_images
from safevlm.serve.protocol import APIError

WHITE = [255, 255, 255]


def _grey16(path):
    # a full-range 16-bit ramp: clipping to 8 bits (the old CLI/server path) made most pixels 255
    ramp = np.linspace(0, 65535, 64 * 16).astype(np.uint16).reshape(16, 64)
    Image.fromarray(ramp).save(path)
    return {"size": (64, 16), "pixel": ((0, 0), [0, 0, 0]), "last": ((63, 15), WHITE)}


def _rgba_transparent(path):
    img = Image.new("RGBA", (8, 6), (255, 0, 0, 0))  # fully transparent red ...
    img.putpixel((1, 1), (0, 0, 255, 255))  # ... with one opaque blue pixel
    img.save(path)
    return {"size": (8, 6), "pixel": ((0, 0), WHITE), "last": ((1, 1), [0, 0, 255])}


def _exif_rotated_jpeg(path):
    img = Image.new("RGB", (40, 20), (250, 250, 250))
    img.paste((0, 0, 0), (0, 0, 10, 10))  # a dark block at the top-left of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: rotate 90 degrees clockwise to display
    img.save(path, format="JPEG", exif=exif, quality=95)
    # displayed: 20 wide, 40 tall; the block moves to the top-right
    return {"size": (20, 40), "pixel": ((17, 2), [0, 0, 0]), "last": ((2, 2), [250, 250, 250])}


def _palette_transparent(path):
    img = Image.new("P", (4, 4), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.putpixel((1, 1), 1)
    img.save(path, transparency=0)
    return {"size": (4, 4), "pixel": ((0, 0), WHITE), "last": ((1, 1), [255, 0, 0])}


def _cmyk_jpeg(path):
    Image.new("CMYK", (8, 6), (0, 255, 255, 0)).save(path, format="JPEG", quality=95)
    return {"size": (8, 6), "pixel": ((0, 0), None), "last": None}


def _animated_gif(path):
    frames = [Image.new("RGB", (6, 6), (255, 0, 0)), Image.new("RGB", (6, 6), (0, 0, 255))]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return {"size": (6, 6), "pixel": ((3, 3), [255, 0, 0]), "last": None}  # the first frame


def _la(path):
    img = Image.new("LA", (8, 6), (0, 0))  # black, fully transparent
    img.putpixel((2, 2), (100, 255))
    img.save(path)
    return {"size": (8, 6), "pixel": ((0, 0), WHITE), "last": ((2, 2), [100, 100, 100])}


TRICKY = {
    "grey16.png": _grey16,
    "rgba.png": _rgba_transparent,
    "exif6.jpg": _exif_rotated_jpeg,
    "palette.png": _palette_transparent,
    "cmyk.jpg": _cmyk_jpeg,
    "animated.gif": _animated_gif,
    "la.png": _la,
}
SERVER = SimpleNamespace(max_image_bytes=8 * 2**20, max_image_pixels=4096 * 4096, allow_remote_images=False)


def _data_url(raw: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64," + base64.b64encode(raw).decode()


def every_entry_point(path) -> dict[str, np.ndarray]:
    """The pixels each entry point makes of one file."""
    raw = path.read_bytes()
    record = SafetyRecord("r", path.name, [Turn("user", "hi")], 0, 6, "test")
    return {
        "data loader (record under an image root)": open_image(record, path.parent),
        "data loader (bytes record)": open_image(SafetyRecord("b", raw, [Turn("user", "hi")], 0, 6, "test")),
        "classify --image": classify_command.load_image(str(path)),
        "chat --image": chat_command.load_image(str(path)),
        "server (base64 bytes)": serve_images.open_image(raw, SERVER.max_image_pixels),
        "server (data URL)": asyncio.run(serve_images.load_image(_data_url(raw), SERVER)),
    }


@pytest.mark.parametrize("name", sorted(TRICKY))
def test_tricky_files_give_identical_pixels_everywhere(tmp_path, name):
    path = tmp_path / name
    expected = TRICKY[name](path)
    outputs = every_entry_point(path)
    reference = np.asarray(outputs["data loader (record under an image root)"])
    for entry, image in outputs.items():
        assert image.mode == "RGB", entry
        assert image.size == expected["size"], entry
        assert np.array_equal(np.asarray(image), reference), f"{entry} differs from the data loader on {name}"
    for check in ("pixel", "last"):
        if expected[check] is not None and expected[check][1] is not None:
            (x, y), rgb = expected[check]
            assert np.abs(reference[y, x].astype(int) - rgb).max() <= 3, (name, check, reference[y, x])


def test_sixteen_bit_grey_is_scaled_not_clipped_at_inference(tmp_path):
    path = tmp_path / "grey16.png"
    _grey16(path)
    pixels = np.asarray(classify_command.load_image(str(path)))[..., 0]
    assert (pixels == 255).mean() < 0.01  # clipping sent 89% of these to 255
    stored = np.linspace(0, 65535, 64 * 16).astype(np.uint16).reshape(16, 64)
    assert np.array_equal(pixels, np.rint(stored / 257).astype(np.uint8))


def test_cmyk_is_red_everywhere(tmp_path):
    path = tmp_path / "cmyk.jpg"
    _cmyk_jpeg(path)
    r, g, b = np.asarray(classify_command.load_image(str(path)))[0, 0].tolist()
    assert r > 200 and g < 60 and b < 60


# -- limits: one constant, one error type, the same answer at every entry point ---------------------


def test_one_pixel_limit_equal_to_pillows_default():
    assert MAX_IMAGE_PIXELS == 89_478_485 == int(1024 * 1024 * 1024 // 4 // 3)


@pytest.mark.parametrize("width, height", [(10_000, 10_000), (20_000, 20_000)])
def test_over_the_limit_is_refused_from_the_header_everywhere(tmp_path, width, height):
    # 100M pixels (between Pillow's warning and its own error) and 400M (Pillow refuses the header)
    raw = png_bytes(width, height)
    assert len(raw) < 100
    path = tmp_path / "huge.png"
    path.write_bytes(raw)
    for load in (lambda: open_image(SafetyRecord("r", "huge.png", [Turn("user", "x")], 0, 6, "t"), tmp_path),
                 lambda: classify_command.load_image(str(path))):
        with pytest.raises(ImageTooLarge, match=rf"{width * height:,} pixels, over the decompression-bomb limit"):
            load()
    with pytest.raises(APIError) as server:
        serve_images.open_image(raw, SERVER.max_image_pixels)
    assert (server.value.status, server.value.code) == (413, "image_too_large")
    assert f"{width * height} pixels; the limit is {4096 * 4096}" in server.value.message
    with pytest.raises(APIError) as via_url:
        asyncio.run(serve_images.load_image(_data_url(raw), SERVER))
    assert (via_url.value.status, via_url.value.code) == (413, "image_too_large")


def test_server_limit_never_above_the_one_constant():
    # a server configured above MAX_IMAGE_PIXELS (and above 2 x Pillow's limit) still answers 413 at the constant
    for width, height in [(10_000, 10_000), (20_000, 20_000)]:
        with pytest.raises(APIError) as err:
            serve_images.open_image(png_bytes(width, height), 10**9)
        assert (err.value.status, err.value.code) == (413, "image_too_large")
        assert err.value.message.endswith(f"{width * height} pixels; the limit is {MAX_IMAGE_PIXELS}")


def test_server_keeps_its_format_list_and_codes():
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, format="TIFF")
    with pytest.raises(APIError) as err:
        serve_images.open_image(buffer.getvalue(), SERVER.max_image_pixels)
    assert (err.value.status, err.value.code) == (400, "invalid_image")
    assert err.value.message == "unsupported image format TIFF; supported: PNG, JPEG, WEBP, GIF, BMP"
    with pytest.raises(APIError) as err:
        serve_images.open_image(b"hello, not a picture", SERVER.max_image_pixels)
    assert err.value.message == "the data is not an image (supported: PNG, JPEG, WEBP, GIF, BMP)"
    # the same TIFF is fine for the data loaders and the CLI (no format list there)
    assert decode_image(buffer.getvalue()).size == (4, 4)
    with pytest.raises(ImageError, match="unsupported image format TIFF"):
        decode_image(buffer.getvalue(), formats=("PNG",))
