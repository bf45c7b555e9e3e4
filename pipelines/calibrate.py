"""Choosing a user's retrieval threshold from held-out images, for a target precision.

Positives are images of known concepts (not the registered reference images); negatives show none of the
user's concepts. For each image the top-1 retrieval is scored; a threshold t accepts a hit when its score is
at least t, and a hit is correct when it is a positive whose top-1 concept is the right one. We pick the lowest
t whose precision reaches the target (the lowest gives the best recall), and store it as the user's setting.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from mmpersona.errors import MmpersonaError

from .vlm import THRESHOLD_SETTING

if TYPE_CHECKING:
    from mmpersona.conceptdb import ConceptDB
    from mmpersona.images import ImageInput

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"}


@dataclass
class Calibration:
    threshold: float
    precision: float
    recall: float
    target_precision: float
    positives: int
    negatives: int
    reached: bool  # False when no threshold reaches the target (the strictest one is returned)
    face: "dict[str, Any] | None" = None  # the face threshold's own calibration (`face=` given), same fields

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def choose_threshold(scored: Sequence[tuple[float, bool]], n_positive: int, target: float) -> tuple[float, float, float, bool]:
    """From (top-1 score, correct) pairs, the lowest threshold with precision >= target.

    Returns (threshold, precision, recall, reached). Pure function: tested on its own.
    """
    if not 0 < target <= 1:
        raise MmpersonaError(f"target precision must be in (0, 1], got {target}")
    if not scored:
        raise MmpersonaError("calibration needs at least one positive or negative image")
    ordered = sorted(scored, key=lambda x: -x[0])
    best = None
    correct = 0
    for i, (score, ok) in enumerate(ordered):
        correct += ok
        # a threshold can only sit between distinct scores: skip to the last of equal ones
        if i + 1 < len(ordered) and ordered[i + 1][0] == score:
            continue
        precision = correct / (i + 1)
        if precision >= target:
            best = (score, precision, correct / max(n_positive, 1))
    if best is None:
        top = ordered[0][0]
        return float(top) + 1e-6, 0.0, 0.0, False
    return float(best[0]), float(best[1]), float(best[2]), True


def calibrate(db: "ConceptDB", user: str, positives: dict[str, Sequence["ImageInput"]],
              negatives: Sequence["ImageInput"], *, target_precision: float = 0.9, store: bool = True,
              face: Any = None) -> Calibration:
    """Score held-out images, choose the threshold, and (by default) save it as the user's setting.

    `face` (a `FaceModel`): the face threshold too, from the same images: each face found in a positive image is
    scored by its best match among the user's person concepts (correct when that is the image's concept), each
    face in a negative image by its best match (never correct); the lowest face threshold at the target
    precision is stored as the user's `FACE_THRESHOLD_SETTING` (`Calibration.face`)."""
    result = _calibrate_clip(db, user, positives, negatives, target_precision)
    if face is not None:
        result.face = _calibrate_face(db, user, positives, negatives, target_precision, face)
    if store:
        db.store.set_setting(user, THRESHOLD_SETTING, result.threshold)
        if result.face is not None:
            from .retrieval import FACE_THRESHOLD_SETTING

            db.store.set_setting(user, FACE_THRESHOLD_SETTING, result.face["threshold"])
    return result


def _calibrate_face(db: "ConceptDB", user: str, positives: dict[str, Sequence["ImageInput"]],
                    negatives: Sequence["ImageInput"], target: float, face: Any) -> "dict[str, Any] | None":
    from .retrieval import Retriever

    retriever = Retriever(db, face=face)
    retriever.index_budget = None  # a calibration indexes every reference face first (not a request's share)
    people = retriever.people(user)
    if not people:
        return None

    def best(image: "ImageInput") -> list[tuple[float, str]]:
        out = []
        for f in face.detect(image):
            hits = [m for m in db.store.search(user, f.vector, embedder=face.name, k=max(4, len(people)))
                    if m.concept.id in people]
            if hits:
                out.append((hits[0].score, hits[0].concept.id))
        return out

    scored: list[tuple[float, bool]] = []
    n_pos = 0
    for name, images in positives.items():
        concept = db.resolve(user, name)
        for image in images:
            for score, cid in best(image):
                n_pos += concept.id in people
                scored.append((score, cid == concept.id))
    for image in negatives:
        scored += [(score, False) for score, _ in best(image)]
    if not scored:
        return None
    threshold, precision, recall, reached = choose_threshold(scored, n_pos, target)
    return {"threshold": threshold, "precision": precision, "recall": recall, "faces": len(scored),
            "reached": reached}


def _calibrate_clip(db: "ConceptDB", user: str, positives: dict[str, Sequence["ImageInput"]],
                    negatives: Sequence["ImageInput"], target_precision: float) -> Calibration:
    scored: list[tuple[float, bool]] = []
    n_pos = 0
    for name, images in positives.items():
        concept = db.resolve(user, name)
        if not images:
            continue
        vectors = db.embedder.embed_images(list(images))
        for v in vectors:
            hits = db.store.search(user, v, embedder=db.embedder.name, k=1)
            n_pos += 1
            if hits:
                scored.append((hits[0].score, hits[0].concept.id == concept.id))
    if negatives:
        for v in db.embedder.embed_images(list(negatives)):
            hits = db.store.search(user, v, embedder=db.embedder.name, k=1)
            if hits:
                scored.append((hits[0].score, False))
    threshold, precision, recall, reached = choose_threshold(scored, n_pos, target_precision)
    return Calibration(threshold, precision, recall, target_precision, n_pos, len(negatives), reached)


def images_in(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise MmpersonaError(f"{str(folder)!r} is not a folder")
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def positives_from_folder(folder: str | Path) -> dict[str, list[Path]]:
    """`folder/<concept name>/*.png` -> {name: images}."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MmpersonaError(f"{str(folder)!r} is not a folder")
    return {sub.name: images_in(sub) for sub in sorted(folder.iterdir()) if sub.is_dir()}
