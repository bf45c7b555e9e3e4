"""What personalization adds to a VLM answer: retrieval + prompt building against the bare generate call.

    python benchmarks/vlm_overhead.py [--concepts 10000] [--runs 20] [--max-new-tokens 64] [--vlm tiny:qwen2.5-vl]

On the tiny preset (CPU): a concept database of `--concepts` concepts for one user (one registered from a
real image, the rest with synthetic vectors of the embedder's dimension), a question about an image. Per run:
retrieval (embed the image, search, mentions) and prompt building are timed inside the pipeline; the bare
`model.generate` call is timed on the same, already tokenized inputs. Medians over `--runs`.
Final JSON line: retrieval_ms, prompt_ms, generate_ms, overhead_ratio ((retrieval + prompt) / generate),
tokens_per_concept (prompt tokens each injected concept adds). Target: overhead_ratio <= 0.05.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concepts", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--max-new-tokens", type=int, default=64, help="a one-to-two sentence answer")
    parser.add_argument("--vlm", default="tiny:qwen2.5-vl")
    parser.add_argument("--preset", default="tiny")
    args = parser.parse_args()

    import numpy as np
    import torch
    from PIL import Image, ImageDraw

    from concept_db.types import NewConcept
    from mmpersona import ConceptDB
    from pipelines import PersonalizedVLMPipeline

    tmp = Path(tempfile.mkdtemp(prefix="mmpersona-vlm-bench-"))
    db = ConceptDB(tmp / "c.db", preset=args.preset, device="cpu")
    photo = Image.new("RGB", (96, 96), (235, 235, 225))
    ImageDraw.Draw(photo).ellipse((20, 20, 76, 76), fill=(200, 30, 30))
    db.add("alice", "<bo>", [photo], category="dog", info="Alice's Shiba Inu, three years old, loves the park.")
    rng = np.random.default_rng(0)
    dim, name = db.embedder.dim, db.embedder.name
    with db.store.transaction():
        for start in range(0, args.concepts - 1, 5000):
            n = min(5000, args.concepts - 1 - start)
            vectors = rng.standard_normal((n, dim)).astype(np.float32)
            db.store.add_many("alice", [
                NewConcept(name=f"c{start + i}", category=("dog", "cup", "plant", "person")[i % 4],
                           info=f"Synthetic concept number {start + i}.", images=[f"img-{start + i}".encode()],
                           embeddings={name: vectors[i : i + 1]}) for i in range(n)])

    pipe = PersonalizedVLMPipeline(db, vlm=args.vlm, preset=args.preset, device="cpu", k=3,
                                   max_new_tokens=args.max_new_tokens)
    question = "What is <bo> doing in this photo?"
    pipe(photo, question, user="alice")  # warm-up: loads the owner's vectors, first-call allocations

    retrieval, prompt, generate = [], [], []
    for _ in range(args.runs):
        rendered, _candidates, timings = pipe.prepare(photo, question, user="alice")
        retrieval.append(timings["retrieval_ms"])
        prompt.append(timings["prompt_ms"])
        inputs = pipe.vlm.inputs(rendered.messages)
        t = time.perf_counter()
        with torch.inference_mode():
            pipe.vlm.model.generate(**inputs, max_new_tokens=args.max_new_tokens,
                                    min_new_tokens=args.max_new_tokens, do_sample=False)
        generate.append((time.perf_counter() - t) * 1000)

    with_concepts = pipe.vlm.inputs(rendered.messages)["input_ids"].shape[1]
    bare = pipe.prompts.build(question, photo, [])
    without = pipe.vlm.inputs(bare.messages)["input_ids"].shape[1]
    injected = max(len(rendered.injected), 1)

    r, p, g = statistics.median(retrieval), statistics.median(prompt), statistics.median(generate)
    result = {
        "concepts": args.concepts, "vlm": args.vlm, "max_new_tokens": args.max_new_tokens, "runs": args.runs,
        "retrieval_ms": round(r, 3), "prompt_ms": round(p, 3), "generate_ms": round(g, 3),
        "overhead_ratio": round((r + p) / g, 4),
        "tokens_per_concept": round((with_concepts - without) / injected, 1),
    }
    print(f"{args.concepts} concepts: retrieval {r:.2f} ms + prompt {p:.2f} ms vs generate {g:.1f} ms",
          file=sys.stderr)
    print(json.dumps(result))
    db.close()


if __name__ == "__main__":
    main()
