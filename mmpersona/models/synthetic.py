"""A synthetic image domain that spans the preference dimensions the tests plant: hue, brightness and shape.

The trained tiny text-to-image preset (`tiny:sd-trained`) learns this domain, so that its vanilla samples cover
it and a preference can move them; the preference tests and benchmarks measure an image's properties back in
pixel space with `measure`. Pure PIL and numpy, seeded.
"""

from __future__ import annotations

import colorsys
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

SHAPES = ("circle", "square", "triangle")
#: the caption every sample is also trained under: generation from it covers the whole domain
GENERIC_PROMPT = "a shape"
HUE_NAMES = ((0.0, "red"), (1 / 6, "yellow"), (2 / 6, "green"), (3 / 6, "cyan"), (4 / 6, "blue"), (5 / 6, "magenta"))


@dataclass(frozen=True)
class Drawn:
    """What one synthetic image shows."""

    hue: float  # 0..1
    value: float  # brightness of the shape, 0.35..1
    shape: str
    background: int  # grey level 40..220

    @property
    def hue_name(self) -> str:
        return min(HUE_NAMES, key=lambda hn: min(abs(self.hue - hn[0]), 1 - abs(self.hue - hn[0])))[1]

    def caption(self) -> str:
        return f"a {'bright' if self.value > 0.7 else 'dark'} {self.hue_name} {self.shape}"


def render(d: Drawn, rng: random.Random, size: int = 64) -> "Image.Image":
    """The shape `d` describes, about centred, on its grey background."""
    from PIL import Image, ImageDraw

    r, g, b = colorsys.hsv_to_rgb(d.hue, 0.85, d.value)
    img = Image.new("RGB", (size, size), (d.background,) * 3)
    draw = ImageDraw.Draw(img)
    s = rng.randint(size * 9 // 16, size * 11 // 16)  # centred, a little jitter: the domain is what it shows
    x = (size - s) // 2 + rng.randint(-size // 16, size // 16)
    y = (size - s) // 2 + rng.randint(-size // 16, size // 16)
    fill = (round(r * 255), round(g * 255), round(b * 255))
    if d.shape == "circle":
        draw.ellipse((x, y, x + s, y + s), fill=fill)
    elif d.shape == "square":
        draw.rectangle((x, y, x + s, y + s), fill=fill)
    else:
        draw.polygon([(x + s / 2, y), (x, y + s), (x + s, y + s)], fill=fill)
    return img


def sample(rng: random.Random, size: int = 64) -> tuple["Image.Image", Drawn]:
    d = Drawn(rng.random(), 0.35 + 0.65 * rng.random(), rng.choice(SHAPES), rng.randint(40, 220))
    return render(d, rng, size), d


def measure(image: "Image.Image") -> tuple[float, float, float]:
    """(hue, brightness, saturated share) of an image's shape, read back in pixel space: the median hue and value
    of its saturated pixels (hue as a point on the circle, 0..1), and what share of the image they cover."""
    import numpy as np

    a = np.asarray(image.convert("RGB"), np.float32) / 255
    mx, mn = a.max(-1), a.min(-1)
    sat = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-6), 0)
    mask = sat > 0.35
    if mask.sum() < 8:
        return 0.0, float(mx.mean()), 0.0
    r, g, b = (a[..., i][mask] for i in range(3))
    m, d = mx[mask], np.maximum(mx[mask] - mn[mask], 1e-6)
    h = np.where(m == r, (g - b) / d % 6, np.where(m == g, (b - r) / d + 2, (r - g) / d + 4)) / 6
    angle = np.arctan2(np.sin(2 * np.pi * h).mean(), np.cos(2 * np.pi * h).mean()) / (2 * np.pi) % 1
    return float(angle), float(np.median(m)), float(mask.mean())


def hue_distance(a: float, b: float) -> float:
    """Distance of two hues on the colour circle (0..0.5)."""
    d = abs(a - b) % 1
    return min(d, 1 - d)


def hue_coverage(images: "list[Image.Image]", bins: int = 12) -> float:
    """The share of `bins` equal hue sectors that the shapes of `images` reach (images without a shape reach
    none): how much of the domain a generator's samples cover."""
    hit = {int(hue * bins) % bins for hue, _, share in map(measure, images) if share >= 0.05}
    return len(hit) / bins


def hue_error(images: "list[Image.Image]", drawn: "list[Drawn]") -> float:
    """Median hue distance between what `images` show and what `drawn` says they should (0.5 without a shape):
    how well an autoencoder's reconstructions keep colour."""
    import numpy as np

    errors = []
    for image, d in zip(images, drawn, strict=True):
        hue, _, share = measure(image)
        errors.append(0.5 if share < 0.05 else hue_distance(hue, d.hue))
    return float(np.median(errors))


def batch(rng: random.Random, n: int, size: int = 64) -> tuple["np.ndarray", list[Drawn]]:
    """`n` samples as a float32 array (n, 3, size, size) in [-1, 1], and what each shows."""
    import numpy as np

    images, drawn = zip(*[sample(rng, size) for _ in range(n)], strict=True)
    x = np.stack([np.asarray(im, np.float32) / 127.5 - 1 for im in images]).transpose(0, 3, 1, 2)
    return x, list(drawn)


@dataclass(frozen=True)
class PlantedUser:
    """A synthetic user with a hidden preference: images whose shape's hue is nearer `hue` are better. The
    preference tests and benchmarks label pairs by it and judge generated images by it, in pixel space."""

    name: str
    hue: float

    def score(self, image: "Image.Image") -> float:
        """Minus the hue distance of the image's shape to the preferred hue (-0.5, the worst, without a shape)."""
        hue, _, share = measure(image)
        return -0.5 if share < 0.05 else -hue_distance(hue, self.hue)

    def pairs(self, rng: random.Random, n: int, size: int = 32) -> list[tuple["Image.Image", "Image.Image"]]:
        """`n` (chosen, rejected) pairs of domain samples, labelled by the hidden preference."""
        out = []
        while len(out) < n:
            (a, da), (b, db) = sample(rng, size), sample(rng, size)
            near_a, near_b = hue_distance(da.hue, self.hue), hue_distance(db.hue, self.hue)
            if abs(near_a - near_b) < 0.02:  # too close to call: a person would not choose either
                continue
            out.append((a, b) if near_a < near_b else (b, a))
        return out


def planted_users(prefix: str, n: int, rng: random.Random) -> list[PlantedUser]:
    return [PlantedUser(f"{prefix}{i}", rng.random()) for i in range(n)]
