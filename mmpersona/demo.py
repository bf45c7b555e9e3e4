"""The main job on any preset: every role of the registry loaded and run once, end to end.

On the tiny preset this runs offline in seconds and proves the installation works; on the default preset it
downloads (once) and runs the real models. Later issues grow it into the full concept -> answer -> image flow.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


@dataclass
class DemoReport:
    preset: str
    models: dict[str, str]
    retrieval: list[dict] = field(default_factory=list)
    answer: str = ""
    detections: list[dict] = field(default_factory=list)
    image_path: str | None = None
    timings_s: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def concept_images() -> dict[str, Any]:
    """Three drawn 'concepts' that need no files: a red ball, a blue box and a green tree."""
    from PIL import Image, ImageDraw

    def canvas():
        img = Image.new("RGB", (96, 96), (235, 235, 225))
        return img, ImageDraw.Draw(img)

    ball, d = canvas()
    d.ellipse((20, 20, 76, 76), fill=(210, 30, 30))
    box, d = canvas()
    d.rectangle((18, 28, 78, 80), fill=(30, 60, 200))
    tree, d = canvas()
    d.polygon([(48, 10), (15, 80), (81, 80)], fill=(30, 150, 50))
    return {"<red-ball>": ball, "<blue-box>": box, "<green-tree>": tree}


def run_demo(*, preset: str = "tiny", out_dir: str | Path = "mmpersona-demo", device: Any = "auto",
             dtype: Any = None, overrides: dict[str, str] | None = None, steps: int = 4) -> DemoReport:
    """Load each role's model and run it once; write the generated image into `out_dir`."""
    import numpy as np

    from .models import load_detector, load_embedder, load_t2i, load_vlm

    overrides = overrides or {}
    timings: dict[str, float] = {}
    concepts = concept_images()
    names = list(concepts)

    t = time.perf_counter()
    embedder = load_embedder(overrides.get("embedder"), preset=preset, device=device, dtype=dtype)
    refs = embedder.embed_images(list(concepts.values()))
    query = concepts["<red-ball>"].rotate(10, fillcolor=(235, 235, 225))
    scores = refs @ embedder.embed_images([query])[0]
    order = np.argsort(-scores)
    timings["embedder"] = time.perf_counter() - t

    t = time.perf_counter()
    detector = load_detector(overrides.get("detector"), preset=preset, device=device, dtype=dtype)
    detections = detector.detect(query, ["ball", "box", "tree"], threshold=0.05, top_k=3)
    timings["detector"] = time.perf_counter() - t

    t = time.perf_counter()
    vlm = load_vlm(overrides.get("vlm"), preset=preset, device=device, dtype=dtype)
    best = names[int(order[0])]
    messages = [
        {"role": "system", "content": [{"type": "text", "text": f"The user's concept {best} is a red ball."}]},
        {"role": "user", "content": [{"type": "image", "image": query},
                                     {"type": "text", "text": f"What is {best} doing in this photo?"}]},
    ]
    answer = vlm.generate(messages, max_new_tokens=16)
    timings["vlm"] = time.perf_counter() - t

    t = time.perf_counter()
    import torch

    t2i = load_t2i(overrides.get("t2i"), role="t2i", preset=preset, device=device, dtype=dtype)
    generator = torch.Generator("cpu").manual_seed(0)
    kwargs = {"ip_adapter_image": concepts["<red-ball>"]} if t2i.ip_adapter else {}
    image = t2i.pipeline("a red ball on a lawn", num_inference_steps=steps, generator=generator, **kwargs).images[0]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    image_path = out / "red-ball.png"
    image.save(image_path)
    timings["t2i"] = time.perf_counter() - t

    return DemoReport(
        preset=preset,
        models={"embedder": embedder.name, "detector": detector.spec.id, "vlm": vlm.spec.id, "t2i": t2i.spec.id},
        retrieval=[{"concept": names[int(i)], "score": round(float(scores[i]), 4)} for i in order],
        answer=answer,
        detections=[{"label": d.label, "score": round(d.score, 4), "box": list(d.box)} for d in detections],
        image_path=str(image_path),
        timings_s={k: round(v, 3) for k, v in timings.items()},
    )
