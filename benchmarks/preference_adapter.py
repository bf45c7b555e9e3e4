"""Proof on a planted signal: the preference adapter personalizes held-out users from four choices, no training
of their own; the per-user DPO LoRA moves generation toward a user's chosen images.

    python benchmarks/preference_adapter.py [--train-users 200] [--heldout-users 24] [--steps 1000]

Offline, on the trained tiny pipeline (`tiny:sd-trained`, which has learned a synthetic domain of shapes of
every hue, brightness and kind) and the tiny CLIP embedder. Each synthetic user has a hidden preferred hue
(`synthetic.PlantedUser`); their pairs are two domain images, the one nearer their hue chosen.

- The adapter is trained (multi-user Diffusion-DPO, `train_adapter`) on the training users (16 pairs each).
- Held-out users record 4 pairs in their profile. `heldout_pair_accuracy`: the DPO implicit preference accuracy on
  8 other pairs of theirs. `win_rate_vs_vanilla`: how often an image generated through
  `PersonalizedT2IPipeline(strategies=["preference"])` is nearer the user's hue than the vanilla image of the same
  seed, measured in pixel space (`synthetic.measure`); ties count half.
- `lora_win_rate_vs_vanilla`: the same for per-user Diffusion-DPO LoRAs (`train_dpo_lora`), 8 users with 8 pairs
  each and 8 seeds, averaged over the training seeds `--lora-seeds` (0, 1, 2: each user's LoRA trained once per
  seed); `lora_win_rate_min` the worst seed's, `lora_win_rate_by_seed` each.
- `ratio_vs_vanilla`: generation time with the adapter over without (median of interleaved runs), before the
  LoRA stage; `ratio_vs_vanilla_loras_loaded` the same after it, with 8 users' LoRAs loaded (and disabled) in the
  pipeline, which costs both paths.
- `vanilla_hue_coverage`: the share of 12 hue sectors 32 vanilla samples reach. A build that does not cover the
  domain cannot be moved toward most users (one whose VAE had not learned colour gave every LoRA about 0.5); the
  build now checks its VAE and its coverage itself, and trains on until they pass.

Targets (issue "Preference embeddings through a trained adapter"): heldout_pair_accuracy >= 0.7,
win_rate_vs_vanilla >= 0.75, lora_win_rate_vs_vanilla >= 0.75, ratio_vs_vanilla <= 1.05. Final JSON line:
heldout_pair_accuracy, win_rate_vs_vanilla, lora_win_rate_vs_vanilla, train_seconds, ratio_vs_vanilla.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from t2i_overhead import paired  # noqa: E402  (the benchmarks' shared timing)


def win_rate(pipe, users, seeds, strategies, steps) -> float:
    """Share of (user, seed) where the personalized image is nearer the user's hue than vanilla's (ties: half)."""
    from mmpersona.models import synthetic

    wins = 0.0
    for user in users:
        for seed in range(seeds):
            vanilla = pipe(synthetic.GENERIC_PROMPT, user=user.name, steps=steps, seed=seed, strategies=[])
            mine = pipe(synthetic.GENERIC_PROMPT, user=user.name, steps=steps, seed=seed, strategies=strategies)
            a, b = user.score(mine.images[0]), user.score(vanilla.images[0])
            wins += 1.0 if a > b else 0.5 if a == b else 0.0
    return wins / (len(users) * seeds)


def hue_coverage(pipe, steps, n: int = 32) -> float:
    """The share of 12 hue sectors that `n` vanilla samples of the generic prompt reach (`synthetic.hue_coverage`;
    the build of `tiny:sd-trained` checks its own with 64 samples and keeps none under 0.75)."""
    from mmpersona.models import synthetic

    images = pipe(synthetic.GENERIC_PROMPT, user="coverage", n=n, steps=steps, seed=0, strategies=[]).images
    return synthetic.hue_coverage(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-users", type=int, default=200)
    parser.add_argument("--heldout-users", type=int, default=24)
    parser.add_argument("--steps", type=int, default=1000, help="adapter training steps")
    parser.add_argument("--seeds", type=int, default=4, help="seeds per held-out user")
    parser.add_argument("--lora-users", type=int, default=8)
    parser.add_argument("--lora-seeds", default="0,1,2", help="training seeds each LoRA user is trained with")
    parser.add_argument("--lora-steps", type=int, default=200)
    parser.add_argument("--gen-steps", type=int, default=20, help="denoising steps per image")
    parser.add_argument("--runs", type=int, default=7, help="timing runs")
    args = parser.parse_args()

    from mmpersona import ConceptDB
    from mmpersona.images import png_bytes
    from mmpersona.models import load_t2i, synthetic
    from mmpersona.preferences import PreferenceProfile
    from pipelines import PersonalizedT2IPipeline
    from pipelines.adapter_training import AdapterTrainConfig, PairRow, train_adapter
    from pipelines.dpo import DPOConfig, train_dpo_lora

    rng = random.Random(0)
    t2i = load_t2i("tiny:sd-trained", device="cpu", ip_adapter=False)
    with tempfile.TemporaryDirectory() as tmp:
        db = ConceptDB(Path(tmp) / "bench.db", preset="tiny")
        train = synthetic.planted_users("train-", args.train_users, rng)
        heldout = synthetic.planted_users("heldout-", args.heldout_users, rng)
        rows = []
        for user, n in [(u, 16) for u in train] + [(u, 12) for u in heldout]:
            rows += [PairRow(user.name, synthetic.GENERIC_PROMPT, png_bytes(a), png_bytes(b)) for a, b in user.pairs(rng, n)]
        config = AdapterTrainConfig(steps=args.steps)
        result = train_adapter(t2i, db.embedder, rows, Path(tmp) / "adapter", config,
                               heldout=[u.name for u in heldout], progress=False)
        print(json.dumps({"stage": "train", **result.to_dict()}), flush=True)

        for user in heldout:  # each held-out user's profile: their first 4 pairs only
            profile = PreferenceProfile(db, user.name)
            for row in [r for r in rows if r.user == user.name][:config.context]:
                profile.compare(row.prompt, row.chosen, row.rejected)
        pipe = PersonalizedT2IPipeline(db, t2i=t2i, strategies=[], adapter=str(Path(tmp) / "adapter"))
        wins = win_rate(pipe, heldout, args.seeds, ["preference"], args.gen_steps)
        print(json.dumps({"stage": "adapter", "win_rate_vs_vanilla": round(wins, 4)}), flush=True)

        who = heldout[0].name

        def vanilla():
            pipe(synthetic.GENERIC_PROMPT, user=who, n=4, steps=args.gen_steps, strategies=[])

        def adapted():
            pipe(synthetic.GENERIC_PROMPT, user=who, n=4, steps=args.gen_steps, strategies=["preference"])

        # timed before the LoRA stage loads 8 users' LoRAs into this pipeline (disabled, they still cost every
        # forward pass of both paths), and again after it
        ratio, vanilla_ms = paired(vanilla, adapted, args.runs)

        lora_users = synthetic.planted_users("lora-", args.lora_users, rng)
        for user in lora_users:
            profile = PreferenceProfile(db, user.name)
            for a, b in user.pairs(rng, 8):
                profile.compare(synthetic.GENERIC_PROMPT, a, b)
        lora_seconds, by_seed = [], {}
        for seed in [int(x) for x in args.lora_seeds.split(",")]:  # each user's LoRA trained again per seed
            for user in lora_users:
                start = time.perf_counter()
                train_dpo_lora(t2i, db, user.name, DPOConfig(steps=args.lora_steps, seed=seed), progress=False)
                lora_seconds.append(time.perf_counter() - start)
            by_seed[seed] = round(win_rate(pipe, lora_users, 8, ["lora"], args.gen_steps), 4)
            print(json.dumps({"stage": "lora", "seed": seed, "lora_win_rate_vs_vanilla": by_seed[seed]}), flush=True)
        lora_wins = sum(by_seed.values()) / len(by_seed)
        print(json.dumps({"stage": "lora", "lora_win_rate_vs_vanilla": round(lora_wins, 4), "by_seed": by_seed,
                          "seconds_per_user": round(sum(lora_seconds) / len(lora_seconds), 2)}), flush=True)

        ratio_loras, _ = paired(vanilla, adapted, args.runs)
        coverage = hue_coverage(pipe, args.gen_steps)
        db.close()
    print(json.dumps({"heldout_pair_accuracy": result.heldout_pair_accuracy, "win_rate_vs_vanilla": round(wins, 4),
                      "lora_win_rate_vs_vanilla": round(lora_wins, 4), "lora_win_rate_min": min(by_seed.values()),
                      "lora_win_rate_by_seed": by_seed, "vanilla_hue_coverage": round(coverage, 4), "train_seconds": round(result.seconds, 2),
                      "ratio_vs_vanilla": round(ratio, 4), "ratio_vs_vanilla_loras_loaded": round(ratio_loras, 4), "vanilla_ms": round(vanilla_ms, 1), "train_users": len(train), "heldout_users": len(heldout),
                      "pairs_per_heldout_user": config.context, "adapter_steps": config.steps,
                      "lora_pairs": 8, "lora_steps": args.lora_steps,
                      "targets": {"heldout_pair_accuracy": 0.7, "win_rate_vs_vanilla": 0.75,
                                  "lora_win_rate_vs_vanilla": 0.75, "ratio_vs_vanilla": 1.05}}))


if __name__ == "__main__":
    main()
