"""Opening image files robustly: every PIL mode becomes 8-bit ``RGB`` or ``L``, bad files raise a clear error.

:func:`load_image` reads a file, :func:`decode_image` the same bytes held in memory (an HTTP upload); both apply
the same checks, conversions and pixel limit.

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
import io
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from dsnet.errors import DSNetError

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_PIXELS_ENV",
    "ImageLoadError",
    "decode_image",
    "image_format",
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


#: Leading bytes of the formats PIL reads that we name when a file has them but cannot be opened.
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


def image_format(header: bytes) -> str | None:
    """The image format whose signature ``header`` (the first 16 bytes or more of a file) starts with, else None.

    Used to tell a damaged image (a PNG cut short, whose header PIL cannot parse) from bytes that are no image.

    Example:
        >>> image_format(b"\x89PNG\r\n\x1a\n\x00\x00"), image_format(b"hello")
        ('PNG', None)
    """
    for signature, name in _SIGNATURES:
        cut_short = 3 <= len(header) < len(signature) and signature.startswith(header)
        if header.startswith(signature) or cut_short:
            return name
    if header.startswith(b"RIFF") and (len(header) < 12 or header[8:12] == b"WEBP"):
        return "WebP"
    if header.startswith(b"BM") and (len(header) < 10 or header[6:10] == b"\x00\x00\x00\x00"):  # reserved bytes
        return "BMP"
    if len(header) >= 3 and header[:1] == b"P" and header[1:2] in b"123456" and header[2:3].isspace():
        return "PPM"
    return None


def _header_of(source: str | Path | BinaryIO) -> bytes:
    """The first 16 bytes of a path or seekable stream (empty if unreadable)."""
    try:
        if isinstance(source, (str, Path)):
            with open(source, "rb") as handle:
                return handle.read(16)
        source.seek(0)
        return source.read(16)
    except OSError:
        return b""


@contextlib.contextmanager
def open_image(path: str | Path, max_pixels: int | None = None) -> Iterator[Image.Image]:
    """``PIL.Image.open(path)`` (header only, nothing decoded yet) refusing images larger than ``max_pixels``
    (default :func:`max_image_pixels`).

    Raises:
        ImageLoadError: not an image, a damaged one, or over the pixel limit (the message names the file, its size
            and the limit).
    """
    with _open_checked(path, str(path), max_pixels) as opened:
        yield opened


@contextlib.contextmanager
def _open_checked(source: str | Path | BinaryIO, name: str, max_pixels: int | None = None) -> Iterator[Image.Image]:
    """:func:`open_image` of a path or binary stream; ``name`` starts every error message."""
    limit = max_pixels or max_image_pixels()
    try:
        with _size_checked_by_us():
            opened = Image.open(source)
    except UnidentifiedImageError as err:
        kind = image_format(_header_of(source))
        if kind is not None:  # PIL gives up on a header cut short the same way as on text
            raise ImageLoadError(f"{name}: corrupt or truncated image (starts like a {kind} file)") from err
        raise ImageLoadError(f"{name}: not an image file PIL can read") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageLoadError(f"{name}: corrupt or truncated image ({err})") from err
    with opened:
        width, height = opened.size
        if width * height > limit:
            raise ImageLoadError(
                f"{name}: {width}x{height} = {width * height} pixels, over the limit of {limit} "
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
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as err:
        raise ImageLoadError(f"{path}: cannot read ({err.strerror or err})") from err
    return _decode(path, str(path), size, mode)


def decode_image(data: bytes, mode: str = "RGB", *, name: str = "image") -> Image.Image:
    """:func:`load_image` of an image file's bytes held in memory (an upload); ``name`` starts every error message.

    Raises:
        ImageLoadError: as :func:`load_image` ("empty file", "not an image file", "corrupt or truncated image",
            "over the limit").
    """
    return _decode(io.BytesIO(data), name, len(data), mode)


def _decode(source: Path | BinaryIO, name: str, size: int, mode: str) -> Image.Image:
    """The body of :func:`load_image` and :func:`decode_image`: checks, decoding and conversion to ``mode``."""
    if mode not in ("RGB", "L"):
        raise DSNetError(f"mode must be 'RGB' or 'L', got {mode!r}")
    if size == 0:
        raise ImageLoadError(f"{name}: empty file (0 bytes)")
    with _open_checked(source, name) as opened:
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
            raise ImageLoadError(f"{name}: corrupt or truncated image ({err})") from err
