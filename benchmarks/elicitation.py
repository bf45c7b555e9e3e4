"""Taste in fewer clicks, on a planted signal: how many choices a new user needs before reranking wins 75% against
vanilla, pairs asked actively or at random; and how diverse reranked and LoRA images stay against vanilla's.

    python benchmarks/elicitation.py [--users 24] [--max-pairs 24]

Offline, on the trained tiny pipeline (`tiny:sd-trained`) and the tiny CLIP embedder, with held-out synthetic
users whose hidden preference is a hue (`synthetic.PlantedUser`, as `benchmarks/preference_adapter.py`).

- Orders (`pipelines.taste`): "active" shows the most informative pair of a shared pool of vanilla images
  (`--pool` 48, as the Taste pool's 8 prompts x 6 seeds; here all of `synthetic.GENERIC_PROMPT`, the one prompt
  of this world, in 8 groups of 6 that pairs stay within, as they stay within a prompt: 120 pairs); "random" is the fixed
  order, two fresh vanilla images each click. Each simulated user answers by their hidden preference (a pair
  whose two images score the same is skipped, and counts as a click).
- After each choice the user's reward model is trained (`train_reward`, as `PreferenceProfile.train_reward`) and
  generation with `rerank` is judged against vanilla on `--blocks` seeds: the image the reward model picks of the
  4 candidates (seeds s..s+3) against the vanilla image of seed s, nearer the user's hue in pixel space wins, ties
  count half (the best possible is 0.875). The candidates are generated once and the pick is the pipeline's own
  (`--check` runs the pipeline for one user and asserts the same pick).
- `pairs_to_075_active` / `pairs_to_075_random`: the median over users of the number of choices from which on
  the win rate stays at least 0.75 (at every later checkpoint up to `--max-pairs`; `--max-pairs` + 1 when it
  does not end there). Target: active <= random / 2. The first crossing (`pairs_first_075_*`) is printed too:
  near the ceiling one lucky checkpoint crosses, so it says little.
- `diversity_ratio_rerank`: mean pairwise CLIP distance of the 4 images one `rerank` call returns (16
  candidates) over that of vanilla's 4 images (the same prompt and seeds), averaged over calls and users, with
  the rerank's diversity floor; `rerank_win_rate` the share of (personal, vanilla) image pairs the personal image
  wins. `diversity_ratio_rerank_unfloored` is the same with the floor off (a plain sort by score).
- `diversity_ratio_lora`: the same ratio for per-user DPO LoRAs (8 seeds), with `lora_win_rate`.

Targets (issue "Taste in fewer clicks"): pairs_to_075_active <= pairs_to_075_random / 2; diversity_ratio_rerank
and diversity_ratio_lora >= 0.8 with rerank_win_rate and lora_win_rate >= 0.75. Final JSON line.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CANDIDATES = 4  # rerank's default
POOL_SEEDS = 6  # pipelines.taste.POOL_SEEDS: the pool's groups of images a pair may come from


def generate(pipe, seeds: list[int], steps: int) -> list:
    """Vanilla images of the generic prompt, one per seed (the pipeline's own seeds: `seed`, `seed + 1`, ...)."""
    from mmpersona.models import synthetic

    images = []
    for first in range(0, len(seeds), 32):
        part = seeds[first:first + 32]
        assert part == list(range(part[0], part[0] + len(part)))
        images += pipe(synthetic.GENERIC_PROMPT, user="bench", n=len(part), steps=steps, seed=part[0],
                       strategies=[]).images
    return images


def win(a: float, b: float) -> float:
    return 1.0 if a > b else 0.5 if a == b else 0.0


def elicit(user, order: str, pool, pool_vecs, fresh, fresh_vecs, prompt_vec, blocks, block_vecs, max_pairs: int,
           seed: int):
    """Win rates after 1..max_pairs clicks for one simulated user asked in `order`, as `pipelines.taste` asks:
    "active" shows the most informative pair of the shared pool; "random" (the fixed order) two fresh images."""
    import numpy as np

    from mmpersona.elicitation import next_pair
    from mmpersona.reward import train_reward

    if order == "random":
        pool, pool_vecs = fresh, fresh_vecs
    keys = [str(i) for i in range(len(pool))]
    groups = [i // POOL_SEEDS for i in range(len(pool))]  # pairs within a group, as within a prompt of the pool
    truth = [user.score(im) for im in pool]
    dim = pool_vecs.shape[1]
    chosen, rejected, asked, curve = [], [], set(), []
    vanilla = [user.score(b[0]) for b in blocks]
    block_truth = [[user.score(im) for im in b] for b in blocks]
    model = None
    for click in range(max_pairs):
        if order == "active":
            pick = next_pair(pool_vecs, groups, keys, chosen=np.array(chosen).reshape(-1, dim),
                             rejected=np.array(rejected).reshape(-1, dim), asked=asked, seed=seed * 1000 + click)
            a, b = pick.a, pick.b
        else:
            a, b = 2 * click, 2 * click + 1
        asked.add(frozenset((keys[a], keys[b])))
        if truth[a] != truth[b]:
            a, b = (a, b) if truth[a] > truth[b] else (b, a)
            chosen.append(pool_vecs[a])
            rejected.append(pool_vecs[b])
            model = train_reward("bench", chosen=np.array(chosen), rejected=np.array(rejected),
                                 pair_prompts=np.repeat(prompt_vec[None], len(chosen), 0))
        if model is None:
            curve.append(0.5)
            continue
        wins = 0.0
        for k, vecs in enumerate(block_vecs):
            scores = model.score(vecs, prompt_vec)
            pick_i = sorted(range(len(scores)), key=lambda i: -scores[i])[0]  # RerankStrategy's order
            wins += win(block_truth[k][pick_i], vanilla[k])
        curve.append(wins / len(blocks))
    return curve


def needed(curve: list[float], target: float = 0.75) -> int:
    """The number of choices from which on the win rate stays at least `target` (up to the last checkpoint),
    len + 1 when it does not end there."""
    for i in range(len(curve)):
        if all(value >= target for value in curve[i:]):
            return i + 1
    return len(curve) + 1


def first_at(curve: list[float], target: float = 0.75) -> int:
    """The first number of choices after which the win rate is at least `target` (len + 1: never)."""
    return next((i + 1 for i, value in enumerate(curve) if value >= target), len(curve) + 1)


def cross_win(user, mine: list, vanilla: list) -> float:
    """The share of (personal image, vanilla image) pairs the personal one wins (ties half)."""
    a, b = [user.score(im) for im in mine], [user.score(im) for im in vanilla]
    return statistics.mean(win(x, y) for x in a for y in b)


def rerank_stage(db, t2i, users, args, rng) -> dict:
    """Diversity of a `rerank` call's 4 images against vanilla's 4 (same seeds), floor on and off."""
    from mmpersona.diversity import diversity
    from mmpersona.images import png_bytes
    from mmpersona.models import synthetic
    from mmpersona.preferences import PreferenceProfile
    from pipelines import PersonalizedT2IPipeline
    from pipelines.t2i import RerankConfig

    emb = db.embedder
    floored = PersonalizedT2IPipeline(db, t2i=t2i, strategies=[])
    plain = PersonalizedT2IPipeline(db, t2i=t2i, strategies=[], configs={"rerank": RerankConfig(diversity_floor=0)})
    div = {"vanilla": [], "floor": [], "plain": []}
    wins = {"floor": [], "plain": []}
    for user in users:
        profile = PreferenceProfile(db, user.name)
        for a, b in user.pairs(rng, args.rerank_pairs):
            profile.compare(synthetic.GENERIC_PROMPT, png_bytes(a), png_bytes(b))
        profile.train_reward()
        for call in range(args.rerank_calls):
            seed = 20_000 + 16 * call
            vanilla = floored(synthetic.GENERIC_PROMPT, user=user.name, n=4, steps=args.steps, seed=seed,
                              strategies=[]).images
            div["vanilla"].append(diversity(emb.embed_images(vanilla)))
            for name, pipe in (("floor", floored), ("plain", plain)):
                mine = pipe(synthetic.GENERIC_PROMPT, user=user.name, n=4, steps=args.steps, seed=seed,
                            strategies=["rerank"]).images
                div[name].append(diversity(emb.embed_images(mine)))
                wins[name].append(cross_win(user, mine, vanilla))
    base = statistics.mean(div["vanilla"])
    result = {"diversity_ratio_rerank": round(statistics.mean(div["floor"]) / base, 4),
              "rerank_win_rate": round(statistics.mean(wins["floor"]), 4),
              "diversity_ratio_rerank_unfloored": round(statistics.mean(div["plain"]) / base, 4),
              "rerank_win_rate_unfloored": round(statistics.mean(wins["plain"]), 4)}
    print(json.dumps({"stage": "rerank", **result}), flush=True)
    return result


def lora_stage(db, t2i, args, rng) -> dict:
    """Per-user DPO LoRAs (8 pairs each, as benchmarks/preference_adapter.py): win rate and diversity against
    vanilla on 8 seeds, with the diversity watch on."""
    from mmpersona.diversity import diversity
    from mmpersona.images import png_bytes
    from mmpersona.models import synthetic
    from mmpersona.preferences import PreferenceProfile
    from pipelines import PersonalizedT2IPipeline
    from pipelines.dpo import DPOConfig, train_dpo_lora

    emb = db.embedder
    pipe = PersonalizedT2IPipeline(db, t2i=t2i, strategies=[])
    users = synthetic.planted_users("lora-", args.lora_users, rng)
    ratios, wins, stopped = [], [], 0
    for user in users:
        profile = PreferenceProfile(db, user.name)
        for a, b in user.pairs(rng, 8):
            profile.compare(synthetic.GENERIC_PROMPT, png_bytes(a), png_bytes(b))
        trained = train_dpo_lora(t2i, db, user.name, DPOConfig(steps=args.lora_steps), progress=False)
        stopped += trained.diversity_stopped
        seeds = list(range(8))
        vanilla = [pipe(synthetic.GENERIC_PROMPT, user=user.name, steps=args.steps, seed=s, strategies=[]).images[0]
                   for s in seeds]
        mine = [pipe(synthetic.GENERIC_PROMPT, user=user.name, steps=args.steps, seed=s, strategies=["lora"]).images[0]
                for s in seeds]
        ratios.append(diversity(emb.embed_images(mine)) / diversity(emb.embed_images(vanilla)))
        wins += [win(user.score(m), user.score(v)) for m, v in zip(mine, vanilla, strict=True)]
        print(json.dumps({"stage": "lora-user", "user": user.name, "ratio": round(ratios[-1], 4),
                          "win": statistics.mean(wins[-8:]), **trained.to_dict(), "losses": None}), flush=True)
    result = {"diversity_ratio_lora": round(statistics.mean(ratios), 4), "lora_win_rate": round(statistics.mean(wins), 4),
              "lora_diversity_stops": stopped}
    print(json.dumps({"stage": "lora", **result}), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=32)
    parser.add_argument("--pool", type=int, default=8 * POOL_SEEDS, help="images in the shared pool")
    parser.add_argument("--blocks", type=int, default=96, help="rerank calls judged per checkpoint")
    parser.add_argument("--max-pairs", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20, help="denoising steps per image")
    parser.add_argument("--stages", default="elicit,rerank,lora")
    parser.add_argument("--rerank-users", type=int, default=12)
    parser.add_argument("--rerank-pairs", type=int, default=16, help="choices each rerank user has made")
    parser.add_argument("--rerank-calls", type=int, default=6, help="rerank calls (4 images each) per user")
    parser.add_argument("--lora-users", type=int, default=4)
    parser.add_argument("--lora-steps", type=int, default=200)
    args = parser.parse_args()


    from mmpersona import ConceptDB
    from mmpersona.models import load_t2i, synthetic
    from pipelines import PersonalizedT2IPipeline

    stages = set(args.stages.split(","))
    rng = random.Random(1)
    t2i = load_t2i("tiny:sd-trained", device="cpu", ip_adapter=False)
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        db = ConceptDB(Path(tmp) / "bench.db", preset="tiny")
        emb = db.embedder
        pipe = PersonalizedT2IPipeline(db, t2i=t2i, strategies=[])
        users = synthetic.planted_users("heldout-", args.users, rng)
        prompt_vec = emb.embed_texts([synthetic.GENERIC_PROMPT])[0]
        if "elicit" in stages:
            start = time.perf_counter()
            pool = generate(pipe, list(range(args.pool)), args.steps)
            pool_vecs = emb.embed_images(pool)
            fresh = generate(pipe, list(range(1000, 1000 + 2 * args.max_pairs)), args.steps)
            fresh_vecs = emb.embed_images(fresh)
            flat = generate(pipe, list(range(10_000, 10_000 + CANDIDATES * args.blocks)), args.steps)
            blocks = [flat[i:i + CANDIDATES] for i in range(0, len(flat), CANDIDATES)]
            block_vecs = [emb.embed_images(b) for b in blocks]
            result = {}
            for order in ("active", "random"):
                curves = [elicit(u, order, pool, pool_vecs, fresh, fresh_vecs, prompt_vec, blocks, block_vecs, args.max_pairs, i)
                          for i, u in enumerate(users)]
                needs = [needed(c) for c in curves]
                mean_curve = [round(statistics.mean(c[k] for c in curves), 3) for k in range(args.max_pairs)]
                result[order] = {"median": statistics.median(needs), "needed": needs,
                                 "median_first": statistics.median(first_at(c) for c in curves),
                                 "mean_curve": mean_curve}
                print(json.dumps({"stage": "elicit", "order": order, **result[order]}), flush=True)
            out.update(pairs_to_075_active=result["active"]["median"], pairs_to_075_random=result["random"]["median"],
                       pairs_first_075_active=result["active"]["median_first"],
                       pairs_first_075_random=result["random"]["median_first"],
                       elicit_seconds=round(time.perf_counter() - start, 1))
        if "rerank" in stages:
            out.update(rerank_stage(db, t2i, users[:args.rerank_users], args, rng))
        if "lora" in stages:
            out.update(lora_stage(db, t2i, args, rng))
        db.close()
    print(json.dumps({**out, "users": args.users, "pool": args.pool, "blocks": args.blocks,
                      "max_pairs": args.max_pairs}))


if __name__ == "__main__":
    main()
