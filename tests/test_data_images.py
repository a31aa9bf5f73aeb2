"""open_image: bad files are errors with reasons, odd modes become RGB, paths stay in the root."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import png_bytes, truncated_png, write_image
from PIL import Image

from safevlm.data import ImageError, SafetyRecord, Turn, check_image_path, open_image, resolve_image_path
from safevlm.data.images import MAX_IMAGE_PIXELS, ImageTooLarge, decode_image, expand_image_paths
from safevlm.errors import UsageError


def record(image) -> SafetyRecord:
    return SafetyRecord("r1", image, [Turn("user", "hi")], 0, 6, "test")


# ------------------------------------------------------------------ broken files


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(ImageError, match=r"missing image file: .*nope\.png"):
        open_image(record("nope.png"), tmp_path)


def test_zero_byte_file(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty image file \(0 bytes\)"):
        open_image(record("empty.png"), tmp_path)


def test_empty_bytes():
    with pytest.raises(ImageError, match=r"empty image data \(0 bytes\)"):
        open_image(record(b""))


def test_non_image_file(tmp_path):
    (tmp_path / "notes.png").write_text("this is not a picture\n")
    with pytest.raises(ImageError, match="not an image"):
        open_image(record("notes.png"), tmp_path)


def test_truncated_file(tmp_path):
    truncated_png(tmp_path / "cut.png")
    with pytest.raises(ImageError, match="truncated or corrupt image"):
        open_image(record("cut.png"), tmp_path)


def test_directory_is_not_an_image(tmp_path):
    (tmp_path / "folder").mkdir()
    with pytest.raises(ImageError, match="not a file"):
        open_image(record("folder"), tmp_path)


# ------------------------------------------------------------------ decompression bombs


def test_header_over_pillow_bomb_limit_is_refused_before_decoding(tmp_path):
    # 20,000 x 20,000 = 400M pixels (> 2 x Pillow's 89.5M limit) announced by a tiny file
    (tmp_path / "bomb.png").write_bytes(png_bytes(20_000, 20_000))
    with pytest.raises(ImageTooLarge, match="400,000,000 pixels, over the decompression-bomb limit of 89,478,485") as err:
        open_image(record("bomb.png"), tmp_path)
    # the same error type (and numbers) as an image our own check refuses
    assert (err.value.pixels, err.value.limit, err.value.size) == (400_000_000, MAX_IMAGE_PIXELS, None)
    assert isinstance(err.value, ImageError) and isinstance(err.value, ValueError)


def test_image_between_one_and_two_times_the_limit_is_refused(tmp_path):
    # Pillow itself only warns below 2x its limit; we refuse, with the numbers
    (tmp_path / "big.png").write_bytes(png_bytes(10_000, 10_000))
    with pytest.raises(
        ImageError, match=r"10000x10000 = 100,000,000 pixels, over the decompression-bomb limit of 89,478,485"
    ):
        open_image(record("big.png"), tmp_path)


def test_custom_pixel_limit(tmp_path):
    write_image(tmp_path / "ok.png", size=(20, 10))
    with pytest.raises(ImageTooLarge, match="20x10 = 200 pixels, over the decompression-bomb limit of 100") as err:
        open_image(record("ok.png"), tmp_path, max_pixels=100)
    assert (err.value.pixels, err.value.limit, err.value.size) == (200, 100, (20, 10))
    assert open_image(record("ok.png"), tmp_path, max_pixels=200).size == (20, 10)


def test_format_allow_list(tmp_path):
    path = write_image(tmp_path / "x.bmp", fmt="BMP")
    assert decode_image(path, formats=("BMP", "PNG")).size == (8, 6)
    with pytest.raises(ImageError, match=rf"unsupported image format BMP; supported: PNG, JPEG: {path}$"):
        decode_image(path, formats=("PNG", "JPEG"))


def test_expand_image_paths_files_folders_and_globs(tmp_path):
    for name in ("b.png", "a.JPG", "c.webp", "notes.txt"):
        (tmp_path / "shots" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "shots" / name).write_bytes(b"x")
    (tmp_path / "shots" / "sub").mkdir()
    (tmp_path / "shots" / "sub" / "d.png").write_bytes(b"x")
    shots = tmp_path / "shots"
    assert expand_image_paths([str(shots)]) == [shots / "a.JPG", shots / "b.png", shots / "c.webp"]  # sorted, no recursion
    assert expand_image_paths([f"{shots}/*.png", f"{shots}/**/*.png"]) == [
        shots / "b.png", shots / "b.png", shots / "sub" / "d.png"
    ]
    # a plain file is kept as given (missing ones are reported when opened), in the given order
    assert expand_image_paths(["z.png", str(shots / "b.png")]) == [Path("z.png"), shots / "b.png"]
    with pytest.raises(UsageError, match=rf"^no file matches '{shots}/\*\.gif'$"):
        expand_image_paths([f"{shots}/*.gif"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match=rf"folder '{tmp_path}/empty' holds no image files \(looked for .bmp, .gif"):
        expand_image_paths([str(tmp_path / "empty")])


# ------------------------------------------------------------------ modes are converted, not rejected


@pytest.mark.parametrize(
    "mode, fmt, expected",
    [
        ("RGB", "PNG", (10, 200, 30)),
        ("L", "PNG", (77, 77, 77)),
        ("CMYK", "JPEG", None),  # red-ish after JPEG; checked below
        ("RGBA", "PNG", (255, 255, 255)),  # fully transparent -> white background
        ("LA", "PNG", (255, 255, 255)),
        ("P", "PNG", (200, 10, 10)),
        ("1", "PNG", (0, 0, 0)),
    ],
)
def test_modes_become_rgb(tmp_path, mode, fmt, expected):
    write_image(tmp_path / f"img.{fmt.lower()}", mode=mode, fmt=fmt)
    with Image.open(tmp_path / f"img.{fmt.lower()}") as raw:
        assert raw.mode == mode  # the file really is in that mode
    img = open_image(record(f"img.{fmt.lower()}"), tmp_path)
    assert img.mode == "RGB" and img.size == (8, 6)
    pixel = img.getpixel((0, 0))
    if expected is None:
        assert pixel[0] > 200 and pixel[1] < 60 and pixel[2] < 60
    else:
        assert pixel == expected


def test_palette_with_transparency_is_composited_on_white(tmp_path):
    img = Image.new("P", (4, 4), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.putpixel((1, 1), 1)
    img.info["transparency"] = 0
    img.save(tmp_path / "pt.png", transparency=0)
    out = open_image(record("pt.png"), tmp_path)
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 1)) == (255, 0, 0)


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    write_image(tmp_path / "deep.png", mode="I;16")
    with Image.open(tmp_path / "deep.png") as raw:
        assert raw.mode.startswith("I")
    out = np.asarray(open_image(record("deep.png"), tmp_path))
    assert out[0, 0].tolist() == [128, 128, 128]  # 32896 / 257
    assert out[0, -1].tolist() == [255, 255, 255]  # 65535 / 257


def test_bytes_and_plain_paths(tmp_path):
    path = write_image(tmp_path / "x.png")
    assert open_image(path.read_bytes()).getpixel((0, 0)) == (10, 200, 30)
    assert open_image(str(path)).size == (8, 6)  # a caller's own path, no root: opened as given


# ------------------------------------------------------------------ the image root


@pytest.mark.parametrize(
    "bad", ["../../x.png", "../x.png", "a/../../x.png", "/etc/passwd", "\\\\server\\x.png", "C:\\x.png"]
)
def test_paths_escaping_the_root_are_refused(tmp_path, bad):
    with pytest.raises(ImageError, match="escapes the image root|absolute image path"):
        check_image_path(bad)
    with pytest.raises(ImageError, match="escapes the image root|absolute image path"):
        open_image(record(bad), tmp_path)


def test_inner_dotdot_that_stays_inside_is_allowed(tmp_path):
    write_image(tmp_path / "a" / "x.png")
    assert resolve_image_path("a/b/../x.png", tmp_path) == (tmp_path / "a" / "x.png").resolve()
    assert open_image(record("a/b/../x.png"), tmp_path).size == (8, 6)


def test_symlink_out_of_the_root_is_refused(tmp_path):
    outside = write_image(tmp_path / "outside" / "secret.png")
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(outside, root / "link.png")
    with pytest.raises(ImageError, match="escapes the image root"):
        open_image(record("link.png"), root)


def test_plain_path_with_a_root_is_checked_too(tmp_path):
    with pytest.raises(ImageError, match="escapes the image root"):
        open_image("../x.png", tmp_path)


def test_record_without_image():
    with pytest.raises(ImageError, match="has no image"):
        open_image(record(None))
