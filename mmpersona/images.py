"""The one safe image loader of the project.

Every image a user hands us (a path, bytes, a file object or a PIL image) goes through `load_image`, which
- refuses empty, truncated, corrupt and non-image input with `ImageLoadError` naming the item,
- refuses files over `max_bytes` and images over `max_pixels` *before* decoding them (decompression bombs),
- applies the EXIF orientation,
- returns an RGB image whatever the mode: palette, CMYK, 16-bit and float greyscale, alpha
  (composited on white), first frame of animations.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import IO, TYPE_CHECKING, Union

from .errors import ImageLoadError

if TYPE_CHECKING:
    from PIL import Image

ImageInput = Union[str, os.PathLike, bytes, bytearray, IO[bytes], "Image.Image"]

#: Default ceiling on decoded pixels (about 8192 x 8192): far above any photo a user means to register.
DEFAULT_MAX_PIXELS = int(os.environ.get("MMPERSONA_MAX_IMAGE_PIXELS", 8192 * 8192))
#: Default ceiling on the encoded size of one image file.
DEFAULT_MAX_BYTES = int(os.environ.get("MMPERSONA_MAX_IMAGE_BYTES", 64 * 1024 * 1024))


def describe(source: ImageInput) -> str:
    """A short human name for an image input, used in error messages."""
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, (bytes, bytearray)):
        return f"<{len(source)} bytes>"
    name = getattr(source, "filename", None) or getattr(source, "name", None)
    return str(name) if name else f"<{type(source).__name__}>"


def read_image_bytes(source: ImageInput, *, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """Read the encoded bytes of a path / bytes / file object, with the size limit applied."""
    label = describe(source)
    if isinstance(source, (bytes, bytearray)):
        data = bytes(source)
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        if not path.exists():
            raise ImageLoadError(f"image {label!r}: file not found")
        if not path.is_file():
            raise ImageLoadError(f"image {label!r}: not a regular file")
        size = path.stat().st_size
        if size > max_bytes:
            raise ImageLoadError(f"image {label!r}: file is {size} bytes, over the limit of {max_bytes}")
        data = path.read_bytes()
    elif hasattr(source, "read"):
        data = source.read(max_bytes + 1)
    else:
        raise ImageLoadError(f"image {label!r}: expected a path, bytes, a file object or a PIL image")
    if len(data) == 0:
        raise ImageLoadError(f"image {label!r}: the file is empty")
    if len(data) > max_bytes:
        raise ImageLoadError(f"image {label!r}: over the limit of {max_bytes} bytes")
    return data


def load_image(
    source: ImageInput,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> "Image.Image":
    """Decode `source` safely into an RGB `PIL.Image.Image`.

    Args:
        source: a path, encoded bytes, a binary file object, or an already decoded PIL image.
        max_pixels: refuse images with more pixels than this (checked from the header, before decoding).
        max_bytes: refuse encoded inputs larger than this.

    Raises:
        ImageLoadError: for anything that is not a readable image within the limits.
    """
    from PIL import Image

    label = describe(source)
    if isinstance(source, Image.Image):
        _check_pixels(source, label, max_pixels)
        return to_rgb(source)
    return _decode(read_image_bytes(source, max_bytes=max_bytes), label, max_pixels)


def load_image_bytes(
    source: ImageInput,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> bytes:
    """The encoded bytes of `source`, after checking that they decode safely (errors name `source`).

    A PIL image is encoded as PNG. Use this to store what the user gave while refusing bad input up front.
    """
    return load_image_with_bytes(source, max_pixels=max_pixels, max_bytes=max_bytes)[1]


def load_image_with_bytes(
    source: ImageInput,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> "tuple[Image.Image, bytes]":
    """`load_image` and `load_image_bytes` in one decode: the RGB image and the encoded bytes it came from (a PIL
    image: encoded as PNG)."""
    from PIL import Image

    if isinstance(source, Image.Image):
        img = load_image(source, max_pixels=max_pixels)
        return img, png_bytes(img)
    data = read_image_bytes(source, max_bytes=max_bytes)
    return _decode(data, describe(source), max_pixels), data


def png_bytes(image: "Image.Image") -> bytes:
    """A PIL image encoded as PNG (lossless: the bytes a generated image is kept and hashed as)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def encoded_pixels(data: bytes) -> int:
    """The pixel count of encoded image `data`, from its header alone (0 when the header cannot be read:
    decoding it will say why)."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                w, h = img.size
    except Exception:  # noqa: BLE001 - any reader error: not an image, or a damaged one
        return 0
    return max(0, w) * max(0, h)


def _decode(data: bytes, label: str, max_pixels: int) -> "Image.Image":
    from PIL import Image

    try:
        with warnings.catch_warnings():
            # We apply our own pixel limit below; PIL's warning (or error at 2x its limit) must not fire first.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            _check_pixels(img, label, max_pixels)
            img.seek(0)  # first frame of an animation
            img.load()
            return to_rgb(img)
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as e:  # PIL's own ceiling, hit while reading the header
        raise ImageLoadError(f"image {label!r}: over the limit of {max_pixels} pixels ({e})") from e
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ValueError, struct.error...
        if type(e).__name__ == "UnidentifiedImageError":
            raise ImageLoadError(f"image {label!r}: not a recognised image format") from e
        raise ImageLoadError(f"image {label!r}: truncated or corrupt ({type(e).__name__}: {e})") from e


def _check_pixels(img: "Image.Image", label: str, max_pixels: int) -> None:
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ImageLoadError(f"image {label!r}: has no pixels ({w}x{h})")
    if w * h > max_pixels:
        raise ImageLoadError(
            f"image {label!r}: {w}x{h} = {w * h} pixels is over the limit of {max_pixels} "
            "(set MMPERSONA_MAX_IMAGE_PIXELS to raise it)"
        )


def to_rgb(img: "Image.Image") -> "Image.Image":
    """Orientation applied and converted to RGB; transparency is composited on white."""
    from PIL import Image, ImageOps

    img = ImageOps.exif_transpose(img) or img
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return _high_depth_to_rgb(img)
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def _high_depth_to_rgb(img: "Image.Image") -> "Image.Image":
    """16-bit / 32-bit integer and float greyscale scaled to 8 bits (PIL's own convert clips instead).

    A band of rows at a time, so that the arithmetic needs a few MB, not 8 bytes per pixel of float64 (an
    8192x8192 16-bit PNG would take half a GB per copy): the memory it adds is the 8-bit result."""
    import numpy as np
    from PIL import Image

    w, h = img.size
    rows = max(1, 2**18 // w)  # about 256k pixels (2 MB of float64) per band

    def bands():
        for top in range(0, h, rows):
            yield top, np.asarray(img.crop((0, top, w, min(h, top + rows))))

    if img.mode == "F":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a band of NaN only
            ends = np.array([(np.nanmin(b), np.nanmax(b)) for _, b in bands()], dtype=np.float64)
            lo, hi = float(np.nanmin(ends[:, 0])), float(np.nanmax(ends[:, 1]))
    else:
        wide = img.mode.startswith("I;16") or max(int(b.max(initial=0)) for _, b in bands()) > 255
        peak = 65535.0 if wide else 255.0
    grey = np.empty((h, w), dtype=np.uint8)
    for top, raw in bands():
        band = raw.astype(np.float64)  # the one temporary: every step below is in place
        if img.mode == "F" and hi <= lo:
            band[...] = 0.0
        elif img.mode == "F":
            band -= lo
            band /= hi - lo
            band *= 255.0
        else:
            band /= peak
            band *= 255.0
        np.nan_to_num(band, copy=False)
        np.clip(band, 0, 255, out=band)
        grey[top : top + rows] = np.round(band, out=band)
    return Image.fromarray(grey, mode="L").convert("RGB")
