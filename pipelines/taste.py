"""Taste onboarding: which two images to show a user next (the Taste tab, `GET /v1/profile/next-pair`).

Two orders:
- "active" (the default): the pair comes from a pool of vanilla images of the built-in prompts (`TASTE_PROMPTS`,
  `POOL_SEEDS` seeds each), chosen by `mmpersona.elicitation` as the most informative about this user given
  their choices so far; the pair's prompt is the chosen pair's. The pool is the same for every user (vanilla
  images of public prompts and fixed seeds, no one's data): it is generated once per pipeline, in chunks of
  `CHUNK` images each queued like any request, and what a user is shown depends only on the pool and on their own
  choices, never on another user's.
- "random": the fixed order the tab had, two fresh images of the next prompt in turn (its seeds follow the
  step); also the order for a user's own prompts, which no shared pool holds.

With the trained tiny preset's planted-hue users, reranking wins at least 75% against vanilla from a median of 5
choices on in the active order, from 14 in the fixed order (`benchmarks/elicitation.py`, 32 users; 7 against 22
and 6 against 18.5 on two other builds of the preset).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable

from mmpersona.errors import MmpersonaError
from mmpersona.images import png_bytes

if TYPE_CHECKING:
    import numpy as np

    from .t2i import PersonalizedT2IPipeline

TASTE_PROMPTS = (
    "a cozy reading corner by a window", "a portrait of an old fisherman", "a mountain lake at dawn",
    "a bowl of ramen on a wooden table", "a city street at night in the rain", "a cat asleep on a sofa",
    "a lighthouse on a rocky coast", "a bouquet of wild flowers",
)
POOL_SEEDS = 6  # images per prompt in the shared pool: 8 x 6 = 48 images, 120 pairs
POOL_SEED = 1000  # the pool's first seed (each prompt's seeds follow)
CHUNK = 2  # pool images generated per queued job: the cost of one fixed-order pair
HISTORY = 512  # the user's most recent choices the active order reads
#: the user the pool's images are generated for: vanilla images (no strategy), so no one's profile is read
POOL_USER = "taste-pool"
ORDERS = ("active", "random")


@dataclass(frozen=True)
class PoolImage:
    prompt: int  # index into the pool's prompts
    seed: int
    png: bytes
    key: str  # content hash: the key the profile stores the image under
    vector: "np.ndarray"


@dataclass(frozen=True)
class TastePair:
    """What to show: the prompt, two PNG images, the order that chose them and the expected information of the
    answer (nats; None for the fixed order)."""

    prompt: str
    images: tuple[bytes, bytes]
    order: str
    information: float | None = None
    seeds: tuple[int, int] = (0, 0)


class TastePool:
    """The shared pool of vanilla images the active order picks from, filled chunk by chunk."""

    def __init__(self, prompts: Iterable[str] = TASTE_PROMPTS, seeds: int = POOL_SEEDS, steps: int = 30):
        self.prompts = tuple(prompts)
        self.seeds = seeds
        self.steps = steps
        self._items: dict[tuple[int, int], PoolImage] = {}
        self._lock = threading.Lock()

    def chunks(self) -> list[tuple[int, int, int]]:
        """The (prompt index, first seed, count) of each chunk not generated yet (`fill` adds chunks whole)."""
        with self._lock:
            have = set(self._items)
        return [(p, POOL_SEED + p * 100 + i, min(CHUNK, self.seeds - i))
                for p in range(len(self.prompts)) for i in range(0, self.seeds, CHUNK)
                if (p, POOL_SEED + p * 100 + i) not in have]

    @property
    def complete(self) -> bool:
        return not self.chunks()

    def fill(self, pipe: "PersonalizedT2IPipeline", chunk: tuple[int, int, int], user: str,
             stop: "threading.Event | None" = None) -> None:
        """Generate one chunk (vanilla: no strategy reads `user`'s profile) and add it to the pool."""
        from concept_db.types import content_hash

        p, first, count = chunk
        with self._lock:  # filled meanwhile by another request (the worker runs one job at a time)
            if all((p, first + i) in self._items for i in range(count)):
                return
        result = pipe(self.prompts[p], user=user, n=count, steps=self.steps, seed=first, strategies=[], stop=stop)
        pngs = [png_bytes(image) for image in result.images]
        vectors = pipe.db.embedder.embed_images(result.images)
        with self._lock:
            for i, (data, vector) in enumerate(zip(pngs, vectors, strict=True)):
                self._items[(p, first + i)] = PoolImage(p, first + i, data, content_hash(data), vector)

    def ensure(self, pipe: "PersonalizedT2IPipeline", user: str, run: Callable[[Callable[[], Any]], Any] | None = None,
               progress: Callable[[float], None] | None = None) -> None:
        """Fill what is missing, each chunk through `run` (for example the server's model worker, so that other
        requests go between chunks; default: called here)."""
        todo = self.chunks()
        for i, chunk in enumerate(todo):
            if progress is not None:
                progress(i / len(todo))
            job = (lambda c=chunk: self.fill(pipe, c, user))
            run(job) if run is not None else job()

    def images(self) -> list[PoolImage]:
        with self._lock:
            return [self._items[k] for k in sorted(self._items)]


def user_choices(pipe: "PersonalizedT2IPipeline", user: str) -> tuple["np.ndarray", "np.ndarray", set[frozenset[str]]]:
    """The image vectors of the user's most recent `HISTORY` choices (chosen, rejected), and every pair of
    images they have compared (by content hash)."""
    from mmpersona.preferences import PreferenceProfile

    profile = PreferenceProfile(pipe.db, user)
    pairs = profile.events("pair")
    asked = {frozenset((e.image, e.other)) for e in pairs}
    recent = pairs[-HISTORY:]
    return (profile.image_vectors([e.image for e in recent]), profile.image_vectors([e.other for e in recent]),
            asked)


def active_pair(pool: TastePool, pipe: "PersonalizedT2IPipeline", user: str,
                shown: Iterable[frozenset[str]] = (), seed: int = 0) -> TastePair | None:
    """The most informative pair of the (complete) pool for `user`, leaving out the pairs they compared and those
    in `shown` (shown and skipped); None when every pair of the pool is spent."""
    return pick_pair(pool, user_choices(pipe, user), shown, seed)


def pick_pair(pool: TastePool, choices: tuple["np.ndarray", "np.ndarray", set[frozenset[str]]],
              shown: Iterable[frozenset[str]] = (), seed: int = 0) -> TastePair | None:
    """`active_pair` from the user's choices already read (`user_choices`, which may run the embedder): numpy
    alone, so that a server runs it beside the model, not on its thread."""
    import numpy as np

    from mmpersona.elicitation import next_pair

    if not pool.complete:
        raise MmpersonaError("the taste pool is not generated yet (`TastePool.ensure`)")
    items = pool.images()
    chosen, rejected, asked = choices
    pick = next_pair(np.stack([i.vector for i in items]), [i.prompt for i in items], [i.key for i in items],
                     chosen=chosen, rejected=rejected, asked=asked | set(shown), order="active", seed=seed)
    if pick is None:
        return None
    a, b = items[pick.a], items[pick.b]
    return TastePair(pool.prompts[pick.prompt], (a.png, b.png), "active", pick.information, (a.seed, b.seed))


def fixed_pair(pipe: "PersonalizedT2IPipeline", user: str, prompts: "list[str] | tuple[str, ...]", step: int,
               steps: int, stop: "threading.Event | None" = None) -> TastePair:
    """The fixed order: two fresh vanilla images of prompt `step` (in turn), seeds 1000 + 2 * step and the next."""
    if not prompts:
        raise MmpersonaError("no prompts to make a pair of")
    prompt = prompts[step % len(prompts)]
    seed = POOL_SEED + 2 * step
    result = pipe(prompt, user=user, n=2, steps=steps, seed=seed, strategies=[], stop=stop)
    a, b = (png_bytes(image) for image in result.images)
    return TastePair(prompt, (a, b), "random", None, (seed, seed + 1))


_POOLS_LOCK = threading.Lock()


def taste_pool(pipe: "PersonalizedT2IPipeline", steps: int) -> TastePool:
    """The pipeline's shared pool for generations of `steps` steps (made once, empty; `TastePool.ensure` fills
    it)."""
    with _POOLS_LOCK:
        pools = pipe.__dict__.setdefault("_taste_pools", {})
        if steps not in pools:
            pools[steps] = TastePool(steps=steps)
        return pools[steps]


class ShownPairs:
    """The pairs the active order showed each user (a skipped pair is in no profile, and must not come back at
    once): the newest `per_user` of each of the latest `users` users, in memory."""

    def __init__(self, per_user: int = 256, users: int = 4096):
        from collections import OrderedDict

        self.per_user, self.users = per_user, users
        self._shown: "OrderedDict[str, OrderedDict[frozenset[str], None]]" = OrderedDict()
        self._lock = threading.Lock()

    def add(self, user: str, pair: TastePair) -> None:
        from collections import OrderedDict

        from concept_db.types import content_hash

        key = frozenset(content_hash(image) for image in pair.images)
        with self._lock:
            mine = self._shown.pop(user, None) or OrderedDict()
            mine[key] = None
            while len(mine) > self.per_user:
                mine.popitem(last=False)
            self._shown[user] = mine
            while len(self._shown) > self.users:
                self._shown.popitem(last=False)

    def of(self, user: str) -> set[frozenset[str]]:
        with self._lock:
            return set(self._shown.get(user, ()))

    def forget(self, user: str) -> None:
        with self._lock:
            self._shown.pop(user, None)
