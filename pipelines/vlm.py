"""Personalized answers from any transformers image-text-to-text model (RAP style, training-free).

    from pipelines import PersonalizedVLMPipeline
    pipe = PersonalizedVLMPipeline("concepts.db", preset="tiny")
    answer = pipe("photo.jpg", "What is <bo> doing?", user="alice")
    answer.answer, answer.retrieved, answer.abstained, answer.timings

Read top to bottom, a call is: check inputs -> retrieve (mentions, image, optional regions) -> render the
retrieved concepts into the model's own chat template within a budget -> generate -> `VLMAnswer`. Each step is
a method of its own. Edits to the concept database take effect on the next call.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from concept_db.types import ConceptDBError
from mmpersona.errors import MmpersonaError
from mmpersona.images import ImageInput, load_image, load_image_with_bytes
from mmpersona.models.loaders import DEFAULT_MAX_VISUAL_TOKENS

from .memory import MemoryIndex
from .prompt import Grounding, PromptBudget, PromptBuilder, defuse, printable_messages, quote
from .retrieval import RetrievedConcept, Retriever

if TYPE_CHECKING:
    from collections.abc import Sequence

    from PIL import Image

    from concept_db.types import Turn
    from mmpersona.conceptdb import ConceptDB
    from mmpersona.models import Detector, LoadedVLM

logger = logging.getLogger(__name__)

THRESHOLD_SETTING = "retrieval_min_score"
#: retrieval: concepts as text (RAP); tokens: only concepts with learned tokens (Yo'LLaVA); hybrid: learned
#: tokens for concepts that have them, text for the rest.
MODES = ("retrieval", "tokens", "hybrid")
#: how `answer_as` answers: the VLM alone, the ground-truth concepts injected, or retrieval (see `mode` for tokens)
ANSWER_METHODS = ("vanilla", "oracle", "retrieval")


def _face_model(face: Any, preset: str) -> Any:
    """A face model for `face`: a loaded one as is; True for the preset's; an id."""
    from mmpersona.face import FaceModel

    if isinstance(face, FaceModel):
        return face
    from mmpersona.models import load_face_model

    return load_face_model(None if face is True else face, preset=preset)


class UnknownUserError(ConceptDBError):
    """The user has no data in this concept database."""


@dataclass
class VLMAnswer:
    """What a personalized question produced.

    Attributes:
        answer: the model's reply.
        retrieved: the concepts injected into the prompt, best first, with score, source and box.
        abstained: True when no concept passed retrieval (none was injected).
        messages: the chat sent to the model (images described, not embedded).
        timings: milliseconds per stage: retrieval_ms, memory_ms, prompt_ms, generate_ms, total_ms.
        candidates: everything retrieval found, before the prompt budget.
        memory: the user's memory entries the prompt held (`MemoryEntry`).
    """

    answer: str
    retrieved: list[RetrievedConcept]
    abstained: bool
    messages: list[dict[str, Any]]
    timings: dict[str, float] = field(default_factory=dict)
    candidates: list[RetrievedConcept] = field(default_factory=list)
    memory: list[Any] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"answer": self.answer, "abstained": self.abstained,
                "retrieved": [r.to_dict() for r in self.retrieved],
                "candidates": [r.to_dict() for r in self.candidates],
                "memory": [e.to_dict() for e in self.memory],
                "messages": self.messages, "timings": {k: round(v, 3) for k, v in self.timings.items()}}


