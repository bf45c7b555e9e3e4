"""The evaluation harness's own cost: everything but `generate`, per item, against `generate`, on the tiny VLM.

    python benchmarks/eval_overhead.py [--concepts 6] [--images 3] [--max-new-tokens 16] [--method retrieval]

Builds a Yo'LLaVA-layout fixture (train/ and test/ folders of drawn images), registers it, and runs
`mmpersona eval bench`'s code (`pipelines.peers.run.run`) with `generate` timed inside. Harness time is the run's
wall time minus the time spent in `generate`: reading, retrieval, prompt building, the answer cache, the
peer-format files, scoring and the report. Ends with one JSON line: `items`, `method`, `generate_s`,
`harness_s`, `per_item_ms`, `overhead_ratio` (harness / generate; target <= 0.05).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def fixture(root: Path, concepts: int, images: int) -> Path:
    import numpy as np
    from PIL import Image, ImageDraw

    data = root / "yollava-data"
    rng = np.random.default_rng(0)
    for c in range(concepts):
        color = tuple(int(x) for x in rng.integers(0, 255, 3))
        for split in ("train", "test"):
            for i in range(images):
                folder = data / split / f"c{c}"
                folder.mkdir(parents=True, exist_ok=True)
                img = Image.new("RGB", (96, 96), (235, 235, 235))
                ImageDraw.Draw(img).ellipse((10 + i, 10, 80, 86 - i), fill=color)
                img.save(folder / f"{i}.png")
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concepts", type=int, default=6)
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--method", default="retrieval")
    args = parser.parse_args()

    from mmpersona import ConceptDB
    from mmpersona.models import build_tiny
    from pipelines.peers import datasets
    from pipelines.peers.run import register, run
    from pipelines.vlm import PersonalizedVLMPipeline

    build_tiny()
    with tempfile.TemporaryDirectory() as tmp:
        bench = datasets.yollava(fixture(Path(tmp), args.concepts, args.images))
        with ConceptDB(Path(tmp) / "e.db", preset="tiny", device="cpu") as db:
            register(db, "bench", bench.concepts)
            pipe = PersonalizedVLMPipeline(db, preset="tiny", device="cpu", max_new_tokens=args.max_new_tokens)
            # the fixed costs before the run (models loaded, the index warm) are not the harness's
            pipe.answer_as(args.method, bench.items[0].image, bench.items[0].question, user="bench")
            spent = [0.0]
            generate = pipe.generate

            def timed(messages, **kwargs):
                t = time.perf_counter()
                try:
                    return generate(messages, min_new_tokens=args.max_new_tokens, **kwargs)
                finally:
                    spent[0] += time.perf_counter() - t

            pipe.generate = timed
            start = time.perf_counter()
            run(pipe, "bench", bench, [args.method], out=Path(tmp) / "out", progress=False)
            total = time.perf_counter() - start
    harness = total - spent[0]
    items = len(bench.items)
    print(f"{items} items, {args.method}: generate {spent[0]:.2f} s, everything else {harness:.2f} s "
          f"({harness / items * 1000:.1f} ms per item)", file=sys.stderr)
    print(json.dumps({"items": items, "method": args.method, "generate_s": round(spent[0], 3),
                      "harness_s": round(harness, 3), "per_item_ms": round(harness / items * 1000, 2),
                      "overhead_ratio": round(harness / spent[0], 4)}))


if __name__ == "__main__":
    main()
