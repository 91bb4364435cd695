"""Images are untrusted input: checked and decoded here, in Python, before any
byte reaches libmtmd (whose stb_image decoder is not hardened).

The order matters: the format is recognised from its magic bytes, the size is
read from the header and checked against :func:`ember.settings.max_image_pixels`
*before* decoding (a 50,000 x 50,000 PNG header is refused without allocating
its pixels), then Pillow decodes the first frame to RGB. Every failure is an
:class:`~ember.errors.ImageError` naming the image (its position and file).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image as PILImage
from PIL import ImageOps

from ember import settings
from ember.errors import ImageError

#: what libmtmd's own decoder (stb_image) reads too, so files that work with
#: llama.cpp's tools work here
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")

#: one image as callers give it: raw file bytes, a path, base64 text (as
#: Ollama's API sends it, or a ``data:`` URL), or a PIL image
ImageInput = Union[bytes, bytearray, memoryview, str, "os.PathLike[str]", Any]

_MAX_FILE_BYTES = 256 * 1024 * 1024
#: the most an image sent as base64 may decode to (the text is checked before decoding)
MAX_BASE64_BYTES = 32 * 1024 * 1024
_DATA_URL = re.compile(r"data:([\w.+-]+/[\w.+-]+)?((?:;[^;,]*)*),", re.ASCII)


@dataclass(frozen=True)
class Image:
    """A validated image: RGB pixels, row-major, 3 bytes per pixel."""

    width: int
    height: int
    rgb: bytes
    key: str  # sha256 of size and pixels: the cache key of the image's embeddings

    def array(self) -> np.ndarray[Any, Any]:
        return np.frombuffer(self.rgb, dtype=np.uint8).reshape(self.height, self.width, 3)


def sniff_format(data: bytes) -> str | None:
    """The image format from its first bytes (None when it is none we read)."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if data.startswith(b"BM"):
        return "BMP"
    return None


def load_image(item: ImageInput, index: int = 0, *, max_pixels: int | None = None) -> Image:
    """Validate and decode one image; ``index`` (0-based) names it in errors."""
    label = f"image {index + 1}"
    pil = _pil_module()
    if isinstance(item, pil.Image):
        return _from_pil(item, label, max_pixels)
    if isinstance(item, str) and not _is_path(item):
        try:
            data = decode_base64(item, label)
        except ImageError:
            if item.startswith("data:"):
                raise
            raise ImageError(f"{label}: no such file, and not base64 image data") from None
        return _decode(data, label, max_pixels)
    if isinstance(item, (str, os.PathLike)):
        path = Path(item).expanduser()
        label = f"{label} ({item})"
        try:
            size = path.stat().st_size
            if size > _MAX_FILE_BYTES:
                raise ImageError(f"{label}: file of {size} bytes is too large for an image")
            data = path.read_bytes()
        except IsADirectoryError:
            raise ImageError(f"{label}: is a directory, not an image") from None
        except FileNotFoundError:
            raise ImageError(f"{label}: no such file") from None
        except OSError as e:
            raise ImageError(f"{label}: cannot be read ({e.strerror or e})") from None
    elif isinstance(item, (bytes, bytearray, memoryview)):
        data = bytes(item)
    else:
        raise ImageError(f"{label}: expected image bytes, a file path or a PIL image, got {type(item).__name__}")
    return _decode(data, label, max_pixels)


def _is_path(text: str) -> bool:
    """A string names a file when one exists there, or when it cannot be
    base64; otherwise it is base64 data, as Ollama's clients take it."""
    if text.startswith("data:"):
        return False
    if len(text) < 4096:
        try:
            if Path(text).expanduser().exists():
                return True
        except (OSError, ValueError):
            pass
    return not _B64_CHARS.fullmatch(text)


_B64_CHARS = re.compile(r"[A-Za-z0-9+/=\s_-]*")