class PersonalizedVLMPipeline:
    """Answer questions about images with a user's concepts retrieved and injected into the prompt.

    Args:
        db: a `ConceptDB`, or a database path (None: the default path).
        vlm: a `LoadedVLM`, or a model id / preset choice for the `vlm` role.
        detector: a `Detector` or model id; used when `regions=True` (loaded from the preset if None).
        regions: also retrieve per detected region (prompted with the user's categories).
        assign: with regions, one concept per region and one region per concept (overlapping boxes merged), so
            that several concepts in one photo are each found, not the best match several times.
        boxes: tell the model where each region-retrieved concept is: its box in the model's own coordinate
            convention (`LoadedVLM.box_convention`) in the concept's line.
        marks: numbered marks drawn on a copy of the photo, sent instead of it, the concept list naming each
            concept's mark (Set-of-Mark); `original`: the unmarked photo sent too, before the marked copy.
        instance: match images and region crops with an instance embedder (DINOv2) beside CLIP, scores fused
            (`Retriever.fused`): True for the preset's, a model id, or a loaded `InstanceEmbedder`. Its vectors
            of the user's reference images are computed on first use (or by `mmpersona concepts reindex`).
        face: match the faces in the photo against the faces in the user's reference images (person concepts;
            `Retriever.by_faces`, fused as README "Person concepts" says): True for the preset's face model
            (dlib, `pip install "mmpersona[face]"`), a model id, or a loaded `FaceModel`.
        verify: ask the VLM, for each retrieved candidate (mentions aside), whether the photo (or the region)
            shows it, its reference image beside the crop; only confirmed ones are injected. At most
            `max_checks` checks per photo (candidates past the bound are not injected).
        preset, device, dtype: for models loaded here.
        k: concepts retrieved per source.
        min_score: cosine threshold for image/region hits; None uses the user's calibrated threshold if any.
        budget: limits on what concepts add to the prompt.
        max_new_tokens: answer length limit.
        max_visual_tokens: what one image may cost on dynamic-resolution VLMs, when the VLM is loaded here
            (a given `LoadedVLM` keeps its own; see `LoadedVLM.set_visual_budget`).
    """

    def __init__(self, db: "ConceptDB | str | Path | None" = None, *, vlm: "LoadedVLM | str | None" = None,
                 detector: "Detector | str | None" = None, embedder: Any = None, regions: bool = False,
                 assign: bool = False, boxes: bool = False, marks: bool = False, original: bool = False,
                 verify: bool = False, max_checks: int = 4, instance: "bool | str | Any" = False,
                 face: "bool | str | Any" = False,
                 preset: str = "default", device: Any = "auto", dtype: Any = None, k: int = 3,
                 min_score: float | None = None, budget: PromptBudget | None = None, max_new_tokens: int = 128,
                 mode: str = "retrieval", max_visual_tokens: int | None = DEFAULT_MAX_VISUAL_TOKENS):
        from mmpersona.conceptdb import ConceptDB
        from mmpersona.models import LoadedVLM, load_detector, load_vlm

        if k < 1:
            raise MmpersonaError(f"`k` must be at least 1, got {k}")
        if mode not in MODES:
            raise MmpersonaError(f"`mode` must be one of {', '.join(MODES)}, got {mode!r}")
        self.mode = mode
        self.db = db if isinstance(db, ConceptDB) else ConceptDB(db, embedder=embedder, preset=preset,
                                                                  device=device, dtype=dtype)
        self.vlm = vlm if isinstance(vlm, LoadedVLM) else load_vlm(vlm, preset=preset, device=device, dtype=dtype,
                                                                   max_visual_tokens=max_visual_tokens)
        if (regions and detector is None) or isinstance(detector, str):
            detector = load_detector(detector, preset=preset, device=device, dtype=dtype)
        self._load_args = {"preset": preset, "device": device, "dtype": dtype}  # for a detector `variant` loads
        self.regions = regions
        self.assign, self.boxes, self.marks, self.original = assign, boxes, marks, original
        self.verify, self.max_checks = verify, max_checks
        self._check_options()
        if instance is True:
            instance = None  # the preset's
        if instance is not False:
            from mmpersona.instance import InstanceEmbedder
            from mmpersona.models import load_instance_embedder

            if not isinstance(instance, InstanceEmbedder):
                instance = load_instance_embedder(instance, preset=preset, device=device, dtype=dtype)
        self.retriever = Retriever(self.db, detector, instance=instance or None,
                                   face=_face_model(face, preset) if face is not False else None)
        self.k = k
        self.min_score = min_score
        # the checkpoint's own special tokens, never learned concept tokens (a handle must reach those)
        self.prompts = PromptBuilder(budget, self.vlm.model_tokens(), interleaved=self.vlm.interleaves_images)
        self.max_new_tokens = max_new_tokens
        self.memory = MemoryIndex(self.db)

    #: a user with no concepts is an error (most likely a wrong `user`); False: they are answered like a user none
    #: of whose concepts was recognised (the HTTP API, where the user comes from an API key)
    require_concepts = True

    #: the options `variant` changes: retrieval and prompt options, the learned-token mode
    OPTIONS = ("regions", "assign", "instance", "face", "boxes", "marks", "original", "verify", "max_checks", "k",
               "min_score", "mode", "max_concepts", "max_images", "max_info_chars", "max_total_chars",
               "max_memory_chars")
    #: the options that are on / off switches
    FLAGS = ("regions", "assign", "instance", "face", "boxes", "marks", "original", "verify")

    def _check_options(self) -> None:
        if self.boxes and self.marks:
            raise MmpersonaError("choose `boxes` (boxes written in the prompt) or `marks` (marks drawn on the "
                                 "photo), not both")
        if self.original and not self.marks:
            raise MmpersonaError("`original` sends the unmarked photo beside the marked one: it needs `marks`")
        if not isinstance(self.max_checks, int) or self.max_checks < 1:
            raise MmpersonaError(f"`max_checks` must be a positive integer, got {self.max_checks!r}")

    def variant(self, **options: Any) -> "PersonalizedVLMPipeline":
        """This pipeline with some options changed (`OPTIONS`: the retrieval switches, k, min_score, mode, and the
        prompt budget's fields), sharing its database, models and image-vector cache: how an evaluation runs each
        option as a row of its own. A detector or instance embedder is loaded (from the same preset) when an
        option needs one and there is none."""
        from dataclasses import replace

        unknown = [k for k in options if k not in self.OPTIONS]
        if unknown:
            raise MmpersonaError(f"unknown pipeline option {unknown[0]!r}; valid: {', '.join(self.OPTIONS)}")
        out = object.__new__(type(self))
        out.__dict__.update(self.__dict__)
        out.mode = options.get("mode", self.mode)
        if out.mode not in MODES:
            raise MmpersonaError(f"`mode` must be one of {', '.join(MODES)}, got {out.mode!r}")
        out.k = int(options.get("k", self.k))
        if out.k < 1:
            raise MmpersonaError(f"`k` must be at least 1, got {out.k}")
        out.min_score = options.get("min_score", self.min_score)
        out.regions = bool(options.get("regions", self.regions))
        for flag in ("assign", "boxes", "marks", "original", "verify"):
            setattr(out, flag, bool(options.get(flag, getattr(self, flag))))
        out.max_checks = int(options.get("max_checks", self.max_checks))
        out._check_options()
        detector, instance = self.retriever.detector, self.retriever.instance
        if out.regions and detector is None:
            from mmpersona.models import load_detector

            detector = load_detector(None, **self._load_args)
        wants_instance = bool(options.get("instance", instance is not None))
        if wants_instance and instance is None:
            from mmpersona.models import load_instance_embedder

            instance = load_instance_embedder(None, **self._load_args)
        elif not wants_instance:
            instance = None
        face = self.retriever.face
        wants_face = bool(options.get("face", face is not None))
        if wants_face and face is None:
            face = _face_model(True, self._load_args["preset"])
        elif not wants_face:
            face = None
        if (detector is not self.retriever.detector or instance is not self.retriever.instance
                or face is not self.retriever.face):
            out.retriever = Retriever(self.db, detector, instance=instance,
                                      detector_threshold=self.retriever.detector_threshold,
                                      max_regions=self.retriever.max_regions,
                                      instance_weight=self.retriever.instance_weight, face=face,
                                      face_threshold=self.retriever.face_threshold,
                                      region_snorm=self.retriever.region_snorm)
            out.retriever._cache, out.retriever._indexed = self.retriever._cache, self.retriever._indexed
            out.retriever._people = self.retriever._people
        fields = {k: int(v) for k, v in options.items()
                  if k in ("max_concepts", "max_images", "max_info_chars", "max_total_chars", "max_memory_chars")}
        if fields:
            out.prompts = PromptBuilder(replace(self.prompts.budget, **fields), self.vlm.model_tokens(),
                                        interleaved=self.vlm.interleaves_images)
        return out

    # ------------------------------------------------------------------ steps

    def check_inputs(self, image: ImageInput | None, question: Any, user: Any, *,
                     text_only: bool = False) -> "Image.Image | None":
        """`text_only`: a question without an image is allowed (the evaluation's text-only QA)."""
        if not isinstance(question, str) or not question.strip():
            raise MmpersonaError(f"`question` must be a non-empty string, got {question!r}")
        if image is None and not text_only:
            raise MmpersonaError("`image` is required: pass the photo the question is about")
        if not isinstance(user, str) or not user.strip():
            raise MmpersonaError(f"`user` must be a non-empty string, got {user!r}")
        if self.require_concepts and not self.db.store.has_owner(user):
            raise UnknownUserError(f"user {user!r} has no concepts in this database (add some with "
                                   "`mmpersona concepts add`, or check --user)")
        return load_image(image) if image is not None else None

    def threshold(self, user: str) -> float | None:
        return self.min_score if self.min_score is not None else self.db.store.get_setting(user, THRESHOLD_SETTING)

    def retrieve(self, user: str, question: str, image: "Image.Image | None") -> list[RetrievedConcept]:
        """Concepts named in the question, plus those the image (and its regions) look like, merged by concept."""
        return self.retriever.retrieve(user, question, image, k=self.k, min_score=self.threshold(user),
                                       regions=self.regions, assign=self.assign)

    def reference_images(self, user: str, retrieved: list[RetrievedConcept]) -> dict[str, "Image.Image"]:
        """One reference image per concept (the one that matched, else the first), for the budget to use."""
        if not self.prompts.budget.max_images:
            return {}
        out = {}
        for r in retrieved[: self.prompts.budget.max_images]:
            h = r.image or (r.concept.images[0] if r.concept.images else None)
            if h is not None:
                out[r.concept.id] = load_image(self.db.store.image_bytes(user, h))
        return out

    @property
    def tokens(self):
        """The `TokenManager` of this pipeline's VLM, shared with `learn_concept` on the same model."""
        return self.vlm.tokens

    def load_learned(self, user: str, candidates: list[RetrievedConcept]
                     ) -> tuple[list[RetrievedConcept], list[tuple[RetrievedConcept, str]]]:
        """Split candidates into those rendered as text and those loaded as learned tokens (by `mode`).

        Learned concepts are loaded on demand; when the set needed changes, the previous ones are unloaded."""
        if self.mode == "retrieval":
            self.vlm.unload_tokens()
            return candidates, []
        from .tokens import TENSOR_NAME, latent_definition

        with_tokens = [r for r in candidates if TENSOR_NAME in self.db.store.list_tensors(user, r.concept.id)]
        wanted = {r.concept.id for r in with_tokens}
        if set(self.tokens.loaded) != wanted:
            self.tokens.unload_all()
        learned = [(r, latent_definition(self.tokens.load(self.db, user, r.concept))) for r in with_tokens]
        rest = [] if self.mode == "tokens" else [r for r in candidates if r.concept.id not in wanted]
        return rest, learned

    def generate(self, messages: list[dict[str, Any]], **kwargs: Any) -> str:
        return self.vlm.generate(messages, max_new_tokens=kwargs.pop("max_new_tokens", self.max_new_tokens), **kwargs)

    # ------------------------------------------------------------------ one call

    def prepare(self, image: ImageInput | None, question: str, *, user: str,
                history: list[dict[str, Any]] | None = None, concepts: "list[Any] | None" = None,
                text_only: bool = False, system: str | None = None):
        """Everything before generation: checked inputs, retrieval, prompt. Returns (prompt, candidates, timings).

        `concepts` (names, aliases or ids) skips retrieval and injects exactly those: the evaluation's
        `oracle` method (RAP's skip-retrieval upper bound). `text_only`: no image needed. `system`: the
        application's own instructions, added to the system turn."""
        t0 = time.perf_counter()
        img = self.check_inputs(image, question, user, text_only=text_only)
        timings: dict[str, float] = {}
        if concepts is None:
            candidates = self.retrieve(user, question, img)
            if self.verify and img is not None:
                tv = time.perf_counter()
                candidates, timings["verify_checks"] = self.verified(user, img, candidates)
                timings["verify_ms"] = (time.perf_counter() - tv) * 1000
        else:
            candidates = [RetrievedConcept(self.db.resolve(user, c), 1.0, "oracle") for c in concepts]
        as_text, learned = self.load_learned(user, candidates)
        t1 = time.perf_counter()
        memory, handles = self.recall(user, question, [r.concept for r in candidates])
        tm = time.perf_counter()
        prompt = self.prompts.build(question, img, as_text, history=history,
                                    reference_images=self.reference_images(user, as_text), learned=learned,
                                    grounding=self.grounding(img), system=system, memory=memory, handles=handles)
        t2 = time.perf_counter()
        return prompt, candidates, {"retrieval_ms": (t1 - t0) * 1000, "memory_ms": (tm - t1) * 1000,
                                    "prompt_ms": (t2 - tm) * 1000, **timings}

    def recall(self, user: str, question: str, concepts: list[Any]) -> tuple[list[Any], dict[str, str]]:
        """The user's memory entries for this turn (`pipelines.memory`: the turn's concepts' current entries, then
        those relevant to the question, within `max_memory_chars`), and the handles of the concepts they are
        about."""
        entries = self.memory.select(user, question, [c.id for c in concepts],
                                     max_chars=self.prompts.budget.max_memory_chars)
        handles = {c.id: c.handle for c in concepts}
        missing = [e.concept_id for e in entries if e.concept_id and e.concept_id not in handles]
        if missing:
            handles.update({cid: c.handle for cid, c in self.db.store.get_many(user, missing).items()})
        return entries, handles

    def remember(self, user: str, question: str, answer: "VLMAnswer | None" = None, *, source: str = "",
                 extractor: Any = None) -> list[Any]:
        """Memory proposals from what the user said (`question`), stored for the user to accept (or accepted, with
        their `memory.auto_accept` setting): run it after the answer was sent. `extractor`: `self.extractor` by
        default (`memory_extractor`)."""
        from .memory import propose

        concepts = [r.concept for r in answer.retrieved] if answer is not None else []
        return propose(self.db, user, question, concepts, extractor=extractor or self.memory_extractor(),
                       source=source)

    def propose_concepts(self, user: str, question: str, image: ImageInput | None, answer: "VLMAnswer | None" = None,
                         *, detect: bool = True) -> list[Any]:
        """New concepts the user introduced in `question` about `image` ("this is my friend Anna"), each with the
        region of the photo that shows it (`pipelines.introductions`): run it after the answer was sent, and
        confirm one with `add_proposed`. `detect=False`: no model runs (only the faces the answer's retrieval
        found)."""
        from .introductions import propose_concepts

        if image is None:
            return []
        img = load_image(image)
        retrieved = answer.retrieved if answer is not None else []
        return propose_concepts(self.db, self.retriever, user, question, img, retrieved, detect=detect)

    def add_proposed(self, user: str, proposal: Any, image: ImageInput) -> Any:
        """Confirm a concept proposal (`propose_concepts`; or its `to_dict()` edited): the concept, made from its
        region of `image`."""
        from .introductions import accept

        return accept(self.db, user, proposal, load_image(image))

    def memory_extractor(self, stop: "threading.Event | None" = None) -> Any:
        """What reads memory proposals from a message: the chat model itself (`VLMExtractor`: a structured prompt,
        its JSON validated; setting `stop` ends its generation at the next token), or for the tiny test models,
        whose random weights cannot, the documented `RuleExtractor`."""
        from .memory import RuleExtractor, VLMExtractor

        if self.vlm.spec.source == "tiny":
            return RuleExtractor()
        generate = self.generate if stop is None else functools.partial(self.generate, stop=stop)
        return VLMExtractor(generate, special_tokens=self.prompts.special_tokens)

    def grounding(self, image: "Image.Image | None") -> Grounding | None:
        """How the prompt says where region-retrieved concepts are in `image` (None: it does not)."""
        if image is None or not (self.boxes or self.marks):
            return None
        if self.marks:  # padded to a square, the photo is shrunk by its long side: marks sized by it stay visible
            frame = self.vlm.square_frame(image)
            return Grounding("marks", original=self.original, mark_side=max(image.size) if frame else None)
        convention = self.vlm.box_convention
        size = self.vlm.input_size(image) if convention == "absolute" else None
        # a centre-cropping processor's model sees the photo padded to a square, and boxes are written in it
        of = ("the width and height of the image as you see it (the photo padded to a square)"
              if self.vlm.square_frame(image) else "the photo's width and height")
        note = {"absolute": f"A box [x0, y0, x1, y1] is in pixels of the user's photo as you see it "
                            f"({size[0]}x{size[1]})." if size else "",
                "relative-1000": "A box [x0, y0, x1, y1] is on a 0-1000 scale of the photo's width and height.",
                }.get(convention, f"A box [x0, y0, x1, y1] is in fractions (0 to 1) of {of}.")
        return Grounding("boxes", box_text=lambda box: str(self.vlm.box_in_prompt(box, image, input_size=size)),
                         note=note)

    def verified(self, user: str, image: "Image.Image", candidates: list[RetrievedConcept]
                 ) -> tuple[list[RetrievedConcept], int]:
        """The candidates the VLM confirms: for each retrieved one (mentions are kept: the user named them), up
        to `max_checks`, the concept's reference image beside the photo or the region's crop, and the question
        whether it is the same one. Returns (confirmed, checks made)."""
        kept, checks = [], 0
        for r in candidates:
            if r.source == "mention":
                kept.append(r)
                continue
            if checks >= self.max_checks:
                continue
            ref = r.image or (r.concept.images[0] if r.concept.images else None)
            if ref is None:
                continue
            checks += 1
            crop = image.crop(r.box) if r.box is not None else image
            handle = defuse(r.concept.handle, self.prompts.special_tokens)
            what = f" (a {quote(defuse(r.concept.category, self.prompts.special_tokens))})" if r.concept.category \
                else ""
            ask = f"Is {handle}{what} in the second image? Answer yes or no."
            images = [load_image(self.db.store.image_bytes(user, ref)), crop]
            if self.vlm.interleaves_images:
                content = [{"type": "text", "text": f"Reference photo of {handle}:"},
                           {"type": "image", "image": images[0]},
                           {"type": "text", "text": "Second image:"}, {"type": "image", "image": images[1]},
                           {"type": "text", "text": ask}]
            else:  # images first: named by position
                content = [{"type": "image", "image": images[0]}, {"type": "image", "image": images[1]},
                           {"type": "text", "text": f"Image 1: reference photo of {handle}. Image 2: the second "
                                                    f"image. {ask}"}]
            answer = self.generate([{"role": "user", "content": content}], max_new_tokens=3)
            if answer.strip().lower().lstrip("\"'*( ").startswith("yes"):
                kept.append(r)
        return kept, checks

    def __call__(self, image: ImageInput | None, question: str, *, user: str,
                 history: list[dict[str, Any]] | None = None, system: str | None = None,
                 **generate_kwargs: Any) -> VLMAnswer:
        """Answer `question` about `image` for `user`. `generate_kwargs` go to generation; among them `stop`, a
        `threading.Event` that ends generation at the next token once set (raising `mmpersona.cancel.Cancelled`)."""
        start = time.perf_counter()
        prompt, candidates, timings = self.prepare(image, question, user=user, history=history, system=system)
        t = time.perf_counter()
        return self.answer(prompt, candidates, timings, self.generate(prompt.messages, **generate_kwargs),
                           started=t, start=start)

    def answer(self, prompt, candidates: list[RetrievedConcept], timings: dict[str, float], text: str, *,
               started: float, start: float) -> VLMAnswer:
        """The `VLMAnswer` of `prepare`'s (prompt, candidates, timings) and the generated `text`; `started` and
        `start`: `time.perf_counter()` when generation and the whole call began. For callers that generate
        elsewhere (the server sends a remote VLM's requests from its event loop)."""
        timings["generate_ms"] = (time.perf_counter() - started) * 1000
        timings["total_ms"] = (time.perf_counter() - start) * 1000
        return VLMAnswer(text.strip(), prompt.injected, not prompt.injected, printable_messages(prompt.messages),
                         timings, candidates, prompt.memory)

    def answer_as(self, method: str, image: ImageInput | None, question: str, *, user: str,
                  concepts: "list[Any] | None" = None, history: list[dict[str, Any]] | None = None,
                  **generate_kwargs: Any) -> VLMAnswer:
        """One answer by an evaluation method: `vanilla` (the VLM alone: the image and question, no concepts and
        no instructions), `oracle` (exactly `concepts` injected, no retrieval) or `retrieval` (a normal call)."""
        if method in ("retrieval", "oracle"):
            start = time.perf_counter()
            prompt, candidates, timings = self.prepare(
                image, question, user=user, history=history, text_only=image is None,
                concepts=list(concepts or []) if method == "oracle" else None)
            answer = self.generate(prompt.messages, **generate_kwargs)
            timings["total_ms"] = (time.perf_counter() - start) * 1000
            return VLMAnswer(answer, prompt.injected, not prompt.injected, printable_messages(prompt.messages),
                             timings, candidates, prompt.memory)
        if method == "vanilla":
            start = time.perf_counter()
            img = load_image(image) if image is not None else None
            content = ([{"type": "image", "image": img}] if img is not None else []) + [
                {"type": "text", "text": question}]
            messages = [*(history or []), {"role": "user", "content": content}]
            answer = self.generate(messages, **generate_kwargs)
            return VLMAnswer(answer, [], True, printable_messages(messages),
                             {"total_ms": (time.perf_counter() - start) * 1000}, [])
        raise MmpersonaError(f"unknown method {method!r}; valid: {', '.join(ANSWER_METHODS)}")

    def stream(self, image: ImageInput | None, question: str, *, user: str,
               history: list[dict[str, Any]] | None = None, system: str | None = None,
               **generate_kwargs: Any) -> "AnswerStream":
        """Like calling the pipeline, but the answer arrives as text pieces while it is generated."""
        start = time.perf_counter()
        prompt, candidates, timings = self.prepare(image, question, user=user, history=history, system=system)
        return AnswerStream(self, prompt, candidates, timings, start, generate_kwargs)

    def chat(self, user: str, image: ImageInput | None = None, *, keep: bool = False,
             conversation: str | None = None) -> "ChatSession":
        """A multi-turn conversation; retrieval runs on every turn. `keep`: kept in the concept database, to be
        continued later; `conversation`: continue that kept conversation (see `ChatSession`)."""
        return ChatSession(self, user, image, keep=keep, conversation=conversation)


