"""Faithful image and caption decoding: the one way every reader turns stored bytes into RGB pixels.

Used by the shard loader (``ldm.data.webdata``), the folder builder (``ldm.data.folder``) and the evaluation
readers, so a file gives the same pixels wherever it is read. :func:`decode_rgb` does, in order:

1. **Header checks before decoding.** Zero bytes, an unknown format, and more than ``max_pixels`` pixels
   (read from the header; JPEGs are first switched to DCT-domain downscaling, ``draft``, when the caller
   will shrink them to ``min_side`` anyway, so a 150-megapixel photo for 256-px training decodes at 1/8
   scale and passes) are refused without decoding a pixel.
2. **Decoding**, every error of the decoder (truncated data and the like) becoming ``corrupt_image``.
3. **EXIF orientation** (tag 0x0112, EXIF 2.32 §4.6.4 table 4): the 8 values map to the transposes below.
4. **Modes to 8-bit RGB.** 16-bit grey (``I;16*``, and ``I`` taken as 0..65535) is scaled as
   round(v / 257), 65535 / 255 = 257; float ``F`` is taken as 0..1; ``CMYK`` JPEGs follow the Adobe
   convention (inverted samples) only when they carry the Adobe APP14 marker, as browsers do (Pillow always
   assumes it). Palette, grey, CMYK, YCbCr, 1-bit go through Pillow's conversions.
5. **One alpha policy.** Anything with transparency (RGBA, LA, PA, palette or grey/RGB with a
   ``transparency`` key) is composited on ``background`` with the *over* operator of Porter & Duff
   (1984, "Compositing Digital Images", the ``A over B`` row of table 1) for an opaque backdrop:
   C = α·F + (1 − α)·B, rounded to the nearest integer.

Captions are strict UTF-8 (a leading byte-order mark is dropped). Everything unusable raises
:class:`DecodeError` whose ``reason`` is one of :data:`DECODE_REASONS`, so callers count each kind apart.
"""

from __future__ import annotations

import io
import random
import warnings
from typing import Sequence

import numpy as np
from PIL import Image, ImageChops, ImageColor, UnidentifiedImageError

DEFAULT_BACKGROUND: tuple[int, int, int] = (255, 255, 255)
DEFAULT_MAX_PIXELS = 64_000_000
ORIENTATION_TAG = 0x0112
# EXIF orientation → the transposes that bring the stored pixels upright (applied left to right)
_ORIENT: dict[int, tuple[Image.Transpose, ...]] = {
    2: (Image.Transpose.FLIP_LEFT_RIGHT,),
    3: (Image.Transpose.ROTATE_180,),
    4: (Image.Transpose.FLIP_TOP_BOTTOM,),
    5: (Image.Transpose.TRANSPOSE,),
    6: (Image.Transpose.ROTATE_270,),
    7: (Image.Transpose.TRANSVERSE,),
    8: (Image.Transpose.ROTATE_90,),
}
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")

DECODE_REASONS: dict[str, str] = {
    "empty_file": "zero-byte image file",
    "unknown_format": "not an image format Pillow can identify",
    "corrupt_image": "damaged or truncated image data",
    "too_many_pixels": "more pixels than max_pixels (refused from the header, not decoded)",
    "unsupported_mode": "a pixel format without an RGB conversion",
    "invalid_utf8": "caption bytes that are not valid UTF-8",
}


class DecodeError(ValueError):
    """One input cannot be used; ``reason`` is a short key (see ``DECODE_REASONS`` and the callers' lists)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def parse_background(value: str | Sequence[int] | None) -> tuple[int, int, int]:
    """A colour name or ``#rrggbb`` (Pillow's colour syntax) or an (r, g, b) triple → (r, g, b) in 0..255."""
    if value is None:
        return DEFAULT_BACKGROUND
    if isinstance(value, str) and "," in value and "(" not in value:  # r,g,b
        try:
            value = [int(c) for c in value.split(",")]
        except ValueError as e:
            raise ValueError(f"background {value!r} is not a colour: use a name (white), #rrggbb or r,g,b") from e
    if isinstance(value, str):
        try:
            rgb = ImageColor.getrgb(value)
        except ValueError as e:
            raise ValueError(f"background {value!r} is not a colour: use a name (white), #rrggbb or r,g,b") from e
        return tuple(int(c) for c in rgb[:3])  # type: ignore[return-value]
    rgb = tuple(int(c) for c in value)
    if len(rgb) != 3 or not all(0 <= c <= 255 for c in rgb):
        raise ValueError(f"background {tuple(value)} must be three integers in 0..255")
    return rgb  # type: ignore[return-value]


def decode_caption(data: bytes) -> str:
    """Caption bytes → stripped text; raises ``DecodeError("invalid_utf8")`` for bytes that are not UTF-8."""
    try:
        return data.decode("utf-8-sig").strip()
    except UnicodeDecodeError as e:
        raise DecodeError("invalid_utf8", f"caption is not valid UTF-8 ({e.reason} at byte {e.start})") from e


