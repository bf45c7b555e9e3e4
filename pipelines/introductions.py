"""New concepts proposed from the conversation: "this is my friend Anna" about a photo proposes a concept <anna>,
made from the region of the photo that shows her, for the user to confirm in one step.

`introductions(message)` finds who or what the user introduces, by a documented set of patterns (below; the same
rule-based approach as `memory.RuleExtractor`). `propose_concepts` turns each into a `ConceptProposal`: a name
the user does not use yet, a category (a person for the people words, else the word itself: "my dog Rex" is a
dog), the relation as its info ("my friend"), and the region of the photo:

1. a person (or an introduction without a category) with a face model: the largest face that retrieval did not
   already match to a concept of the user, widened to head and shoulders (`head_and_shoulders`);
2. otherwise, with a detector: the largest box of the category (or of the user's categories) that no recognised
   concept holds;
3. otherwise, or when neither finds a free region: the whole photo.

Regions go to the introductions in order, largest first. `detect=False` (the server) uses only what the answer's
retrieval already computed (the faces it found, which are cached per user and photo): no model runs for a
proposal. `accept(db, user, proposal, image)` makes the concept: the crop, embedded as every reference image is.

Patterns (the first that matches a sentence decides; a NAME is a capitalised word, or a handle in brackets):
| pattern | name | relation |
|---|---|---|
| this is / that's / here is / meet / say hi to (my RELATION,) NAME | NAME | RELATION |
| this is / meet NAME, my RELATION | NAME | RELATION |
| NAME is my RELATION (a people word, or a pet's or thing's: `THING_WORDS`) | NAME | RELATION |
Questions are skipped."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from PIL import Image

    from concept_db.types import Concept
    from mmpersona.conceptdb import ConceptDB

#: relations that make the introduced concept a person
PERSON_WORDS = frozenset("""friend sister brother mom mum mother dad father wife husband son daughter partner boyfriend
girlfriend fiance fiancee colleague coworker co-worker boss grandma grandmother grandpa grandfather granny aunt uncle
cousin niece nephew neighbour neighbor roommate flatmate baby kid child teacher coach buddy pal bestie best""".split())
#: what "NAME is my RELATION" may introduce besides people ("Today is my birthday" introduces nobody)
THING_WORDS = frozenset("""dog puppy cat kitten pet bird parrot budgie hamster rabbit bunny fish turtle tortoise horse
pony guinea pig lizard snake car bike bicycle motorbike scooter guitar piano violin mug cup backpack bag doll toy
teddy plant tree house boat camera laptop phone watch""".split())
_NAME = r"(?:<(?P<{0}b>[^<>\s]{{1,64}})>|(?P<{0}>[A-Z][\w'’-]{{0,63}}))"
_RELATION = r"(?P<{0}>(?:best |little |big |older |younger |new |old )?[a-z][a-z-]{{1,20}})"
_CUE = r"(?:this is|that is|that's|here is|here's|meet|say hi to|say hello to)"
_PATTERNS = (
    re.compile(rf"\b{_CUE}\s+my\s+{_RELATION.format('rel')}\s*,?\s+{_NAME.format('name')}", re.IGNORECASE),
    re.compile(rf"\b{_CUE}\s+{_NAME.format('name')}\s*,\s*my\s+{_RELATION.format('rel')}\b", re.IGNORECASE),
    re.compile(rf"\b{_CUE}\s+{_NAME.format('name')}", re.IGNORECASE),
    re.compile(rf"^{_NAME.format('name')}\s+is\s+my\s+{_RELATION.format('rel')}\b"),
)
_NOT_NAMES = frozenset("i a an the my our this that he she it they we you his her their me him us them".split())
_SENTENCE = re.compile(r"[^.!?\n;]+[.!?]?")


@dataclass(frozen=True)
class Introduction:
    """Who or what a sentence introduces: a name, and the relation the user gave ("friend", "dog"; "": none)."""

    name: str
    relation: str = ""

    @property
    def category(self) -> str:
        last = self.relation.split()[-1] if self.relation else ""
        return "person" if last in PERSON_WORDS else last


@dataclass(frozen=True)
class ConceptProposal:
    """A concept proposed from a turn: confirm it with `accept` (or `PersonalizedVLMPipeline.add_proposed`).
    `box`: the region of the photo it is made from (None: the whole photo); `source`: "face", "detector" or
    "photo"."""

    name: str
    category: str
    info: str
    box: tuple[int, int, int, int] | None
    source: str

    @property
    def handle(self) -> str:
        return f"<{self.name}>"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "handle": self.handle, "category": self.category, "info": self.info,
                "box": list(self.box) if self.box else None, "source": self.source}


def introductions(message: str) -> list[Introduction]:
    """Who or what `message` introduces (module docs), at most one per sentence, each name once."""
    out: list[Introduction] = []
    for raw in _SENTENCE.findall(message or ""):
        sentence = " ".join(raw.split())
        if sentence.endswith("?"):
            continue
        for pattern in _PATTERNS:
            m = pattern.search(sentence)
            if m is None:
                continue
            name = m.group("nameb") or m.group("name")
            if name.lower() in _NOT_NAMES or (not m.group("nameb") and not name[0].isupper()):
                continue
            relation = m.groupdict().get("rel") or ""
            relation = " ".join(relation.lower().split())
            if relation in _NOT_NAMES:
                continue
            if pattern is _PATTERNS[3] and relation.split()[-1] not in PERSON_WORDS | THING_WORDS:
                continue
            if all(i.name.lower() != name.lower() for i in out):
                out.append(Introduction(name, relation))
            break
    return out


def head_and_shoulders(box: tuple[int, int, int, int], size: tuple[int, int]) -> tuple[int, int, int, int]:
    """A face's box widened to the head and shoulders (half a face to each side, a third above, one below),
    clipped to the photo: what a person's reference photo shows."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    return (max(0, x0 - w // 2), max(0, y0 - h // 3), min(size[0], x1 + w // 2), min(size[1], y1 + h))