class AnswerStream:
    """Iterate to receive the answer piece by piece; `.result` holds the `VLMAnswer` once iteration ends."""

    def __init__(self, pipe: PersonalizedVLMPipeline, prompt, candidates, timings, start, generate_kwargs):
        self.pipe, self.prompt, self.candidates = pipe, prompt, candidates
        self.timings, self.start, self.generate_kwargs = timings, start, generate_kwargs
        self.result: VLMAnswer | None = None

    def __iter__(self) -> Iterator[str]:
        import torch
        from transformers import TextIteratorStreamer

        from mmpersona.cancel import check, stopping_criteria
        from mmpersona.models.sampling import own_draws

        vlm = self.pipe.vlm
        kwargs = {"max_new_tokens": self.pipe.max_new_tokens, **self.generate_kwargs}
        stop = kwargs.pop("stop", None)
        seed = kwargs.pop("seed", None)
        check(stop)
        if vlm.remote is not None:  # the server streams: no local thread
            if seed is not None:
                kwargs["seed"] = seed
            from mmpersona.models.remote import openai_messages

            t = time.perf_counter()
            messages = openai_messages(vlm._prepared(self.prompt.messages))
            pieces = []
            for piece in vlm.remote.stream(messages, kwargs.pop("max_new_tokens"), stop=stop, **kwargs):
                pieces.append(piece)
                yield piece
            self._finish("".join(pieces), t)
            return
        inputs = vlm.inputs(self.prompt.messages)
        # ends at the next token once set (the check after the loop raises); also when the iteration is closed
        # early (the consumer left), so that no generation goes on in the background
        closed = threading.Event()
        kwargs["stopping_criteria"] = stopping_criteria(_Either(stop, closed), kwargs.get("stopping_criteria"))
        # learned concept tokens are not special tokens: the handles stay in the text
        streamer = TextIteratorStreamer(vlm.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
        errors: list[BaseException] = []

        def run() -> None:
            try:
                with torch.inference_mode(), own_draws(vlm.device, seed):
                    vlm.model.generate(**inputs, streamer=streamer, **kwargs)
            except BaseException as e:  # surfaced in the consumer's thread below
                errors.append(e)
                streamer.end()

        t = time.perf_counter()
        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        pieces = []
        try:
            for piece in streamer:
                pieces.append(piece)
                yield piece
        finally:
            if worker.is_alive():  # closed early: stop the generation and wait for its thread
                closed.set()
            worker.join()
        if errors:
            raise errors[0]
        check(stop)
        self._finish("".join(pieces), t)

    def _finish(self, text: str, started: float) -> None:
        self.result = self.pipe.answer(self.prompt, self.candidates, self.timings, text, started=started,
                                       start=self.start)


class _Either:
    """Set when either event is (`None` counts as never set): what the stopping criterion reads."""

    def __init__(self, *events: "threading.Event | None"):
        self.events = [e for e in events if e is not None]

    def is_set(self) -> bool:
        return any(e.is_set() for e in self.events)


#: earlier turns of a kept conversation given to the model when it is continued (the prompt budget may use fewer)
RESUMED_TURNS = 16
#: and at most this many characters of them (the server's default `max_history_chars`): a kept turn may hold
#: 64,000 characters, which no real checkpoint's context would take 16 times
RESUMED_CHARS = 32_000


def turn_messages(question: str, answer: str) -> list[dict[str, Any]]:
    """One earlier turn as chat history: text only (the current image is attached to the current turn only)."""
    return [{"role": "user", "content": [{"type": "text", "text": question}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]}]


def resumed_history(turns: "Sequence[Turn]", max_chars: int = RESUMED_CHARS) -> list[dict[str, Any]]:
    """Kept turns (oldest first) as chat history: the newest of them, as many as fit in `max_chars`."""
    out: list[dict[str, Any]] = []
    for t in reversed(turns):
        max_chars -= len(t.question) + len(t.answer)
        if max_chars < 0:
            break
        out[:0] = turn_messages(t.question, t.answer)
    return out


class ChatSession:
    """A conversation about one image (which a turn may replace); every turn retrieves again.

    With `keep=True` the conversation is kept in the concept database (`store.start_conversation` at its first
    turn, then each question, answer and photo: `add_turn`), and `conversation_id` names it; pass that id as
    `conversation` (`pipe.chat(user, conversation=id)`) to continue it later, with its last `RESUMED_TURNS` turns
    (within `RESUMED_CHARS`) as the history and its last photo as the image. A turn that would go past the user's quota is refused before
    the model runs; an answer stopped before its end is not kept."""

    def __init__(self, pipe: PersonalizedVLMPipeline, user: str, image: ImageInput | None = None, *,
                 keep: bool = False, conversation: str | None = None):
        self.pipe = pipe
        self.user = user
        self.keep = keep or conversation is not None
        self.conversation_id = conversation
        self.history: list[dict[str, Any]] = []
        self.answers: list[VLMAnswer] = []
        self._image: Image.Image | None = None
        self._photo: bytes | None = None  # the image's encoded bytes, kept with each turn
        self._kept: bytes | None = None  # the photo already kept with a turn (keeping it again costs no bytes)
        if conversation is not None:
            store = pipe.db.store
            turns = store.turns(user, conversation, last=RESUMED_TURNS)
            self.history = resumed_history(turns)
            if image is None and turns and turns[-1].image:
                self._image, self._photo = load_image_with_bytes(store.image_bytes(user, turns[-1].image))
                self._kept = self._photo
        if image is not None:
            self.image = image

    @property
    def image(self) -> "Image.Image | None":
        return self._image

    @image.setter
    def image(self, value: ImageInput | None) -> None:
        """The photo of this turn and the next ones (decoded and checked here: a bad one changes nothing)."""
        if value is None:
            self._image = self._photo = None
        elif self.keep:
            self._image, self._photo = load_image_with_bytes(value)
        else:
            self._image = load_image(value)

    def ask(self, question: str, image: ImageInput | None = None, **generate_kwargs: Any) -> VLMAnswer:
        """Ask the next question; `image` replaces the conversation's image from this turn on."""
        if image is not None:
            self.image = image
        self._check(question)
        answer = self.pipe(self.image, question, user=self.user, history=self.history, **generate_kwargs)
        self._remember(question, answer)
        return answer

    def stream(self, question: str, image: ImageInput | None = None, **generate_kwargs: Any) -> Iterator[str]:
        if image is not None:
            self.image = image
        self._check(question)
        stream = self.pipe.stream(self.image, question, user=self.user, history=self.history, **generate_kwargs)
        yield from stream
        self._remember(question, stream.result)

    def _check(self, question: str) -> None:
        """Refuse, before the model runs, a turn that cannot be kept (its text, or the user's quota)."""
        if not self.keep:
            return
        from concept_db.types import MAX_TURN_TEXT, check_text

        check_text(question, "question", MAX_TURN_TEXT)
        store = self.pipe.db.store
        store.check_quota(self.user, turns=1, conversations=int(self.conversation_id is None),
                          size=len(self._photo) if self._photo is not None and self._photo is not self._kept else 0)

    def _remember(self, question: str, answer: VLMAnswer) -> None:
        self.history += turn_messages(question, answer.answer)
        self.answers.append(answer)
        if self.keep:
            store = self.pipe.db.store
            if self.conversation_id is None:
                self.conversation_id = store.start_conversation(self.user).id
            store.add_turn(self.user, self.conversation_id, question, answer.answer, image=self._photo)
            self._kept = self._photo

