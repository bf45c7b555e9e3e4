"""What personalization costs a text-to-image generation, on the tiny SD pipeline (CPU).

    python benchmarks/t2i_overhead.py [--steps 20] [--runs 9] [--prompts 24]

Vanilla is the plain diffusers pipeline (no IP-Adapter loaded) with the same steps, seed and size; each strategy
runs through PersonalizedT2IPipeline for a user with likes, dislikes, comments, pairs and a trained reward model.
Each strategy is timed interleaved with vanilla, and the median of the per-run ratios is reported. reward_ms_per_image: CLIP embedding + reward head for one generated image.
batch_scaling_2proc: images per second of `mmpersona generate` under `accelerate launch` with 2 processes over
1 process (generation time only, start-up excluded), on `--prompts` prompts.
Final JSON line: ratio per strategy (ratio_attributes, ratio_ip_adapter, ratio_subject, ratio_rerank),
vanilla_ms, reward_ms_per_image, reward_fraction (of one vanilla generation), batch_scaling_2proc.
Targets: attributes and ip_adapter <= 1.05x vanilla; reward <= 2% of a generation; scaling >= 1.7.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def timed(fn, runs):
    fn()  # warm-up
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return statistics.median(out)


def paired(baseline, fn, runs):
    """Median ratio fn / baseline over interleaved runs: machine noise hits both sides alike."""
    baseline(), fn()  # warm-up
    ratios, base_ms = [], []
    for _ in range(runs):
        t = time.perf_counter()
        baseline()
        b = time.perf_counter() - t
        t = time.perf_counter()
        fn()
        ratios.append((time.perf_counter() - t) / b)
        base_ms.append(b * 1000)
    return statistics.median(ratios), statistics.median(base_ms)


def scaling(tmp: Path, db: Path, prompts: int, steps: int) -> float:
    (tmp / "p.txt").write_text("\n".join(f"a photo number {i}" for i in range(prompts)) + "\n")
    base = ["--preset", "tiny", "--device", "cpu", "--db", str(db), "--user", "alice", "--json", "generate",
            "--prompts", str(tmp / "p.txt"), "--steps", str(steps), "--strategies", "attributes"]
    env = dict(os.environ)

    def throughput(launcher, out):
        proc = subprocess.run(launcher + base + ["--out", str(tmp / out)], capture_output=True, text=True, env=env,
                              timeout=1200)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-2000:])
        reports = [json.loads(c) for c in proc.stdout.replace("}\n{", "}\x00{").split("\x00")]
        return sum(r["generated"] for r in reports) / max(r["seconds"] for r in reports)

    single = throughput([sys.executable, "-m", "mmpersona"], "one")
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    double = throughput([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                         "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "mmpersona"], "two")
    return double / single


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--prompts", type=int, default=24)
    args = parser.parse_args()

    import torch
    from PIL import Image, ImageDraw

    from mmpersona import ConceptDB, PreferenceProfile
    from mmpersona.models import load_t2i
    from pipelines import PersonalizedT2IPipeline

    tmp = Path(tempfile.mkdtemp(prefix="mmpersona-t2i-bench-"))
    db = ConceptDB(tmp / "c.db", preset="tiny", device="cpu")

    def photo(color, kind="ellipse"):
        img = Image.new("RGB", (64, 64), (240, 240, 240))
        getattr(ImageDraw.Draw(img), kind)((8, 8, 56, 56), fill=color)
        return img

    db.add("alice", "<bo>", [photo((200, 30, 30))], category="dog")
    profile = PreferenceProfile(db, "alice")
    for i in range(6):
        profile.like(photo((230, 60 + 20 * i, 20)), comment="warm light")
        profile.dislike(photo((20, 60 + 20 * i, 230), "rectangle"), comment="cold blue")
        profile.compare("a ball", photo((230, 70 + 10 * i, 20)), photo((20, 70 + 10 * i, 230), "rectangle"))
    profile.set_attributes(liked=["warm light", "film grain", "soft focus"], disliked=["blue cast", "noise"])
    profile.train_reward()

    vanilla = load_t2i(role="t2i", preset="tiny", device="cpu", ip_adapter=False).pipeline
    vanilla.set_progress_bar_config(disable=True)
    pipe = PersonalizedT2IPipeline(db, preset="tiny", device="cpu")
    prompt = "a photo of a ball on a lawn"

    def run_vanilla():
        vanilla(prompt, num_inference_steps=args.steps, generator=[torch.Generator().manual_seed(0)])

    result = {"steps": args.steps, "runs": args.runs}
    vanilla_all = []
    for name, text in (("attributes", prompt), ("ip_adapter", prompt), ("subject", "a photo of <bo> on a lawn"),
                       ("rerank", prompt)):
        ratio, base = paired(run_vanilla, lambda name=name, text=text: pipe(text, user="alice", steps=args.steps,
                                                                          strategies=[name]), args.runs)
        result[f"ratio_{name}"] = round(ratio, 3)
        vanilla_all.append(base)
    vanilla_ms = statistics.median(vanilla_all)
    result["vanilla_ms"] = round(vanilla_ms, 2)
    image = pipe(prompt, user="alice", steps=args.steps, strategies=[]).images[0]
    reward = profile.reward()
    emb = db.embedder
    reward_ms = timed(lambda: reward.score(emb.embed_images([image]), emb.embed_texts([prompt])[0]), args.runs * 4)
    result["reward_ms_per_image"] = round(reward_ms, 3)
    result["reward_fraction"] = round(reward_ms / vanilla_ms, 4)
    db.close()
    result["batch_scaling_2proc"] = round(scaling(tmp, tmp / "c.db", args.prompts, args.steps), 3)
    print(f"vanilla {vanilla_ms:.1f} ms per image at {args.steps} steps", file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
