"""The face model: dlib's face detector, 5-point landmarks and 128-d ResNet face descriptor, for matching
"person" concepts by face.

Build it with `mmpersona.models.load_face_model()` (`pypi:dlib-face`: the two model files come from PyPI, dlib
from the `face` extra). `FaceModel.detect` finds every face of a photo; `FaceModel.embed_images` gives each
reference image exactly one vector, that of its largest face, so a concept's images are indexed one to one, as
with the other embedders.

Stored vectors are 129-d (`to_stored`): dlib's descriptor L2-normalised, then a 129th component, 0.0 for a face
and 1.0 for `NO_FACE`, the vector of an image without a face. The concept store searches by cosine and refuses
zero vectors; `NO_FACE` is a unit vector orthogonal to every face vector, so a face scores exactly 0 against an
image without one and can never match it.

Matching: dlib calls two raw descriptors the same person below Euclidean distance 0.6. Their norms are nearly
constant (1.42 +- 0.08 over 490 LFW faces of 62 people), so |a - b|^2 ~ 2 n^2 (1 - cos) and 0.6 is cosine 0.91
between stored vectors; the two rules disagree on 0.4% of those faces' 119,805 pairs (accuracy 99.38% by distance,
99.34% by cosine 0.91: 98.5% of same-person pairs kept, 0.67% of different-person pairs let through). Note how
high cosines run: different people median 0.84 (95th percentile 0.89), the same person median 0.95 (5th
percentile 0.93); a threshold made for CLIP or DINOv2 vectors means nothing here.

dlib, numpy and PIL are imported by the functions that use them: importing this module is cheap, and works
without the `face` extra (`require_dlib` says how to install it).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

from .errors import MissingDependencyError, MmpersonaError
from .images import ImageInput, load_image

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

__all__ = ["DEFAULT_THRESHOLD", "DESCRIPTOR_DIM", "DIM", "Face", "FaceModel", "MAX_SIDE", "MIN_SCORE",
           "UPSAMPLE_BELOW", "is_face", "no_face", "require_dlib", "to_stored"]

#: dlib's face descriptor size, and the stored vector's (one more component: see `to_stored`).
DESCRIPTOR_DIM = 128
DIM = DESCRIPTOR_DIM + 1

#: Photos whose longer side is above this are shrunk to it before detection (boxes are mapped back), so one
#: photo costs at most about 0.6 s of detection on one CPU thread whatever its size (a 4000 px photo: 0.76 s to
#: decode, shrink, detect and describe its face).
MAX_SIDE = 2000

#: Photos whose longer side is below this are searched upsampled once (faces from about 40 px found, at about 4x
#: the cost of the photo itself) and also as they are (another 1x: a face filling a small photo can score better
#: so); a 999 px photo then costs about what a 2200 px one does. Larger photos are searched as they are (faces from
#: about 80 px).
UPSAMPLE_BELOW = 1000

#: The least detector score kept, per upsampling (0 or 1). dlib's own cut is 0. Measured with `detector.run` on
#: 158 photos without people (DreamBooth's objects and pets, 780-2048 px) and scikit-image's chelsea, coffee,
#: rocket, motorcycle pair and astronaut (which has one face), against 310 LFW photos (5 of each of 62 people,
#: 250 px, faces about 110 px; shrunk to 0.5x and 0.35x for small faces):
#:
#: - upsample 0 at 2000 px: no false face even at score 0; at 1000 px: false faces in 2/158 photos at 0, 1/158
#:   at 0.2 (a dog, 0.23), none at 0.3. LFW found 310/310 at 0.3 (306/310 at 0.4); faces of 55 px 43-107/310.
#: - upsample 1 (photos shrunk to 800 px): false faces in 6/158 at 0, 1/158 at 0.2 and 0.3 (a 44 px box in a dog
#:   photo, 0.34), none at 0.4; the astronaut gets a second, false face as large as hers at 0.12 (her suit). LFW
#:   at 0.4: 308/310 (110 px faces), 304/310 (55 px), 302/310 (38 px); 27 px faces: 40/310.
#:
#: Hence 0.3 without upsampling and 0.4 with it: no false face on any of the 164 photos without people.
MIN_SCORE = {0: 0.3, 1: 0.4}

#: The cosine at or above which two stored face vectors are taken for one person, when a user has no calibrated
#: threshold of their own: dlib's published rule (Euclidean distance of raw descriptors below 0.6) in cosine
#: (raw norms are 1.42 +- 0.08, so d = 0.6 is cosine 1 - 0.18 / 1.42^2 = 0.91). On 490 LFW photos of 62 people:
#: 99.34% of 119,805 pairs right (same person: median 0.953; different people: median 0.837, 95th percentile
#: 0.888). CLIP's or DINOv2's thresholds would match everyone: faces have one of their own.
DEFAULT_THRESHOLD = 0.91

#: Faces that get a descriptor in one `detect` call, by default (the largest ones): about 0.1 s each on one CPU
#: thread (dlib-bin's wheels are built without BLAS), so a crowd photo costs a known amount.
MAX_FACES = 16

_INSTALL = 'pip install "mmpersona[face]"'


def require_dlib() -> Any:
    """The `dlib` module, or `MissingDependencyError` saying how to install it."""
    try:
        import dlib
    except ImportError as e:
        raise MissingDependencyError(f"the face model needs dlib ({e}): {_INSTALL} (prebuilt dlib-bin "
                                     "wheels, no compiler needed)") from e
    return dlib


def to_stored(descriptor: Any) -> "np.ndarray":
    """dlib's 128-d descriptor as the stored 129-d float32 unit vector: L2-normalised, then 0.0.

    dlib compares raw descriptors by Euclidean distance (same person below 0.6); their norms are nearly constant,
    so cosine on the normalised ones (what the concept store computes) decides nearly the same way, at 0.91 (see
    the module's docstring)."""
    import numpy as np

    v = np.asarray(descriptor, dtype=np.float64).reshape(-1)
    if v.shape != (DESCRIPTOR_DIM,):
        raise MmpersonaError(f"a face descriptor has {DESCRIPTOR_DIM} components, got shape {v.shape}")
    norm = float(np.linalg.norm(v))
    if not np.isfinite(norm) or norm == 0.0:
        raise MmpersonaError(f"a face descriptor must be finite and non-zero, got norm {norm}")
    out = np.zeros(DIM, dtype=np.float32)
    out[:DESCRIPTOR_DIM] = v / norm
    return out


def is_face(vector: Any) -> bool:
    """Whether a stored vector is a face's (not `no_face()`'s)."""
    return float(vector[-1]) < 0.5


def no_face() -> "np.ndarray":
    """The stored vector of an image without a face: zeros with 1.0 last. The concept store refuses zero vectors,
    and this unit vector has cosine exactly 0 with every face vector (`to_stored` ends in 0.0), so it is indexed
    like any image and matches no face."""
    import numpy as np

    out = np.zeros(DIM, dtype=np.float32)
    out[-1] = 1.0
    return out


@dataclass(frozen=True)
class Face:
    """One face found in a photo.

    Attributes:
        box: (x0, y0, x1, y1) in the photo's pixels, clipped to it; x1 and y1 are exclusive (`PIL.Image.crop`).
        score: the detector's confidence (HOG + linear SVM margin; kept from `MIN_SCORE` up; the astronaut's face: 1.16).
        vector: the stored 129-d form of the face's descriptor (`to_stored`).
    """

    box: tuple[int, int, int, int]
    score: float
    vector: "np.ndarray" = field(repr=False, compare=False)

    @property
    def area(self) -> int:
        return (self.box[2] - self.box[0]) * (self.box[3] - self.box[1])


def _corners(rect: Any) -> tuple[int, int, int, int]:
    return rect.left(), rect.top(), rect.right() + 1, rect.bottom() + 1


#: Boxes of the two passes over a small photo overlapping this much are one face.
FACE_SAME_IOU = 0.3


@dataclass(frozen=True)
class _Found:
    """A detection before its descriptor: the box in the photo, and the rectangle in the searched pixels."""

    box: tuple[int, int, int, int]
    score: float
    rect: Any


class FaceModel:
    """dlib's HOG frontal face detector, 5-point shape predictor and ResNet face recognition model.

    Build it with `mmpersona.models.load_face_model()`. Calls are serialised by a lock (dlib's objects are not
    documented as safe to share between threads, and the server calls from a thread pool); everything runs on
    the CPU, on one thread per call.

    Detection (`MAX_SIDE`, `UPSAMPLE_BELOW`, `MIN_SCORE` say why each number): photos are shrunk to at most
    2000 px on their longer side; those under 1000 px are upsampled once. The descriptor is computed on the
    searched pixels (a 150 px chip aligned on the 5 landmarks, without jitter). One thread, measured: 0.12 s to
    search a 512 px photo, 0.11 s per face descriptor, 0.16 s (250 px) to 0.3 s (780 px) per reference photo, 0.76 s for a 4000 px one.

    The same face survives what reference photos go through: the astronaut's stored vector against her photo
    halved, doubled, cropped, mirrored, turned 10 degrees, in grey and as JPEG quality 30: cosine 0.984 at the
    least (halved), 0.99 or more for the others.
    """

    dim = DIM
    default_threshold = DEFAULT_THRESHOLD

    def __init__(self, detector: Any, shape_predictor: Any, recognizer: Any, *, name: str):
        self.detector, self.shape_predictor, self.recognizer = detector, shape_predictor, recognizer
        self.name = name
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"FaceModel(name={self.name!r}, dim={self.dim})"

    # ------------------------------------------------------------------ detection

    def _pixels(self, image: "Image.Image") -> tuple["np.ndarray", float]:
        """The RGB uint8 pixels to search and the factor from them back to the photo's pixels."""
        import numpy as np
        from PIL import Image

        longer = max(image.size)
        scale = 1.0
        if longer > MAX_SIDE:
            scale = longer / MAX_SIDE
            size = (max(1, round(image.width / scale)), max(1, round(image.height / scale)))
            image = image.resize(size, Image.Resampling.BILINEAR)
        return np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8)), scale

    def _find(self, image: "Image.Image", pixels: "np.ndarray", scale: float) -> list[_Found]:
        """Faces in `pixels`, largest first (then by score), boxes in the photo's pixels. A small photo is searched
        upsampled and as it is: a face that fills a small photo can score below the cut upsampled and above it as
        it is (LFW's Jack_Straw_0004, 250 px: 0.05 upsampled, 0.34 as it is); a face found both ways is kept once,
        as the upsampled pass found it."""
        from .models.loaders import box_iou

        with self._lock:
            rects, scores, _ = self.detector.run(pixels, 0, MIN_SCORE[0])
            if max(image.size) < UPSAMPLE_BELOW:
                fine, fine_scores, _ = self.detector.run(pixels, 1, MIN_SCORE[1])
                fine, fine_scores = list(fine), list(fine_scores)
                for rect, score in zip(rects, scores, strict=True):
                    if all(box_iou(_corners(rect), _corners(other)) < FACE_SAME_IOU for other in fine):
                        fine.append(rect)
                        fine_scores.append(score)
                rects, scores = fine, fine_scores
        found = []
        for rect, score in zip(rects, scores, strict=True):
            box = (max(0, int(rect.left() * scale)), max(0, int(rect.top() * scale)),
                   min(image.width, int(round((rect.right() + 1) * scale))),
                   min(image.height, int(round((rect.bottom() + 1) * scale))))
            if box[2] > box[0] and box[3] > box[1]:
                found.append(_Found(box, float(score), rect))
        found.sort(key=lambda f: ((f.box[2] - f.box[0]) * (f.box[3] - f.box[1]), f.score), reverse=True)
        return found

    def _vector(self, pixels: "np.ndarray", rect: Any) -> "np.ndarray":
        with self._lock:
            shape = self.shape_predictor(pixels, rect)
            descriptor = self.recognizer.compute_face_descriptor(pixels, shape, 0)
        return to_stored(descriptor)

    def detect(self, image: ImageInput, *, max_faces: int | None = MAX_FACES) -> list[Face]:
        """The faces in `image` (a path, bytes, file object or PIL image, through the safe loader), largest
        first, each with its stored vector; at most `max_faces` of them (the largest; None: all).

        Raises:
            ImageLoadError: `image` is not a readable image within the loader's limits.
        """
        if max_faces is not None and (not isinstance(max_faces, int) or max_faces < 0):
            raise MmpersonaError(f"`max_faces` must be a non-negative integer or None, got {max_faces!r}")
        photo = load_image(image)
        pixels, scale = self._pixels(photo)
        found = self._find(photo, pixels, scale)
        if max_faces is not None:
            found = found[:max_faces]
        return [Face(f.box, f.score, self._vector(pixels, f.rect)) for f in found]

    # ------------------------------------------------------------------ embedder interface

    def embed_images(self, images: Sequence[ImageInput], *, batch_size: int = 32,
                     progress: bool = False) -> "np.ndarray":
        """One stored vector per image, `(n, 129)` float32 unit rows: its largest face's, or `no_face()` when
        the detector finds none, so every reference image is indexed exactly once and an image without a face
        matches no face. `batch_size` only paces the progress bar (dlib embeds one face at a time).

        Raises:
            ImageLoadError: an image is not readable (nothing is returned for the others: a skipped image would
                shift every later row).
        """
        import numpy as np
        from tqdm.auto import tqdm

        if not isinstance(batch_size, int) or batch_size < 1:
            raise MmpersonaError(f"`batch_size` must be at least 1, got {batch_size!r}")
        images = list(images)
        out = np.empty((len(images), DIM), dtype=np.float32)
        for i, image in enumerate(tqdm(images, desc="face vectors", unit="image",
                                       disable=not progress or len(images) <= batch_size)):
            photo = load_image(image)
            pixels, scale = self._pixels(photo)
            found = self._find(photo, pixels, scale)
            out[i] = self._vector(pixels, found[0].rect) if found else no_face()
        return out
