"""Opening image files robustly: every PIL mode becomes 8-bit ``RGB`` or ``L``, bad files raise a clear error.

Conversions (``mode`` is the requested output, ``"RGB"`` or ``"L"``):

* EXIF orientation is applied;
* 16-bit and 32-bit integer images (``I;16``, ``I``) are rescaled to 0…255 (not clipped);
* images with transparency (``RGBA``, ``LA``, ``P`` with a transparent colour) are composited over white;
* ``CMYK``, ``YCbCr``, palette and grey images are converted by PIL (grey is replicated to three channels).

Size limit: an image of more than :func:`max_image_pixels` pixels (default PIL's ``MAX_IMAGE_PIXELS``, about
89 Mpx; the environment variable ``DSNET_MAX_IMAGE_PIXELS`` changes it) is refused from its header, before any
pixel is decoded, like any other unreadable file: a 40000×40000 PNG of a few kB (a "decompression bomb") would
otherwise take 4.8 GB as RGB.

Example:
    >>> from PIL import Image
    >>> Image.new("I;16", (4, 4), 65535).save("/tmp/white16.png")
    >>> load_image("/tmp/white16.png").getpixel((0, 0))
    (255, 255, 255)
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from dsnet.errors import DSNetError

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_PIXELS_ENV",
    "ImageLoadError",
    "load_image",
    "max_image_pixels",
    "open_image",
    "to_8bit",
]

#: File suffixes treated as images when folders are scanned.
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

# Truncated files must fail loudly instead of decoding a half-grey image.
ImageFile.LOAD_TRUNCATED_IMAGES = False


#: Environment variable with the largest number of pixels (width × height) an image may have.
MAX_PIXELS_ENV = "DSNET_MAX_IMAGE_PIXELS"

#: PIL's own default limit (it warns above it, refuses above twice it): 1024 × 1024 × 1024 // 4 // 3 pixels.
_DEFAULT_MAX_PIXELS = 89_478_485


class ImageLoadError(DSNetError):
    """An image file that cannot be decoded; the message names the file and the reason."""


def max_image_pixels() -> int:
    """The pixel limit of :func:`load_image`: ``$DSNET_MAX_IMAGE_PIXELS`` if set, else about 89 Mpx (PIL's)."""
    raw = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not raw:
        return _DEFAULT_MAX_PIXELS
    try:
        value = int(float(raw))
    except ValueError:
        value = 0
    if value <= 0:
        raise DSNetError(f"{MAX_PIXELS_ENV}={raw!r}: expected a positive number of pixels, e.g. 200000000")
    return value


@contextlib.contextmanager
def _size_checked_by_us() -> Iterator[None]:
    """PIL's own bomb check off while a header is read (ours, with a clearer message, runs right after)."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


@contextlib.contextmanager
def open_image(path: str | Path, max_pixels: int | None = None) -> Iterator[Image.Image]:
    """``PIL.Image.open(path)`` (header only, nothing decoded yet) refusing images larger than ``max_pixels``
    (default :func:`max_image_pixels`).

    Raises:
        ImageLoadError: not an image, or over the pixel limit (the message names the file, its size and the limit).
    """
    limit = max_pixels or max_image_pixels()
    try:
        with _size_checked_by_us():
            opened = Image.open(path)
    except UnidentifiedImageError as err:
        raise ImageLoadError(f"{path}: not an image file PIL can read") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageLoadError(f"{path}: corrupt or truncated image ({err})") from err
    with opened:
        width, height = opened.size
        if width * height > limit:
            raise ImageLoadError(
                f"{path}: {width}x{height} = {width * height} pixels, over the limit of {limit} "
                f"(a decompression bomb or an absurd size; set {MAX_PIXELS_ENV} to allow larger images)"
            )
        yield opened


def to_8bit(image: Image.Image) -> Image.Image:
    """``image`` with 8 bits per channel; wide integer and float modes are rescaled, never clipped."""
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        array = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16"):
            top = 65535.0
        elif image.mode == "F":
            top = 1.0 if array.size and array.max() <= 1.0 else 255.0
        else:  # "I": 32-bit container, usually holding 16-bit data (PNG, TIFF)
            top = 65535.0 if array.size and array.max() > 255 else 255.0
        array = np.clip(np.rint(array * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(array, mode="L")
    return image


def _flatten_alpha(image: Image.Image) -> Image.Image:
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image


def load_image(path: str | Path, mode: str = "RGB") -> Image.Image:
    """Open ``path`` as an 8-bit ``mode`` (``"RGB"`` or ``"L"``) PIL image, fully decoded.

    Raises:
        ImageLoadError: empty, truncated, corrupt, non-image or too large file (the message names the file).
    """
    if mode not in ("RGB", "L"):
        raise DSNetError(f"mode must be 'RGB' or 'L', got {mode!r}")
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as err:
        raise ImageLoadError(f"{path}: cannot read ({err.strerror or err})") from err
    if size == 0:
        raise ImageLoadError(f"{path}: empty file (0 bytes)")
    with open_image(path) as opened:
        try:
            with warnings.catch_warnings(), _size_checked_by_us():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                opened.load()
                image = ImageOps.exif_transpose(opened) or opened
                image = _flatten_alpha(to_8bit(image))
                return image.convert(mode)
        except ImageLoadError:
            raise
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
            raise ImageLoadError(f"{path}: corrupt or truncated image ({err})") from err
