"""A personal reward model: a Bradley-Terry / logistic head on CLIP embeddings of the user's choices.

score(image, prompt) = w . x + v . (x * p)   (x: image embedding, p: prompt embedding, both unit length)

Trained on pairwise choices (Bradley-Terry: P(chosen > rejected) = sigmoid(score_c - score_r)) and on likes and
dislikes (logistic: P(liked) = sigmoid(score + b)), with L2 regularisation, by L-BFGS in well under a second on
CPU. A user with no data gets a cold-start model whose scores are all 0 (explicitly, not an error).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import MmpersonaError

if TYPE_CHECKING:
    import numpy as np

BLOB_NAME = "reward_model"


@dataclass
class RewardModel:
    """Weights of the head, what it was trained on, and its held-out pairwise accuracy (None if too little data)."""

    w: "np.ndarray"
    v: "np.ndarray"
    bias: float
    embedder: str
    cold_start: bool
    held_out_accuracy: float | None = None
    pairs: int = 0
    likes: int = 0
    dislikes: int = 0

    @property
    def dim(self) -> int:
        return int(self.w.shape[0])

    def score(self, images: "np.ndarray", prompts: "np.ndarray | None" = None) -> "np.ndarray":
        """Scores of image embeddings (n, dim), optionally with one prompt embedding each (n, dim) or (dim,)."""
        import numpy as np

        x = np.asarray(images, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise MmpersonaError(f"reward model expects (n, {self.dim}) embeddings, got {x.shape}")
        s = x @ self.w
        if prompts is not None:
            p = np.broadcast_to(np.asarray(prompts, dtype=np.float32), x.shape)
            s = s + (x * p) @ self.v
        return s.astype(np.float32)

    def to_bytes(self) -> bytes:
        from safetensors.numpy import save

        meta = {"embedder": self.embedder, "bias": self.bias, "cold_start": self.cold_start,
                "held_out_accuracy": self.held_out_accuracy, "pairs": self.pairs, "likes": self.likes,
                "dislikes": self.dislikes}
        return save({"w": self.w, "v": self.v}, metadata={"meta": json.dumps(meta)})

    @classmethod
    def from_bytes(cls, data: bytes) -> "RewardModel":
        import tempfile
        from pathlib import Path

        from safetensors import safe_open

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "r.safetensors"
            path.write_bytes(data)
            with safe_open(str(path), framework="numpy") as f:
                meta = json.loads(f.metadata()["meta"])
                return cls(f.get_tensor("w"), f.get_tensor("v"), **meta)

    def summary(self) -> dict[str, Any]:
        return {"embedder": self.embedder, "cold_start": self.cold_start, "held_out_accuracy": self.held_out_accuracy,
                "pairs": self.pairs, "likes": self.likes, "dislikes": self.dislikes}


def cold_start(dim: int, embedder: str) -> RewardModel:
    import numpy as np

    return RewardModel(np.zeros(dim, np.float32), np.zeros(dim, np.float32), 0.0, embedder, True)


def _fit(chosen, rejected, pair_prompts, likes, dislikes, l2: float):
    import torch

    dim = (chosen if len(chosen) else likes if len(likes) else dislikes).shape[1]
    w = torch.zeros(dim, dtype=torch.float64, requires_grad=True)
    v = torch.zeros(dim, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    t = {k: torch.as_tensor(a, dtype=torch.float64) for k, a in
         dict(c=chosen, r=rejected, p=pair_prompts, l=likes, d=dislikes).items()}
    n = max(len(chosen) + len(likes) + len(dislikes), 1)
    opt = torch.optim.LBFGS([w, v, b], lr=1, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = l2 * (w.square().sum() + v.square().sum())
        if len(chosen):
            margin = (t["c"] - t["r"]) @ w + ((t["c"] - t["r"]) * t["p"]) @ v
            loss = loss - torch.nn.functional.logsigmoid(margin).sum() / n
        if len(likes):
            loss = loss - torch.nn.functional.logsigmoid(t["l"] @ w + b).sum() / n
        if len(dislikes):
            loss = loss - torch.nn.functional.logsigmoid(-(t["d"] @ w + b)).sum() / n
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().float().numpy(), v.detach().float().numpy(), float(b.detach())


def train_reward(embedder: str, *, chosen: "np.ndarray | None" = None, rejected: "np.ndarray | None" = None,
                 pair_prompts: "np.ndarray | None" = None, likes: "np.ndarray | None" = None,
                 dislikes: "np.ndarray | None" = None, dim: int | None = None, l2: float = 1e-3,
                 held_out: float = 0.2, seed: int = 0) -> RewardModel:
    """Fit the head. Held-out pairwise accuracy is measured on `held_out` of the pairs (or of like/dislike
    pseudo-pairs when there are no pairs) by a model fitted without them; the returned model uses all data."""
    import numpy as np

    def arr(a):
        a = np.zeros((0, dim or 0), np.float32) if a is None else np.asarray(a, np.float32)
        return a if a.ndim == 2 else a.reshape(len(a), -1) if a.size else np.zeros((0, dim or 0), np.float32)

    chosen, rejected, likes, dislikes = arr(chosen), arr(rejected), arr(likes), arr(dislikes)
    if len(chosen) != len(rejected):
        raise MmpersonaError(f"{len(chosen)} chosen but {len(rejected)} rejected embeddings")
    prompts = arr(pair_prompts) if pair_prompts is not None else np.zeros_like(chosen)
    if len(prompts) != len(chosen):
        raise MmpersonaError("pair_prompts needs one prompt embedding per pair")
    sizes = {a.shape[1] for a in (chosen, likes, dislikes) if len(a)}
    if len(sizes) > 1:
        raise MmpersonaError(f"embeddings of different dimensions: {sorted(sizes)}")
    if not sizes:
        if dim is None:
            raise MmpersonaError("no data to train on and no `dim` for a cold-start model")
        return cold_start(dim, embedder)
    rng = np.random.default_rng(seed)
    accuracy = None
    if len(chosen) >= 5:
        idx = rng.permutation(len(chosen))
        cut = max(1, int(round(len(chosen) * held_out)))
        test, train = idx[:cut], idx[cut:]
        w, v, _ = _fit(chosen[train], rejected[train], prompts[train], likes, dislikes, l2)
        margin = (chosen[test] - rejected[test]) @ w + ((chosen[test] - rejected[test]) * prompts[test]) @ v
        accuracy = float((margin > 0).mean())
    elif len(likes) >= 3 and len(dislikes) >= 3:
        lk, dk = rng.permutation(len(likes)), rng.permutation(len(dislikes))
        cl, cd = max(1, int(round(len(likes) * held_out))), max(1, int(round(len(dislikes) * held_out)))
        w, _, _ = _fit(chosen, rejected, prompts, likes[lk[cl:]], dislikes[dk[cd:]], l2)
        scores_l, scores_d = likes[lk[:cl]] @ w, dislikes[dk[:cd]] @ w
        accuracy = float((scores_l[:, None] > scores_d[None, :]).mean())
    w, v, b = _fit(chosen, rejected, prompts, likes, dislikes, l2)
    return RewardModel(w, v, b, embedder, False, accuracy, len(chosen), len(likes), len(dislikes))
