"""How varied a set of images is, and a selection by score that keeps it varied.

Diversity of a set: the mean pairwise cosine distance (1 - cos) of its images' embedder vectors (CLIP by default),
0 for fewer than two. A personal reward used to rerank, or to train a LoRA, can pull every image toward one look
(reported for HPS-based RL: every face alike); reranking keeps a floor (`select_diverse`) and LoRA training
watches the ratio (`pipelines.dpo`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

from .errors import MmpersonaError

if TYPE_CHECKING:
    import numpy as np

MMR_WEIGHTS = tuple(i / 10 for i in range(11))  # the similarity weights `select_diverse` tries, in turn
EXACT_SETS = 20_000  # `select_diverse` tries every set up to this many, MMR past it


def _unit(vectors) -> "np.ndarray":
    import numpy as np

    v = np.asarray(vectors, np.float64)
    if v.ndim != 2:
        raise MmpersonaError(f"diversity: expected (n, dim) vectors, got shape {v.shape}")
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


def diversity(vectors) -> float:
    """Mean pairwise cosine distance of the rows of `vectors` (0 for fewer than two)."""
    import numpy as np

    v = _unit(vectors)
    n = len(v)
    if n < 2:
        return 0.0
    sims = v @ v.T
    return float((1.0 - sims[np.triu_indices(n, 1)]).mean())


def select_diverse(scores: Sequence[float], vectors, n: int, floor: float) -> tuple[list[int], dict]:
    """The indexes of `n` of the candidates, best first, by score with a diversity floor: the set's diversity is
    kept at least `floor` x the diversity of all the candidates (what `n` of them taken at random have, in
    expectation: a vanilla call's images).

    The plain top `n` by score when it meets the floor. Otherwise ("exact"), of the sets of `n` that hold the best
    candidate and meet the floor, the one of the highest total score, when there are at most `EXACT_SETS` such
    sets to try (a rerank's 4 images of 16 candidates: 455); past that ("mmr"), greedy maximal marginal
    relevance, each next image maximising (1 - lam) * relevance - lam * (its largest cosine similarity to those
    taken), relevance the score scaled to 0..1, with the smallest lam of `MMR_WEIGHTS` that meets the floor. Both
    give the most diverse set they found when none meets it. MMR alone overshot: its first weight that met a 0.8
    floor gave sets at 0.9-1.1 of vanilla's diversity and gave up wins for it (`benchmarks/elicitation.py`).
    Returns the order (the `n` taken, by score, then the rest by score) and what was done."""
    import numpy as np

    s = np.asarray(scores, np.float64)
    v = _unit(vectors)
    if len(s) != len(v):
        raise MmpersonaError(f"diversity: {len(s)} scores for {len(v)} vectors")
    by_score = sorted(range(len(s)), key=lambda i: -s[i])
    n = min(n, len(s))
    whole = diversity(v)
    target = floor * whole - 1e-12
    info = {"floor": floor, "candidates_diversity": round(whole, 6), "method": "top", "mmr_weight": 0.0}
    top = by_score[:n]
    kept = diversity(v[top])
    if n < 2 or floor <= 0 or kept >= target:
        return by_score, {**info, "diversity": round(kept, 6)}
    if math.comb(len(s) - 1, n - 1) <= EXACT_SETS:
        d, taken = _best_set(s, v, by_score[0], n, target)
        info.update(method="exact", mmr_weight=None)
    else:
        d, taken, lam = _mmr(s, v, by_score, n, target, kept)
        info.update(method="mmr", mmr_weight=lam)
    taken = sorted(taken, key=lambda i: -s[i])
    return taken + [i for i in by_score if i not in taken], {**info, "diversity": round(d, 6)}


def _best_set(s, v, first: int, n: int, target: float) -> tuple[float, list[int]]:
    """Of the sets of `n` holding `first`, the highest total score with diversity >= `target` (the most diverse
    set when none has it): every set tried, at once."""
    import itertools

    import numpy as np

    others = [i for i in range(len(s)) if i != first]
    sets = np.array([(first, *rest) for rest in itertools.combinations(others, n - 1)])
    dist = 1.0 - v @ v.T
    pairs = list(itertools.combinations(range(n), 2))
    div = sum(dist[sets[:, a], sets[:, b]] for a, b in pairs) / len(pairs)
    total = s[sets].sum(1)
    ok = div >= target
    pick = int(np.argmax(np.where(ok, total, -np.inf))) if ok.any() else int(np.argmax(div))
    return float(div[pick]), [int(i) for i in sets[pick]]


def _mmr(s, v, by_score: list[int], n: int, target: float, kept: float) -> tuple[float, list[int], float]:
    import numpy as np

    span = float(s.max() - s.min())
    rel = (s - s.min()) / span if span > 0 else np.zeros_like(s)
    sims = v @ v.T
    best = (kept, by_score[:n], 0.0)
    for lam in MMR_WEIGHTS[1:]:
        taken = [by_score[0]]
        while len(taken) < n:
            rest = [i for i in by_score if i not in taken]
            gain = [(1 - lam) * rel[i] - lam * max(sims[i, j] for j in taken) for i in rest]
            taken.append(rest[int(np.argmax(gain))])
        d = diversity(v[taken])
        if d > best[0] or d >= target:
            best = (d, taken, lam)
        if d >= target:
            break
    return best
