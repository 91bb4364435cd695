"""Images are untrusted: every way an image can be wrong is one ImageError
naming the image, found before any pixel is decoded where the header says
enough (decompression bombs), and never a crash."""

from __future__ import annotations

import io
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from image_fixtures import png_header_only
from PIL import Image as PILImage

from ember.errors import ImageError  # noqa: E402
from ember.images import load_image, load_images, sniff_format  # noqa: E402


def encoded(img: PILImage.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()




RGB = PILImage.fromarray(np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3), "RGB")


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "GIF", "WEBP", "JPEG"])
def test_every_format_stb_image_reads_decodes_to_rgb(fmt: str) -> None:
    kw = {"lossless": True} if fmt == "WEBP" else {"quality": 100} if fmt == "JPEG" else {}
    data = encoded(RGB, fmt, **kw)
    assert sniff_format(data) == fmt
    img = load_image(data)
    assert (img.width, img.height) == (6, 4)
    if fmt in ("PNG", "BMP", "WEBP"):  # lossless
        assert img.rgb == RGB.tobytes()
    assert len(img.key) == 64 and img.key == load_image(data).key


def test_same_pixels_same_key_different_pixels_different_key() -> None:
    a = load_image(encoded(RGB, "PNG"))
    assert load_image(encoded(RGB, "BMP")).key == a.key  # the key is of the pixels, not the file
    other = RGB.copy()
    other.putpixel((0, 0), (255, 255, 255))
    assert load_image(encoded(other, "PNG")).key != a.key


def test_alpha_palette_gray_and_16_bit_become_rgb() -> None:
    rgba = PILImage.new("RGBA", (3, 2), (10, 20, 30, 0))
    assert load_image(encoded(rgba, "PNG")).rgb == bytes([10, 20, 30] * 6)  # alpha dropped, as stb_image does
    assert load_image(encoded(PILImage.new("L", (2, 2), 77), "PNG")).rgb == bytes([77] * 12)
    assert load_image(encoded(PILImage.new("P", (2, 2), 3), "GIF")).width == 2
    deep = PILImage.fromarray(np.full((2, 2), 0x8000, dtype=np.uint16))
    assert load_image(encoded(deep, "PNG")).rgb == bytes([128] * 12)


def test_exif_orientation_is_applied() -> None:
    exif = PILImage.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    img = load_image(encoded(RGB, "JPEG", exif=exif.tobytes()))
    assert (img.width, img.height) == (4, 6)


def test_gif_first_frame() -> None:
    frames = [PILImage.new("RGB", (2, 2), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    assert load_image(buf.getvalue()).rgb[:3] == bytes([255, 0, 0])


def test_one_pixel_image_is_accepted() -> None:
    img = load_image(encoded(PILImage.new("RGB", (1, 1), (1, 2, 3)), "PNG"))
    assert (img.width, img.height, img.rgb) == (1, 1, bytes([1, 2, 3]))


def test_decompression_bomb_refused_from_the_header_without_allocating() -> None:
    data = png_header_only(50_000, 50_000)
    tracemalloc.start()
    try:
        with pytest.raises(ImageError) as e:
            load_image(data, 2)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    msg = str(e.value)
    assert msg.startswith("image 3:") and "pixels" in msg and "\n" not in msg
    assert peak < 16 * 1024 * 1024  # 7.5 GB of pixels were never allocated


def test_pixel_limit_is_a_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    data = encoded(PILImage.new("RGB", (100, 100)), "PNG")
    monkeypatch.setenv("EMBER_MAX_IMAGE_PIXELS", "9999")
    with pytest.raises(ImageError, match=r"100x100 is more than 9999 pixels.*EMBER_MAX_IMAGE_PIXELS"):
        load_image(data)
    monkeypatch.setenv("EMBER_MAX_IMAGE_PIXELS", "10000")
    assert load_image(data).width == 100


@pytest.mark.parametrize(
    ("data", "expect"),
    [
        (b"", "empty"),
        (b"hello, this is text", "not an image"),
        (b"%PDF-1.4 ...", "not an image"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "corrupt PNG"),
        (b"\xff\xd8\xff\xe0" + b"garbage" * 10, "corrupt JPEG"),
        (b"GIF89a" + b"\x00" * 3, "corrupt GIF"),
        (b"RIFF\x00\x00\x00\x00WEBPVP8 junk", "corrupt WEBP"),
        (b"BM" + b"\xff" * 60, "corrupt BMP"),
    ],
)
def test_corrupt_bytes_are_one_line_errors_naming_the_image(data: bytes, expect: str) -> None:
    with pytest.raises(ImageError) as e:
        load_images([encoded(RGB, "PNG"), data])
    assert str(e.value).startswith("image 2:") and expect in str(e.value) and "\n" not in str(e.value)


def test_truncated_files_are_refused() -> None:
    for fmt in ("PNG", "JPEG", "WEBP"):
        big = PILImage.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8), "RGB")
        data = encoded(big, fmt)
        with pytest.raises(ImageError, match="corrupt"):
            load_image(data[: len(data) // 2])


def test_paths_and_pil_images(tmp_path: Path) -> None:
    f = tmp_path / "a.png"
    f.write_bytes(encoded(RGB, "PNG"))
    assert load_image(f).rgb == load_image(str(f)).rgb == load_image(RGB).rgb
    with pytest.raises(ImageError, match=r"image 1 \(.*missing.png\): no such file"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="is a directory"):
        load_image(tmp_path)
    with pytest.raises(ImageError, match="expected image bytes"):
        load_image(42)
