"""Opening image files robustly: every PIL mode becomes 8-bit ``RGB`` or ``L``, bad files raise a clear error.

Conversions (``mode`` is the requested output, ``"RGB"`` or ``"L"``):

* EXIF orientation is applied;
* 16-bit and 32-bit integer images (``I;16``, ``I``) are rescaled to 0…255 (not clipped);
* images with transparency (``RGBA``, ``LA``, ``P`` with a transparent colour) are composited over white;
* ``CMYK``, ``YCbCr``, palette and grey images are converted by PIL (grey is replicated to three channels).

Example:
    >>> from PIL import Image
    >>> Image.new("I;16", (4, 4), 65535).save("/tmp/white16.png")
    >>> load_image("/tmp/white16.png").getpixel((0, 0))
    (255, 255, 255)
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

__all__ = ["IMAGE_EXTENSIONS", "ImageLoadError", "load_image", "to_8bit"]

#: File suffixes treated as images when folders are scanned.
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

# Truncated files must fail loudly instead of decoding a half-grey image.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageLoadError(ValueError):
    """An image file that cannot be decoded; the message names the file and the reason."""


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
        ImageLoadError: empty, truncated, corrupt or non-image file (the message names the file).
    """
    if mode not in ("RGB", "L"):
        raise ValueError(f"mode must be 'RGB' or 'L', got {mode!r}")
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as err:
        raise ImageLoadError(f"{path}: cannot read ({err.strerror or err})") from err
    if size == 0:
        raise ImageLoadError(f"{path}: empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                opened.load()
                image = ImageOps.exif_transpose(opened) or opened
                image = _flatten_alpha(to_8bit(image))
                return image.convert(mode)
    except UnidentifiedImageError as err:
        raise ImageLoadError(f"{path}: not an image file PIL can read") from err
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning) as err:
        raise ImageLoadError(f"{path}: corrupt or truncated image ({err})") from err
