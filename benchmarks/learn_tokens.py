"""Cost of learning one concept's tokens (Yo'LLaVA style) on the tiny VLM, on this machine.

    python benchmarks/learn_tokens.py [--vlm tiny:qwen2.5-vl] [--images 5] [--steps 100] [--tokens 16]

One concept with `--images` reference images, two other concepts as negatives, a fixed number of steps (early
stopping off, so runs compare). Final JSON line: steps_per_s, peak_rss_mb, seconds_per_concept (the whole
`learn_concept` call: example encoding, training, accuracy checks, saving), plus the losses at both ends.
Target: seconds_per_concept under 60 on the tiny model on CPU.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vlm", default="tiny:qwen2.5-vl")
    parser.add_argument("--images", type=int, default=5)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--tokens", type=int, default=16)
    args = parser.parse_args()

    from PIL import Image, ImageDraw

    from mmpersona import ConceptDB
    from mmpersona.models import load_vlm
    from pipelines.tokens import LearnConfig, learn_concept

    def photo(color, shift):
        img = Image.new("RGB", (96, 96), (235, 235, 225))
        ImageDraw.Draw(img).ellipse((15 + shift, 15, 75 + shift, 75), fill=color)
        return img

    tmp = Path(tempfile.mkdtemp(prefix="mmpersona-learn-bench-"))
    db = ConceptDB(tmp / "c.db", preset="tiny", device="cpu")
    db.add("alice", "bo", [photo((200, 30 + 5 * i, 30), i) for i in range(args.images)], info="a shiba inu")
    db.add("alice", "mug", [photo((30, 60, 200), 0)])
    db.add("alice", "leaf", [photo((30, 160, 40), 0)])
    vlm = load_vlm(args.vlm, preset="tiny", device="cpu")
    # patience above the step budget: every run trains exactly --steps steps
    config = LearnConfig(tokens=args.tokens, steps=args.steps, eval_every=max(args.steps // 4, 1),
                         patience=args.steps + 1)
    start = time.perf_counter()
    result = learn_concept(vlm, db, "alice", "bo", config=config, progress=False)
    seconds = time.perf_counter() - start
    out = {
        "vlm": args.vlm, "images": args.images, "tokens": args.tokens, "steps": result.steps,
        "steps_per_s": round(result.steps / result.seconds, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "seconds_per_concept": round(seconds, 2),
        "first_loss": round(result.losses[0], 4), "last_loss": round(result.losses[-1], 4),
        "train_accuracy": result.accuracy,
    }
    print(f"{result.steps} steps in {seconds:.1f} s", file=sys.stderr)
    print(json.dumps(out))
    db.close()


if __name__ == "__main__":
    main()