def open_image(data: bytes, max_pixels: int | None = DEFAULT_MAX_PIXELS, min_side: int | None = None) -> Image.Image:
    """Open ``data`` lazily (header only) and refuse it before decoding if it is empty, unknown or too large.

    With ``min_side``, a JPEG is set to decode at the smallest 1/2, 1/4 or 1/8 scale whose both sides stay
    >= ``min_side``; the pixel limit applies to what will be decoded.
    """
    if not data:
        raise DecodeError("empty_file", "image file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():  # the pixel limit below is ours; Pillow's warning would only repeat it
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise DecodeError("too_many_pixels", f"image refused from its header: {e}") from e
    except UnidentifiedImageError as e:
        raise DecodeError("unknown_format", "not a readable image format") from e
    except Exception as e:  # noqa: BLE001 - a damaged header raises anything from SyntaxError to struct.error
        raise DecodeError("corrupt_image", f"damaged image header ({type(e).__name__}: {e})") from e
    if min_side and image.format == "JPEG":
        image.draft(None, (min_side, min_side))
    w, h = image.size
    if w < 1 or h < 1:
        raise DecodeError("corrupt_image", f"image has no pixels ({w}x{h})")
    if max_pixels is not None and w * h > max_pixels:
        raise DecodeError("too_many_pixels", f"{w}x{h} = {w * h / 1e6:.1f} MP is over the limit of "
                                             f"{max_pixels / 1e6:.1f} MP (max_pixels)")
    return image


def orientation(image: Image.Image) -> int:
    """The EXIF orientation (1..8) of a loaded image; 1 when absent or unreadable."""
    try:
        value = int(image.getexif().get(ORIENTATION_TAG, 1))
    except Exception:  # noqa: BLE001 - a damaged EXIF block does not make the pixels unusable
        return 1
    return value if value in _ORIENT else 1


def _eight_bit(image: Image.Image) -> Image.Image:
    """High-depth grey modes → ``L`` (see the module docstring for the scales)."""
    if image.mode.startswith("I;16") or image.mode == "I":
        wide = np.asarray(image).astype(np.int64)
        return Image.fromarray(((np.clip(wide, 0, 65535) + 128) // 257).astype(np.uint8), "L")
    if image.mode == "F":
        unit = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0)
        return Image.fromarray(np.rint(np.clip(unit, 0.0, 1.0) * 255).astype(np.uint8), "L")
    return image


def composite(rgba: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Straight-alpha RGBA over an opaque ``background``: C = round(α·F + (1 − α)·B) per channel."""
    a = np.asarray(rgba, dtype=np.uint32)
    alpha = a[..., 3:4]
    out = (a[..., :3] * alpha + np.asarray(background, np.uint32) * (255 - alpha) + 127) // 255
    return Image.fromarray(out.astype(np.uint8), "RGB")


def to_rgb(image: Image.Image, background: tuple[int, int, int] = DEFAULT_BACKGROUND) -> Image.Image:
    """A loaded image of any mode → upright 8-bit RGB, transparency composited on ``background``."""
    turns = _ORIENT.get(orientation(image), ())
    if image.mode == "CMYK" and image.format == "JPEG" and "adobe" not in image.info:
        image = ImageChops.invert(image)  # Pillow read it with Adobe polarity; without the marker it is plain
    for method in turns:
        image = image.transpose(method)
    image = _eight_bit(image)
    if image.mode in ALPHA_MODES or "transparency" in image.info:
        return composite(image.convert("RGBA"), background)
    return image if image.mode == "RGB" else image.convert("RGB")


def decode_rgb(data: bytes, background: tuple[int, int, int] = DEFAULT_BACKGROUND,
               max_pixels: int | None = DEFAULT_MAX_PIXELS, min_side: int | None = None) -> Image.Image:
    """Image bytes → upright RGB (the steps of the module docstring); raises :class:`DecodeError`.

    ``min_side``: the caller shrinks the image so its shorter side is this (allows JPEG draft decoding).
    """
    image = open_image(data, max_pixels, min_side)
    try:
        image.load()
    except Exception as e:  # noqa: BLE001 - Pillow raises OSError, SyntaxError, ValueError, EOFError, ...
        raise DecodeError("corrupt_image", f"damaged image data ({type(e).__name__}: {e})") from e
    try:
        fmt = image.format
        rgb = to_rgb(image, background)
    except (ValueError, OSError) as e:
        raise DecodeError("unsupported_mode", f"cannot convert {fmt} mode {image.mode} to RGB ({e})") from e
    return rgb


def resize_crop(image: Image.Image, resolution: int, rng: random.Random | None = None) -> Image.Image:
    """Shorter side to ``resolution`` (bicubic), then a centred (or, with ``rng``, uniformly placed) square crop."""
    return resize_crop_coords(image, resolution, rng)[0]


def resize_crop_coords(image: Image.Image, resolution: int, rng: random.Random | None = None
                       ) -> tuple[Image.Image, tuple[int, int]]:
    """:func:`resize_crop` and the crop's (top, left) corner in the resized image (SDXL's crop coordinates)."""
    w, h = image.size
    if (w, h) == (resolution, resolution):
        return image, (0, 0)
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    if (nw, nh) != (w, h):
        image = image.resize((nw, nh), Image.BICUBIC, reducing_gap=3.0)
    left = (nw - resolution) // 2 if rng is None else rng.randint(0, nw - resolution)
    top = (nh - resolution) // 2 if rng is None else rng.randint(0, nh - resolution)
    return image.crop((left, top, left + resolution, top + resolution)), (top, left)


def fit_within(image: Image.Image, max_side: int) -> Image.Image:
    """Downscale (bicubic) so the longer side is at most ``max_side``; smaller images are unchanged."""
    w, h = image.size
    if max(w, h) <= max_side:
        return image
    scale = max_side / max(w, h)
    return image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC, reducing_gap=3.0)