def _free(box: tuple[int, int, int, int], taken: Sequence[tuple[int, int, int, int]]) -> bool:
    from .retrieval import iou

    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return not any(iou(box, t) >= 0.3 or (t[0] <= cx < t[2] and t[1] <= cy < t[3]) for t in taken)


def _area(box: tuple[int, int, int, int]) -> int:
    return (box[2] - box[0]) * (box[3] - box[1])


def propose_concepts(db: "ConceptDB", retriever: Any, user: str, message: str, image: "Image.Image | None",
                     retrieved: Sequence[Any] = (), *, detect: bool = True) -> list[ConceptProposal]:
    """Concept proposals from what the user said about `image` (module docs). `retrieved`: the turn's
    `RetrievedConcept`s (their regions are taken); `retriever`: the pipeline's, for its face model and detector."""
    from concept_db.types import InvalidConceptError, normalize_name

    if image is None:
        return []
    found = introductions(message)
    if not found:
        return []
    names = []
    for intro in found:
        try:
            name = normalize_name(intro.name)
        except InvalidConceptError:
            continue
        if name.lower() not in {n.lower() for n, _ in names}:
            names.append((name, intro))
    # a name the user has, in any case ("Bo" is <bo>), is not proposed (retrieval finds that concept)
    known = {h.lower() for h in db.store.find_many(user, [v for n, _ in names for v in (n, n.lower(), n.title())])}
    names = [(n, i) for n, i in names if n.lower() not in known]
    if not names:
        return []
    taken = [r.box for r in retrieved if getattr(r, "box", None)]
    out = []
    for name, intro in names:
        box, source = None, "photo"
        category = intro.category
        face = getattr(retriever, "face", None)
        if face is not None and category in ("person", ""):
            faces = retriever.faces(user, image) if detect else retriever.known_faces(user, image)
            free = sorted((f.box for f in faces if _free(f.box, taken)), key=_area, reverse=True)
            if free:
                box, source, category = head_and_shoulders(free[0], image.size), "face", "person"
        detector = getattr(retriever, "detector", None)
        if box is None and detect and detector is not None and category != "person":
            labels = [category] if category else db.store.categories(user) or ["object"]
            boxes = [d.box for d in detector.detect(image, labels, threshold=retriever.detector_threshold, top_k=8)
                     if _free(d.box, taken)]
            if boxes:
                box, source = max(boxes, key=_area), "detector"
        if box is not None:
            taken.append(box)
        info = f"my {intro.relation}" if intro.relation else ""
        out.append(ConceptProposal(name, category, info, box, source))
    return out


def accept(db: "ConceptDB", user: str, proposal: ConceptProposal | dict, image: "Image.Image") -> "Concept":
    """Make the proposed concept (a `ConceptProposal`, or its `to_dict()` with the user's edits): the region of
    `image` it names, as its reference photo."""
    p = proposal.to_dict() if isinstance(proposal, ConceptProposal) else dict(proposal)
    box = p.get("box")
    if box is not None:
        from concept_db.types import InvalidConceptError

        if not (isinstance(box, (list, tuple)) and len(box) == 4 and all(isinstance(v, int) for v in box)):
            raise InvalidConceptError(f"a proposal's box is [x0, y0, x1, y1] in pixels, got {box!r}")
        x0, y0, x1, y1 = box
        if not (0 <= x0 < x1 <= image.width and 0 <= y0 < y1 <= image.height):
            raise InvalidConceptError(f"box {list(box)} is not inside the {image.width}x{image.height} photo")
        image = image.crop((x0, y0, x1, y1))
    return db.add(user, p["name"], [image], category=p.get("category") or "", info=p.get("info") or "",
                  aliases=p.get("aliases") or ())
