"""A user's preference as one fixed-size vector, for the preference adapter (PPD style).

The rule (`RULE`), over the embedder's unit vectors `e(.)` (CLIP by default; images and texts share its space):

    u = unit( mean_i [ e(chosen_i) - e(rejected_i) ]                 over the user's pairwise choices
            + [ mean e(liked image)   - mean e(disliked image)   ]    when the user has both
            + [ mean e(liked comment) - mean e(disliked comment) ]    when the user has both )

Every term is a mean, so the vector does not depend on the order of the events, and it is the same size (the
embedder's dimension) for 1 pair or 1,000. The first term is what the adapter is trained on (Pick-a-Pic has only
pairs); likes and comments point the same way when a user has them. A user with none of these has no vector
(`None`): the `preference` strategy then leaves the prompt as it is.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from .errors import MmpersonaError

if TYPE_CHECKING:
    import numpy as np

RULE = "v1: unit(mean(chosen - rejected) + (mean liked - mean disliked images) + (mean liked - mean disliked comments))"


def _mean(rows: "np.ndarray | Sequence | None"):
    import numpy as np

    if rows is None or len(rows) == 0:
        return None
    return np.asarray(rows, np.float32).reshape(len(rows), -1).mean(0)


def user_embedding(chosen: "np.ndarray", rejected: "np.ndarray", *, liked: "np.ndarray | None" = None,
                   disliked: "np.ndarray | None" = None, liked_text: "np.ndarray | None" = None,
                   disliked_text: "np.ndarray | None" = None) -> "np.ndarray | None":
    """`RULE` over embedding rows (n, dim): chosen[i] was preferred to rejected[i]. None when there is no signal."""
    import numpy as np

    if len(chosen) != len(rejected):
        raise MmpersonaError(f"user_embedding: {len(chosen)} chosen but {len(rejected)} rejected vectors")
    terms = []
    if len(chosen):
        terms.append(_mean(np.asarray(chosen, np.float32) - np.asarray(rejected, np.float32)))
    for pos, neg in ((liked, disliked), (liked_text, disliked_text)):
        a, b = _mean(pos), _mean(neg)
        if a is not None and b is not None:
            terms.append(a - b)
    if not terms:
        return None
    dims = {t.shape[0] for t in terms}
    if len(dims) != 1:
        raise MmpersonaError(f"user_embedding: the vectors have different dimensions {sorted(dims)}")
    total = np.sum(terms, axis=0)
    norm = float(np.linalg.norm(total))
    if not np.isfinite(norm):
        raise MmpersonaError("user_embedding: the vectors are not finite")
    if norm < 1e-8:  # the choices cancel out: no direction
        return None
    return (total / norm).astype(np.float32)


def interpolate(a: "np.ndarray", b: "np.ndarray", t: float) -> "np.ndarray":
    """The unit vector between two user embeddings: `a` at t=0, `b` at t=1 (spherical, so every step is a
    vector of the kind the adapter was trained on)."""
    import numpy as np

    if not 0.0 <= t <= 1.0:
        raise MmpersonaError(f"interpolate: t must be in [0, 1], got {t}")
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise MmpersonaError(f"interpolate: shapes {a.shape} and {b.shape} differ")
    a, b = a / np.linalg.norm(a), b / np.linalg.norm(b)
    omega = float(np.arccos(np.clip(a @ b, -1.0, 1.0)))
    if omega < 1e-6:
        return a.astype(np.float32)
    if np.pi - omega < 1e-6:  # opposite: any great circle; take the plain mix
        mix = (1 - t) * a + t * b
        n = np.linalg.norm(mix)
        return (mix / n if n > 1e-8 else a).astype(np.float32)
    out = (np.sin((1 - t) * omega) * a + np.sin(t * omega) * b) / np.sin(omega)
    return (out / np.linalg.norm(out)).astype(np.float32)
