"""Which of a user's concepts a question and an image are about: typed results, no prompt text.

Four sources, each a method of its own:
- mentions: `<name>`, the bare name or an alias written in the question (every turn of a chat);
- the whole image, embedded and searched in the user's concepts;
- regions: boxes from an open-vocabulary detector prompted with the categories in the user's database, each
  crop embedded and searched;
- faces: each face found in the photo matched against the faces in the user's reference images (`by_faces`).
`merge` de-duplicates by concept (not by image), keeping each concept's best evidence.

How face evidence is fused with CLIP and the instance embedder (README "Person concepts"): CLIP and the instance
embedder are fused into one score (`fused`); face scores are on a scale of their own and are not mixed into it.
A face hit needs the face threshold (calibrated per user), and then outranks image and region hits (an identity
match, where CLIP sees "a person"). When the photo has faces, a person concept (one with a face in its reference
images) is found by its face or not at all: CLIP and instance hits of person concepts are dropped, so a stranger
is not taken for the user's friend because both are people. A detected region holding a face takes the face's
concept (one face per region) and is not assigned again.

How a region hit is accepted (README "Regions"): for a user with at least `COHORT_MIN` concepts, a crop's score
to a concept must stand out among the user's concepts: its S-norm (`pipelines.cohort`) at least `region_snorm`
(2.5 by default). A crop scores lower than the whole photos the cosine threshold was calibrated on, and a part
of one object looks a little like everything; the normalised score tells the two apart where the cosine cannot.
Users with fewer concepts, and `region_snorm=None`, keep the cosine threshold for regions too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from concept_db.types import InvalidConceptError, normalize_name

from .caching import UserCache
from .cohort import COHORT_K, COHORT_MIN, REGION_SNORM, ConceptCohort, best_pairs, concept_cohort, snorm

if TYPE_CHECKING:
    from PIL import Image

    from concept_db import Concept
    from mmpersona.conceptdb import ConceptDB
    from mmpersona.face import Face, FaceModel
    from mmpersona.instance import InstanceEmbedder
    from mmpersona.models import Detector
    from mmpersona.models.loaders import Detection

MENTION = re.compile(r"<([^<>\n]{1,64})>")
WORD = re.compile(r"[\w][\w'\-]*", re.UNICODE)
SOURCES = ("mention", "face", "image", "region")
#: The user's setting that holds their calibrated face threshold (cosine of unit face vectors).
FACE_THRESHOLD_SETTING = "retrieval_face_min_score"


@dataclass(frozen=True)
class RetrievedConcept:
    """One retrieved concept and the evidence for it.

    `score` is a cosine similarity for image, region and face hits (faces: of face vectors), and 1.0 for a
    mention. `box` is the region `(x0, y0, x1, y1)` for region hits, the face's for face hits; `image` the
    content hash of the reference image that matched; `snorm` a region hit's cohort-normalised score, when it
    was accepted by it (module docs).
    """

    concept: "Concept"
    score: float
    source: str
    box: tuple[int, int, int, int] | None = None
    image: str | None = None
    snorm: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"concept": self.concept.to_dict(), "score": round(self.score, 6), "source": self.source,
                "box": list(self.box) if self.box else None, "image": self.image,
                "snorm": None if self.snorm is None else round(self.snorm, 4)}


def mention_candidates(text: str, max_words: int = 3) -> list[str]:
    """Handles a question may name: `<...>` spans, and word n-grams (as written, lower-case, capitalised)."""
    out: list[str] = []
    for m in MENTION.finditer(text):
        try:
            out.append(normalize_name(m.group(1)))
        except InvalidConceptError:
            continue
    words = WORD.findall(MENTION.sub(" ", text))
    for n in range(1, max_words + 1):
        for i in range(len(words) - n + 1):
            phrase = " ".join(words[i : i + n])
            if len(phrase) < 2:
                continue
            out += [phrase, phrase.lower(), phrase.capitalize()]
    return list(dict.fromkeys(out))


class Retriever:
    """Retrieval over one `ConceptDB` (and, for regions, a detector).

    `detector_threshold`: the detector's box score threshold; None (default) uses the detector family's own
    (OWLv2 0.1, Grounding DINO 0.35 with 0.25 for its label tokens: `Detector.default_threshold`).
    `region_snorm`: the S-norm a region hit needs (module docs); None: the cosine threshold, as for images."""

    def __init__(self, db: "ConceptDB", detector: "Detector | None" = None, *,
                 detector_threshold: float | None = None, max_regions: int = 8,
                 instance: "InstanceEmbedder | None" = None, instance_weight: float = 0.5,
                 face: "FaceModel | None" = None, face_threshold: float | None = None,
                 region_snorm: float | None = REGION_SNORM):
        self.db = db
        self.detector = detector
        self.detector_threshold = detector_threshold
        self.max_regions = max_regions
        self.instance = instance
        if not 0.0 <= instance_weight <= 1.0:
            raise InvalidConceptError(f"instance_weight must lie in [0, 1], got {instance_weight}")
        self.instance_weight = instance_weight
        self.face = face
        self.face_threshold = face_threshold  # None: the user's calibrated one, else the face model's default
        self.region_snorm = region_snorm
        self._cache = UserCache(per_user=32, users=64)  # see image_vector, faces, cohort
        # (user, instance embedder) -> the store revision at which all the user's images had its vectors
        self._indexed: dict[tuple[str, str], int] = {}
        # (user, face model) -> (revision, ids of the concepts with a face in their reference images)
        self._people: dict[tuple[str, str], tuple[int, frozenset[str]]] = {}

    @staticmethod
    def _pixels_key(model: str, image: "Image.Image") -> str:
        import hashlib

        digest = hashlib.blake2b(image.tobytes(), digest_size=16).hexdigest()
        return f"{model}|{image.mode}|{image.width}x{image.height}|{digest}"

    def image_vector(self, user: str, image: "Image.Image") -> Any:
        """The embedder's vector of a whole image, remembered by its pixels for the user who sent it (their last
        32 images): the turns of a chat about one photo, or an evaluation asking many questions of one image,
        embed it once. Per user: a cache shared by pixels would answer one user fast for a photo another user
        sent, and so tell them. The vector depends on the pixels and the embedder alone (always embedded on its
        own, a batch of one), so the cache changes no result."""
        emb = self.db.embedder
        key = self._pixels_key(emb.name, image)
        vector = self._cache.get(user, key)
        if vector is None:
            vector = emb.embed_images([image])[0]
            self._cache.put(user, key, vector)
        return vector

    def by_mention(self, user: str, text: str) -> list[RetrievedConcept]:
        """Concepts named in `text` by `<name>`, bare name or alias, in order of first mention."""
        found = self.db.store.find_many(user, mention_candidates(text))
        seen: dict[str, RetrievedConcept] = {}
        for concept in found.values():
            seen.setdefault(concept.id, RetrievedConcept(concept, 1.0, "mention"))
        return list(seen.values())

    def by_image(self, user: str, image: "Image.Image", *, k: int = 3,
                 min_score: float | None = None) -> list[RetrievedConcept]:
        """The user's concepts that look most like the whole image (fused with the instance embedder's
        similarity when the retriever has one: `fused`)."""
        vector = self.image_vector(user, image)
        if self.instance is not None:
            return [RetrievedConcept(m.concept, score, "image", None, m.image)
                    for m, score in self.fused(user, vector, self.instance_vectors([image])[0], k, min_score)]
        return [RetrievedConcept(m.concept, m.score, "image", None, m.image)
                for m in self.db.store.search(user, vector, embedder=self.db.embedder.name, k=k,
                                              min_score=min_score)]

    def instance_vectors(self, images: list["Image.Image"]) -> Any:
        return self.instance.embed_images(images)

    #: Reference images one retrieval embeds at most for missing instance or face vectors (a request's cost is
    #: bounded: 8 faces are about 2.5 s on one CPU thread); the rest on the next retrievals, or all at once with
    #: `mmpersona concepts reindex`. Images not yet indexed are not matched meanwhile. None: no bound.
    index_budget: int | None = 8

    def ensure_instance_vectors(self, user: str, embedder: Any = None) -> int:
        """Give the user's reference images an instance vector (or `embedder`'s: the face model's) lazily: once
        per change of the user's data, one listing when nothing is missing, at most `index_budget` images per
        call; returns how many were computed."""
        from mmpersona.instance import ensure_vectors

        embedder = embedder or self.instance
        key = (user, embedder.name)
        if self._indexed.get(key) == self.db.store.revision(user):
            return 0
        done = ensure_vectors(self.db, user, embedder, limit=self.index_budget)
        if self.index_budget is None or done < self.index_budget:  # nothing is left to index at this revision
            self._indexed[key] = self.db.store.revision(user)
        return done

    # ------------------------------------------------------------------ faces

    def people(self, user: str) -> frozenset[str]:
        """Ids of the user's concepts with a face in at least one reference image (person concepts)."""
        from mmpersona.face import is_face

        self.ensure_instance_vectors(user, self.face)
        key = (user, self.face.name)
        revision = self.db.store.revision(user)
        known = self._people.get(key)
        if known is None or known[0] != revision:
            ids, _, vectors = self.db.store.owner_vectors(user, self.face.name)
            known = (revision, frozenset(c for c, v in zip(ids, vectors, strict=True) if is_face(v)))
            self._people[key] = known
        return known[1]

    def user_face_threshold(self, user: str) -> float:
        if self.face_threshold is not None:
            return self.face_threshold
        stored = self.db.store.get_setting(user, FACE_THRESHOLD_SETTING)
        return float(stored) if stored is not None else self.face.default_threshold

    def faces(self, user: str, image: "Image.Image") -> list["Face"]:
        """The faces in `image` (each with its vector), largest first; remembered by its pixels for this user only,
        as `image_vector` is (a chat's turns about one photo detect once; a detection's 0.1-0.8 s never tells a
        user that another sent the same photo)."""
        key = self._faces_key(image)
        found = self._cache.get(user, key)
        if found is None:
            found = self.face.detect(image)
            self._cache.put(user, key, found)
        return list(found)

    def known_faces(self, user: str, image: "Image.Image") -> list["Face"]:
        """The faces `faces` found in `image` for this user, if it looked already (else none: nothing is detected
        here)."""
        if self.face is None:
            return []
        return list(self._cache.get(user, self._faces_key(image)) or [])

    def _faces_key(self, image: "Image.Image") -> str:
        return self._pixels_key(f"faces:{self.face.name}", image)

    def by_faces(self, user: str, image: "Image.Image", *, faces: "list[Face] | None" = None,
                 min_score: float | None = None, people: frozenset[str] | None = None) -> list[RetrievedConcept]:
        """Each face in the photo matched against the user's reference faces: (face, concept) pairs at or above
        the face threshold (`min_score`, else the user's calibrated one, else the face model's default), taken
        one-to-one, best first, so that a group photo's faces become different people. `people`: the user's
        person concepts when the caller has them already (`people` indexes, so one request asks once)."""
        if self.face is None:
            raise InvalidConceptError("face retrieval needs a face model (pass one, or faces=False)")
        faces = self.faces(user, image) if faces is None else faces
        if not faces:
            return []
        people = self.people(user) if people is None else people
        if not people:
            return []
        threshold = self.user_face_threshold(user) if min_score is None else min_score
        k = max(4, 2 * len(faces))
        candidates = [(m.score, i, m) for i, f in enumerate(faces)
                      for m in self.db.store.search(user, f.vector, embedder=self.face.name, k=k, min_score=threshold)
                      if m.concept.id in people]
        return [RetrievedConcept(m.concept, score, "face", faces[i].box, m.image)
                for score, i, m in one_to_one(candidates)]

    def without_people(self, user: str, hits: list[RetrievedConcept],
                       people: frozenset[str] | None = None) -> list[RetrievedConcept]:
        """`hits` less the person concepts: used when the photo has faces (then a person is found by face)."""
        people = self.people(user) if people is None else people
        return [r for r in hits if r.concept.id not in people]

    def fused(self, user: str, clip_vector: Any, instance_vector: Any, k: int,
              min_score: float | None) -> list[tuple[Any, float]]:
        """CLIP and the instance embedder, fused (the documented rule):

        1. CLIP's best `4k` concepts above `min_score` are the candidates (the threshold stays CLIP's, as
           calibrated);
        2. the instance embedder's best `4k` are searched too; a candidate outside them takes the lowest of
           those scores (a bound on its own);
        3. fused score = (1 - w) * CLIP + w * instance, with w = `instance_weight` (0.5 by default); the best
           `k` by fused score are returned, each with the fused score.
        """
        self.ensure_instance_vectors(user)
        wide = max(4 * k, 8)
        clip = self.db.store.search(user, clip_vector, embedder=self.db.embedder.name, k=wide, min_score=min_score)
        if not clip:
            return []
        inst = {m.concept.id: m.score
                for m in self.db.store.search(user, instance_vector, embedder=self.instance.name, k=wide)}
        floor = min(inst.values()) if inst else 0.0
        w = self.instance_weight
        scored = [(m, (1 - w) * m.score + w * inst.get(m.concept.id, floor)) for m in clip]
        scored.sort(key=lambda t: -t[1])
        return scored[:k]

    def cohort(self, user: str) -> ConceptCohort | None:
        """The statistics of the user's concepts that region scores are normalised with (`pipelines.cohort`), or
        None when regions keep the cosine threshold (`region_snorm` is None, or fewer than `COHORT_MIN`
        concepts). Computed from the stored vectors (fused as `fused` fuses, with an instance embedder) once per
        change of the user's data, and cached for that user only."""
        if self.region_snorm is None:
            return None
        if self.instance is not None:
            self.ensure_instance_vectors(user)
        parts = [self.db.embedder.name]
        if self.instance is not None:
            parts += [self.instance.name, repr(self.instance_weight)]
        key = f"cohort|{'|'.join(parts)}|{self.db.store.revision(user)}"
        found = self._cache.get(user, key)
        if found is None:
            found = self._concept_cohort(user)
            self._cache.put(user, key, found)
        return found if len(found) >= COHORT_MIN else None

    def _concept_cohort(self, user: str) -> ConceptCohort:
        import numpy as np

        ids, _, vectors = self.db.store.owner_vectors(user, self.db.embedder.name)
        concepts, matrix = best_pairs(ids, vectors)
        if len(concepts) < COHORT_MIN:
            return ConceptCohort({}, {})
        if self.instance is not None:
            inst_ids, _, inst_vectors = self.db.store.owner_vectors(user, self.instance.name)
            inst_concepts, inst_matrix = best_pairs(inst_ids, inst_vectors)
            where = {c: i for i, c in enumerate(inst_concepts)}
            have = [a for a, c in enumerate(concepts) if c in where]  # not yet indexed: CLIP's score alone
            full = matrix.copy()
            full[np.ix_(have, have)] = inst_matrix[np.ix_([where[concepts[a]] for a in have],
                                                          [where[concepts[a]] for a in have])]
            w = self.instance_weight
            matrix = (1 - w) * matrix + w * full
        return concept_cohort(concepts, matrix)

    def regions(self, user: str, image: "Image.Image", *, merge_iou: float | None = None) -> list["Detection"]:
        """Boxes of the user's categories in `image` (one detector pass, every category a query), best first;
        with `merge_iou`, a box overlapping a better one by at least that IoU is merged into it (whatever its
        label: one object found as "dog" and as "animal" is one region)."""
        if self.detector is None:
            raise InvalidConceptError("region retrieval needs a detector (pass one, or regions=False)")
        labels = self.db.store.categories(user)
        if not labels:
            return []
        detections = self.detector.detect(image, labels, threshold=self.detector_threshold, top_k=self.max_regions)
        if merge_iou is not None:
            kept: list = []
            for d in detections:
                if all(iou(d.box, other.box) < merge_iou for other in kept):
                    kept.append(d)
            detections = kept
        return detections

    def by_regions(self, user: str, image: "Image.Image", *, k: int = 3, min_score: float | None = None,
                   assign: bool = False, merge_iou: float = 0.5,
                   taken: "list[RetrievedConcept] | None" = None) -> list[RetrievedConcept]:
        """Detect regions of the user's categories, embed each crop in one batch, search each.

        `assign`: one concept per region and one region per concept, so that four people in a photo become four
        concepts, not the best match four times. Overlapping boxes are merged first (`merge_iou`); then the
        (region, concept) pairs are taken greedily by score, best first, each region and each concept at most
        once. Without it, each region contributes its `k` best concepts (and `merge` keeps a concept's best).

        `taken`: face hits already assigned; with `assign`, a region holding one of those faces (its centre) is
        that face's concept's region and takes no other, and those concepts are not assigned to another region.

        A hit is accepted by its S-norm (at least `region_snorm`) when the user has a cohort (`cohort`), else by
        `min_score` (module docs)."""
        detections = self.regions(user, image, merge_iou=merge_iou if assign else None)
        if assign and taken:
            detections = [d for d in detections if not any(_holds(d.box, r.box) for r in taken)]
        if not detections:
            return []
        cohort = self.cohort(user)
        crops = [image.crop(d.box) for d in detections]
        vectors = self.db.embedder.embed_images(crops)
        # assigning: enough candidates per region that a region whose best concept went elsewhere has its next
        per_region = max(k, len(detections)) if assign else k
        # normalising: each crop's K + 1 best, its cohort (accepted by S-norm, not by the cosine threshold)
        wide, floor = (max(per_region, min(COHORT_K + 1, len(cohort))), None) if cohort else (per_region, min_score)
        if self.instance is not None:
            instance = self.instance_vectors(crops)
            hits = [self.fused(user, v, iv, wide, floor) for v, iv in zip(vectors, instance, strict=True)]
        else:
            hits = [[(m, m.score) for m in self.db.store.search(user, v, embedder=self.db.embedder.name,
                                                                 k=wide, min_score=floor)]
                    for v in vectors]
        scored = [[(m, score, None) for m, score in matches] for matches in hits]
        if cohort:
            scored = []
            for matches in hits:
                norms = snorm({m.concept.id: score for m, score in matches}, cohort)
                kept = [(m, score, norms[m.concept.id]) for m, score in matches
                        if norms.get(m.concept.id, float("-inf")) >= self.region_snorm]
                scored.append(kept[:per_region])
        if not assign:
            return [RetrievedConcept(m.concept, score, "region", det.box, m.image, z)
                    for det, matches in zip(detections, scored, strict=True) for m, score, z in matches]
        candidates = [(score, i, m) for i, matches in enumerate(scored) for m, score, _ in matches]
        norms = {(i, m.concept.id): z for i, matches in enumerate(scored) for m, _, z in matches}
        return [RetrievedConcept(m.concept, score, "region", detections[i].box, m.image, norms[i, m.concept.id])
                for score, i, m in one_to_one(candidates, taken={r.concept.id for r in taken or ()})]

    def retrieve(self, user: str, text: str, image: "Image.Image | None", *, k: int = 3,
                 min_score: float | None = None, regions: bool = False,
                 assign: bool = False) -> list[RetrievedConcept]:
        """Every source the retriever has, merged by concept: what a question (`text`) about `image` is about.
        `min_score` is the CLIP (or fused) threshold; faces use the face threshold (`user_face_threshold`)."""
        groups = [self.by_mention(user, text)]
        if image is not None:
            # asked once: `people` indexes missing faces, at most `index_budget` of them a call (a request's bound)
            people = self.people(user) if self.face is not None else frozenset()
            # no face is searched for a user without person concepts (detection costs 0.1-0.8 s a photo)
            faces = self.faces(user, image) if people else []
            found = self.by_faces(user, image, faces=faces, people=people) if faces else []
            visual = [self.by_image(user, image, k=k, min_score=min_score)]
            if regions:
                visual.append(self.by_regions(user, image, k=k, min_score=min_score, assign=assign, taken=found))
            if faces:  # a person in a photo with faces is found by face or not at all (module docs)
                visual = [self.without_people(user, hits, people) for hits in visual]
            groups += [found, *visual]
        return self.merge(*groups)

    @staticmethod
    def merge(*groups: list[RetrievedConcept]) -> list[RetrievedConcept]:
        """One entry per concept: mentions first, then face matches, then by best score. A concept found in a
        region keeps that region's box even when other evidence (a mention, the whole image) ranks higher: where
        it is."""
        best: dict[str, RetrievedConcept] = {}
        region: dict[str, RetrievedConcept] = {}  # each concept's best region hit
        for group in groups:
            for r in group:
                current = best.get(r.concept.id)
                if current is None or _rank(r) > _rank(current):
                    best[r.concept.id] = r
                if r.box is not None and (r.concept.id not in region or r.score > region[r.concept.id].score):
                    region[r.concept.id] = r
        merged = [r if r.box is not None or r.concept.id not in region else replace(r, box=region[r.concept.id].box)
                  for r in best.values()]
        return sorted(merged, key=_rank, reverse=True)


def iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """Intersection over union of two `(x0, y0, x1, y1)` boxes."""
    w = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def one_to_one(candidates: list[tuple[float, int, Any]], taken: set[str] | None = None) -> list[tuple[float, int, Any]]:
    """Greedy one-to-one assignment of (score, slot, match) candidates, best score first (then lower slot): each
    slot (a region, a face) and each concept (`match.concept.id`) at most once; concepts in `taken` never."""
    out, slots, concepts = [], set(), set(taken or ())
    for score, i, m in sorted(candidates, key=lambda t: (-t[0], t[1])):
        if i in slots or m.concept.id in concepts:
            continue
        slots.add(i)
        concepts.add(m.concept.id)
        out.append((score, i, m))
    return out


def _holds(region: tuple[int, int, int, int], face: tuple[int, int, int, int] | None) -> bool:
    """Whether the centre of `face` lies inside `region`."""
    if face is None:
        return False
    cx, cy = (face[0] + face[2]) / 2, (face[1] + face[3]) / 2
    return region[0] <= cx <= region[2] and region[1] <= cy <= region[3]


def _rank(r: RetrievedConcept) -> tuple[int, float]:
    """Mentions first, then face matches (identity evidence above the face threshold), then by score."""
    return (2 if r.source == "mention" else 1 if r.source == "face" else 0, r.score)
