"""What each multi-concept option costs: a 4-concept photo answered with every option, against plain retrieval.

    python benchmarks/multi_concept.py [--runs 10] [--max-new-tokens 16] [--vlm tiny:qwen2.5-vl]

On the tiny preset (CPU), through the real tiny detector (OWLv2) and VLM: four concepts of four categories, a
photo holding all four. Each option (`PersonalizedVLMPipeline.variant`) answers the same question; the median
wall time of a whole answer (retrieval, prompt, generation of exactly --max-new-tokens) over --runs, and the
median of its ratios to plain retrieval (whole image only) in runs interleaved with it, is printed as one JSON
line per option. Then the detector alone:
one pass with all N categories as queries against one pass per category (`detector_ratio`, target
<= 1/N + 0.2). Final JSON line: options (each with option, ms, ratio_vs_retrieval), detector_ratio,
categories, target.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from t2i_overhead import paired, timed  # noqa: E402  (the benchmarks' shared timing)

OPTIONS = {
    "retrieval": {},
    "regions": {"regions": True},
    "regions+assign": {"regions": True, "assign": True},
    "regions+assign+boxes": {"regions": True, "assign": True, "boxes": True},
    "regions+assign+marks": {"regions": True, "assign": True, "marks": True},
    "regions+assign+marks+original": {"regions": True, "assign": True, "marks": True, "original": True},
    "regions+assign+instance": {"regions": True, "assign": True, "instance": True},
    "regions+assign+verify": {"regions": True, "assign": True, "verify": True, "max_checks": 4},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--vlm", default="tiny:qwen2.5-vl")
    parser.add_argument("--preset", default="tiny")
    args = parser.parse_args()

    from PIL import Image, ImageDraw

    from mmpersona import ConceptDB
    from pipelines import PersonalizedVLMPipeline

    concepts = {"bo": ("dog", (205, 35, 30)), "mam": ("mug", (35, 60, 195)), "kiki": ("plant", (40, 170, 60)),
                "dug": ("person", (230, 200, 40))}
    photo = Image.new("RGB", (448, 448), (245, 245, 240))
    draw = ImageDraw.Draw(photo)
    boxes = [(10, 10, 214, 214), (234, 10, 438, 214), (10, 234, 214, 438), (234, 234, 438, 438)]
    for (_, (_, colour)), box in zip(concepts.items(), boxes, strict=True):
        draw.ellipse(box, fill=colour)
    tmp = Path(tempfile.mkdtemp(prefix="mmpersona-multi-bench-"))
    db = ConceptDB(tmp / "c.db", preset=args.preset, device="cpu")
    for (name, (category, _)), box in zip(concepts.items(), boxes, strict=True):
        db.add("alice", name, [photo.crop(box)], category=category, info=f"Alice's {category}, called {name}.")
    base = PersonalizedVLMPipeline(db, vlm=args.vlm, preset=args.preset, device="cpu", regions=True, k=3,
                                   min_score=-1.0, max_new_tokens=args.max_new_tokens)
    base.retriever.detector_threshold = 0.0  # random tiny weights: let every box through, as a real scene would
    question = "Who is in this photo, and where?"
    gen = {"min_new_tokens": args.max_new_tokens, "do_sample": False}

    rows = []
    calls = {label: (lambda p=base.variant(**{"regions": False, **options}): p(photo, question, user="alice", **gen))
             for label, options in OPTIONS.items()}
    plain = calls["retrieval"]
    for label, call in calls.items():
        ratio, _ = paired(plain, call, args.runs)  # interleaved with plain retrieval: noise hits both alike
        row = {"option": label, "ms": round(timed(call, args.runs), 1), "ratio_vs_retrieval": round(ratio, 3)}
        rows.append(row)
        print(json.dumps(row))

    detector = base.retriever.detector
    labels = db.store.categories("alice")
    one_pass = timed(lambda: detector.detect(photo, labels, threshold=0.0), args.runs)
    per_category = timed(lambda: [detector.detect(photo, [x], threshold=0.0) for x in labels], args.runs)
    ratio = one_pass / per_category
    n = len(labels)
    print(f"detector: {n} categories in one pass {one_pass:.1f} ms, one pass per category {per_category:.1f} ms "
          f"(ratio {ratio:.3f}, target <= {1 / n + 0.2:.3f})")
    print(json.dumps({"options": rows, "detector_ratio": round(ratio, 3), "categories": n,
                      "target": round(1 / n + 0.2, 3), "vlm": args.vlm, "runs": args.runs}))


if __name__ == "__main__":
    main()
