"""Images in and out of the API: data URLs in (the server fetches no URL), base64 PNG out, the media type of a
stored image."""

from __future__ import annotations

import base64
import binascii
import io
import re
from typing import Any

from .errors import ApiError

_DATA_URL = re.compile(r"data:(image/[\w.+-]+)?(;[\w=.+-]+)*;base64,", re.I)


def data_url_bytes(url: Any, what: str = "image") -> bytes:
    """The bytes of a base64 data URL. The server fetches no URL (that would let a client make it reach any host
    it can reach)."""
    if not isinstance(url, str):
        raise ApiError(400, f"{what} must be a data URL string (data:image/png;base64,...)")
    m = _DATA_URL.match(url)
    if m is None:
        shown = url[:40] + ("..." if len(url) > 40 else "")
        raise ApiError(400, f"{what} must be a base64 data URL (data:image/png;base64,...), got {shown!r}: the "
                            "server does not fetch URLs")
    try:
        return base64.b64decode(url[m.end():], validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(400, f"{what} is not valid base64 ({e})") from None


def png_b64(image: Any) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def media_type(data: bytes) -> str:
    for magic, kind in ((b"\x89PNG", "image/png"), (b"\xff\xd8", "image/jpeg"), (b"GIF8", "image/gif"),
                        (b"RIFF", "image/webp"), (b"BM", "image/bmp")):
        if data.startswith(magic):
            return kind
    return "application/octet-stream"
