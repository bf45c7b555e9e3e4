"""The app's HTML: thumbnail grids, image cards and the photo with its boxes, with the image data inline (data
URIs) so that no output is a cached file another user could fetch."""

from __future__ import annotations

import base64
import html
import io
from typing import Any


def data_uri(data: bytes, size: int) -> str:
    """A WebP data URI of an encoded image, shrunk to fit `size` (decoded by the project's safe loader)."""
    from mmpersona import load_image

    img = load_image(data)
    img.thumbnail((size, size))
    return image_uri(img)


def image_uri(img: Any) -> str:
    buf = io.BytesIO()
    img.save(buf, format="WEBP", quality=90)
    return "data:image/webp;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def boxes_html(image: Any, retrieved: list) -> str:
    """The photo with each region-retrieved concept's box, label and score drawn (inline; empty when no
    concept came with a box)."""
    from mmpersona import load_image
    from pipelines.marks import draw_marks

    marks = [(f"{r.concept.handle} {r.score:.2f}", r.box) for r in retrieved if r.box is not None]
    if not marks or image is None:
        return ""
    drawn = draw_marks(load_image(image), marks)
    drawn.thumbnail((640, 640))
    labels = ", ".join(label for label, _ in marks)
    return (f'<img src="{image_uri(drawn)}" alt="{html.escape(labels)}" style="max-width:100%" '
            f'data-boxes="{len(marks)}">')


def cards_html(cards: list[tuple[str | None, str]], *, empty: str, size: int = 180) -> str:
    """Images with captions as inline HTML: the image data travels in the page, not as a cached file URL."""
    return grid_html([(uri, caption, "") for uri, caption in cards], empty=empty, size=size)


def grid_html(cards: list[tuple[str | None, str, str]], *, empty: str, size: int = 120, elem: str = "card") -> str:
    """A thumbnail grid: square tiles of `size` px, each image whole (letterboxed, never cropped), its title and
    detail readable under it. Inline: the image data travels in the page, not as a cached file URL."""
    if not cards:
        return f"<p>{html.escape(empty)}</p>" if empty else ""
    tile = (f"width:{size}px;height:{size}px;object-fit:contain;background:#f1f1f1;border-radius:6px;"
            "display:block")
    items = "".join(
        f'<figure class="mmp-{elem}" style="margin:0;width:{size}px">'
        + (f'<img src="{uri}" alt="{html.escape(title)}" style="{tile}">' if uri else
           f'<div style="{tile}"></div>')
        + f'<figcaption style="font-size:13px;line-height:1.3;overflow-wrap:anywhere"><b>{html.escape(title)}</b>'
        + (f'<br><span style="opacity:.75">{html.escape(detail)}</span>' if detail else "")
        + "</figcaption></figure>" for uri, title, detail in cards)
    return (f'<div class="mmp-grid" style="display:grid;grid-template-columns:repeat(auto-fill,{size}px);'
            f'gap:10px">{items}</div>')


def image_uri_bytes(data: bytes) -> str:
    """A data URI of PNG bytes (generated images: shown as made, not re-encoded)."""
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


