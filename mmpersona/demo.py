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


def run_demo(*, preset: str = "tiny", out_dir: str | Path = "mmpersona-demo", device: Any = "auto",
             dtype: Any = None, overrides: dict[str, str] | None = None, steps: int = 4) -> DemoReport:
    """Register three concepts in `out_dir/concepts.db`, ask about a photo of one, generate an image of it."""
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

    return DemoReport(
        preset=preset,
        models={"embedder": db.embedder.name, "vlm": pipe.vlm.spec.id,
                "detector": pipe.retriever.detector.spec.id, "t2i": t2i.spec.id},
        question=question, answer=answer.answer, abstained=answer.abstained,
        retrieved=[{"concept": r.concept.handle, "score": round(r.score, 4), "source": r.source,
                    "box": list(r.box) if r.box else None} for r in answer.retrieved],
        image_path=str(image_path), database=str(db_path),
        timings_s={k: round(v, 3) for k, v in timings.items()},
    )