def decode_base64(text: str, label: str = "image", *, max_bytes: int = MAX_BASE64_BYTES) -> bytes:
    """The bytes of an image sent as base64 text or a ``data:`` URL (base64
    only); sizes are checked before decoding."""
    if text.startswith("data:"):
        m = _DATA_URL.match(text)
        if m is None or ";base64" not in m.group(2).lower():
            raise ImageError(f"{label}: only base64 data: URLs are accepted (data:image/png;base64,...)")
        text = text[m.end() :]
    if len(text) // 4 * 3 > max_bytes + 3:
        raise ImageError(f"{label}: {len(text)} characters of base64 decode to more than {max_bytes} bytes, the most an image may have")
    compact = "".join(text.split())
    try:
        data = base64.b64decode(compact + "=" * (-len(compact) % 4), altchars=b"-_" if ("-" in compact or "_" in compact) else None, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError(f"{label}: not valid base64 image data") from None
    return data


def base64_only(item: Any, label: str = "image") -> str:
    """An image a server received (base64 text, or a base64 ``data:`` URL)
    as a ``data:`` URL, which :func:`load_image` reads as base64 only: never
    as a path on the server's machine."""
    if not isinstance(item, str):
        raise ImageError(f"{label}: must be base64 text, got {type(item).__name__}")
    if len(item) // 4 * 3 > MAX_BASE64_BYTES + 64:
        raise ImageError(f"{label}: {len(item)} characters of base64 decode to more than {MAX_BASE64_BYTES} bytes, the most an image may have")
    return item if item.startswith("data:") else "data:;base64," + item


def load_images(items: Sequence[ImageInput] | None, *, max_pixels: int | None = None) -> list[Image]:
    return [load_image(item, i, max_pixels=max_pixels) for i, item in enumerate(items or [])]


def _pil_module() -> Any:
    return PILImage


def _decode(data: bytes, label: str, max_pixels: int | None) -> Image:
    if not data:
        raise ImageError(f"{label}: empty (0 bytes)")
    fmt = sniff_format(data)
    if fmt is None:
        raise ImageError(f"{label}: not an image Ember reads (use PNG, JPEG, WebP, GIF or BMP)")
    pil = _pil_module()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", pil.DecompressionBombWarning)
            img = pil.open(io.BytesIO(data), formats=[fmt])  # reads the header only
    except pil.DecompressionBombError:
        raise ImageError(f"{label}: its header claims more pixels than Ember accepts ({_limit(max_pixels)} pixels); it may be a decompression bomb") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageError(f"{label}: corrupt {fmt} data ({_short(e)})") from None
    with img:
        return _from_pil(img, label, max_pixels, fmt)


def _from_pil(img: Any, label: str, max_pixels: int | None, fmt: str | None = None) -> Image:
    fmt = fmt or (img.format or "").upper() or None
    width, height = img.size
    limit = _limit(max_pixels)
    if width <= 0 or height <= 0:
        raise ImageError(f"{label}: has no pixels ({width}x{height})")
    if width * height > limit:
        raise ImageError(f"{label}: {width}x{height} is more than {limit} pixels; scale it down (EMBER_MAX_IMAGE_PIXELS sets the limit)")
    pil = _pil_module()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", pil.DecompressionBombWarning)
            if getattr(img, "n_frames", 1) > 1:
                img.seek(0)  # animations: the first frame, as llama.cpp's decoder does
            img.load()
            rgb = _to_rgb(img)
    except pil.DecompressionBombError:
        raise ImageError(f"{label}: more pixels than Ember accepts ({limit}); it may be a decompression bomb") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise ImageError(f"{label}: corrupt {fmt or 'image'} data ({_short(e)})") from None
    if rgb.size != (width, height):  # an orientation tag swapped the sides
        width, height = rgb.size
    raw = rgb.tobytes()
    if len(raw) != width * height * 3:
        raise ImageError(f"{label}: decoded to {len(raw)} bytes, expected {width * height * 3}")
    key = hashlib.sha256(f"{width}x{height}:".encode() + raw).hexdigest()
    return Image(width, height, raw, key)


def _to_rgb(img: Any) -> Any:
    """8-bit RGB, upright: EXIF orientation applied (as transformers' loader
    does), alpha dropped (as stb_image does), 16-bit samples shifted to 8."""
    img = ImageOps.exif_transpose(img) or img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(img, dtype=np.uint32) >> 8
        img = _pil_module().fromarray(np.clip(a, 0, 255).astype(np.uint8), "L")
    return img.convert("RGB") if img.mode != "RGB" else img


def _limit(max_pixels: int | None) -> int:
    return max_pixels if max_pixels is not None else settings.max_image_pixels()


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text[:200]


__all__ = ["FORMATS", "MAX_BASE64_BYTES", "Image", "ImageInput", "base64_only", "decode_base64", "load_image", "load_images", "sniff_format"]
