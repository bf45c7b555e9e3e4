"""Which pair of images to show a user next: the choice expected to teach the most about their taste.

The rule (`RULE`), over the embedder's unit image vectors x (the reward model's image term, `mmpersona.reward`):

- a Bayesian Bradley-Terry model of the user: P(a chosen over b | w) = sigmoid(w . (x_a - x_b)), prior
  w ~ N(0, PRIOR_SCALE^2 I);
- its posterior from the user's choices, by the Laplace approximation at the maximum a posteriori (a few Newton
  steps: the same logistic likelihood the reward model fits, with a proper prior so that it exists from the
  first choice on, and from none);
- for each candidate pair (two images of one prompt, not asked before), the expected information gain about w of
  the user's answer (BALD: H[E_w p] - E_w H[p]; under the posterior the pair's margin is one Gaussian, so these
  are one-dimensional integrals, by quadrature), and the pair with the most wins.

Why this and not a committee of reward models fitted on bootstrap samples: the posterior exists with no choice at
all (the first pair is then the two most different images, which is what the prior says to ask) and with one
(a bootstrap of one pair is that pair every time: no disagreement to measure); it costs one fit instead of one
per committee member; and it is deterministic. The reward model keeps its own fit (with the
prompt term); this model decides only what to ask.

Pure numpy; the cost is bounded by `MAX_PAIRS` candidate pairs whatever the pool: one (dim x dim) solve per
Newton step, then (pairs x dim x dim) for the margins' variances.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from .errors import MmpersonaError

if TYPE_CHECKING:
    import numpy as np

RULE = "v1: Laplace-approximated Bayesian Bradley-Terry on image vectors; next pair = max expected information gain"
ORDERS = ("active", "random")
PRIOR_SCALE = 4.0  # prior std of each weight: a margin of a few units separates a clear choice from a coin flip
QUADRATURE = 32  # Gauss-Hermite points for each pair's expectation
MAX_PAIRS = 4096  # candidate pairs scored at most (a random subset beyond)
NEWTON_STEPS = 25


@dataclass(frozen=True)
class Posterior:
    """The Laplace posterior over w: its mean and covariance (dim, dim)."""

    mean: "np.ndarray"
    cov: "np.ndarray"

    def margin_variance(self, diffs: "np.ndarray") -> "np.ndarray":
        return ((diffs @ self.cov) * diffs).sum(-1)


def posterior(chosen: "np.ndarray", rejected: "np.ndarray", dim: int | None = None,
              prior_scale: float = PRIOR_SCALE) -> Posterior:
    """The posterior over w after the choices `chosen[i]` over `rejected[i]` (rows of image vectors); `dim` is
    needed when there are none."""
    import numpy as np

    c, r = np.asarray(chosen, np.float64), np.asarray(rejected, np.float64)
    if c.shape != r.shape:
        raise MmpersonaError(f"elicitation: {c.shape} chosen but {r.shape} rejected vectors")
    d = c.shape[1] if c.ndim == 2 and c.shape[0] else dim
    if d is None:
        raise MmpersonaError("elicitation: no choices and no `dim`")
    diffs = (c - r).reshape(-1, d)
    precision = 1.0 / prior_scale**2
    w = np.zeros(d)
    hessian = precision * np.eye(d)
    for _ in range(NEWTON_STEPS if len(diffs) else 0):
        p = 1.0 / (1.0 + np.exp(-(diffs @ w)))
        grad = precision * w - diffs.T @ (1.0 - p)
        hessian = precision * np.eye(d) + (diffs * (p * (1 - p))[:, None]).T @ diffs
        step = np.linalg.solve(hessian, grad)
        w = w - step
        if float(np.abs(step).max()) < 1e-8:
            break
    if len(diffs):
        p = 1.0 / (1.0 + np.exp(-(diffs @ w)))
        hessian = precision * np.eye(d) + (diffs * (p * (1 - p))[:, None]).T @ diffs
    cov = np.linalg.inv(hessian)
    return Posterior(w, (cov + cov.T) / 2)


def _entropy(p: "np.ndarray") -> "np.ndarray":
    import numpy as np

    p = np.clip(p, 1e-9, 1 - 1e-9)
    return -(p * np.log(p) + (1 - p) * np.log(1 - p))


def information(post: Posterior, diffs: "np.ndarray") -> "np.ndarray":
    """Expected information gain (nats) about w of the answer to each pair, rows of `diffs` = x_a - x_b.

    Under the posterior a pair's margin w . d is one Gaussian, N(mean . d, d' cov d): the expectations are
    one-dimensional integrals, taken by Gauss-Hermite quadrature (`QUADRATURE` points): exact to well below the
    differences that decide, and the same every time."""
    import numpy as np

    diffs = np.asarray(diffs, np.float64)
    if not len(diffs):
        return np.zeros(0)
    nodes, weights = np.polynomial.hermite_e.hermegauss(QUADRATURE)  # for the standard normal's weight
    weights = weights / weights.sum()
    mu = diffs @ post.mean
    sd = np.sqrt(np.maximum(post.margin_variance(diffs), 0.0))
    p = 1.0 / (1.0 + np.exp(-(mu[:, None] + sd[:, None] * nodes[None])))  # (pairs, nodes)
    return _entropy(p @ weights) - _entropy(p) @ weights


@dataclass(frozen=True)
class Pick:
    """The pair chosen: indexes into the pool, its prompt's index, and the expected information (None when
    chosen at random)."""

    prompt: int
    a: int
    b: int
    information: float | None

    def to_dict(self) -> dict:
        return {"prompt": self.prompt, "a": self.a, "b": self.b, "information": self.information}


def candidate_pairs(prompts: Sequence[int], keys: Sequence[str], asked: set[frozenset[str]],
                    limit: int = MAX_PAIRS, seed: int = 0) -> list[tuple[int, int]]:
    """Pairs (i, j) of pool images of the same prompt, distinct, not asked before (by their keys), at most
    `limit` (a seeded random subset beyond)."""
    import random

    out = []
    for i in range(len(keys)):
        for j in range(i + 1, len(keys)):
            if prompts[i] == prompts[j] and keys[i] != keys[j] and frozenset((keys[i], keys[j])) not in asked:
                out.append((i, j))
    if len(out) > limit:
        out = random.Random(seed).sample(out, limit)
        out.sort()
    return out


def next_pair(vectors: "np.ndarray", prompts: Sequence[int], keys: Sequence[str], *,
              chosen: "np.ndarray", rejected: "np.ndarray", asked: set[frozenset[str]] = frozenset(),
              order: str = "active", seed: int = 0) -> Pick | None:
    """The next pair to show from a pool of images (`vectors` (n, dim), each with its prompt's index and a key,
    for example its content hash), given the user's choices so far; None when every pair was asked.

    order "active": the most informative pair (`RULE`); "random": one drawn uniformly (seeded)."""
    import random

    import numpy as np

    if order not in ORDERS:
        raise MmpersonaError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")
    vectors = np.asarray(vectors, np.float64)
    if vectors.ndim != 2 or len(vectors) != len(prompts) or len(vectors) != len(keys):
        raise MmpersonaError("elicitation: one prompt index and one key per pool vector")
    pairs = candidate_pairs(prompts, keys, set(asked), seed=seed)
    if not pairs:
        return None
    if order == "random":
        i, j = pairs[random.Random(seed).randrange(len(pairs))]
        return Pick(prompts[i], i, j, None)
    post = posterior(chosen, rejected, dim=vectors.shape[1])
    idx = np.asarray(pairs)
    gain = information(post, vectors[idx[:, 0]] - vectors[idx[:, 1]])
    best = int(np.argmax(gain))
    i, j = pairs[best]
    value = float(gain[best])
    return Pick(prompts[i], i, j, round(value, 6) if math.isfinite(value) else None)
