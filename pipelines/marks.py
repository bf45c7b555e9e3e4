"""Visual prompts: numbered marks (an outline and a number) drawn on a copy of the user's photo, Set-of-Mark
style, so that a concept list can say "<bo> is mark 1". The photo itself is never changed."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from PIL import Image

#: outline colours, distinct on photos and to most colour-blind readers (Okabe-Ito)
PALETTE = [(230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66), (0, 114, 178), (213, 94, 0),
           (204, 121, 167), (255, 255, 255)]


def draw_marks(image: "Image.Image", marks: Sequence[tuple[str, tuple[int, int, int, int]]], *,
               side: int | None = None) -> "Image.Image":
    """A copy of `image` with each `(label, box)` drawn: the box outlined, its label ("1", or "1 <bo> 0.82") on
    a filled tag at the box's top-left corner (inside the photo). Line width and text size follow `side` (default:
    the photo's short side, which a VLM's resize maps to its input), so marks stay legible after the resize."""
    from PIL import ImageDraw, ImageFont

    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    side = side or min(out.size)
    width = max(2, round(side / 160))
    font = ImageFont.load_default(size=max(10, round(side / 22)))
    for i, (label, box) in enumerate(marks):
        colour = PALETTE[i % len(PALETTE)]
        x0, y0, x1, y1 = box
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=width)
        left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
        tw, th = right - left + 2 * width, bottom - top + 2 * width
        tx = min(max(0, x0), max(0, out.width - tw))
        ty = min(max(0, y0), max(0, out.height - th))
        draw.rectangle((tx, ty, tx + tw, ty + th), fill=colour)
        ink = (0, 0, 0) if sum(colour) > 380 else (255, 255, 255)
        draw.text((tx + width - left, ty + width - top), label, fill=ink, font=font)
    return out
