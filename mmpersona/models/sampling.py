"""Each generation draws from its own random state.

transformers' `generate` samples with torch's global generator and takes none of its own. A request's `seed` set
there (`torch.manual_seed`) would decide the next request's draws, whoever sent it, and one user's draws would
move everyone's. `own_draws` runs one generation on a state of its own: the request's seed, or fresh entropy
when it gives none, on a fork of torch's global state that is put back afterwards. Nothing a generation does
is then seen by another, and a seeded request gives the same answer whatever ran before it.

Generations on one model run one at a time (the server's model worker, the app's model lock, the CLI), which
this relies on: torch keeps one global generator per device for the whole process.
"""

from __future__ import annotations

import contextlib
import secrets
from typing import Any, Iterator

SEED_MAX = 2**63 - 1  # seeds are 0 ... 2**63 - 1 (a signed 64-bit integer, as JSON clients send it)


def fresh_seed() -> int:
    return secrets.randbits(63)


@contextlib.contextmanager
def own_draws(device: Any, seed: int | None = None) -> Iterator[int]:
    """Draws inside come from `seed`'s state (fresh entropy when None) on the CPU and on `device`; torch's global
    state is as it was afterwards. Yields the seed used."""
    import torch

    device = torch.device(device)
    seed = fresh_seed() if seed is None else int(seed)
    if not 0 <= seed <= SEED_MAX:
        raise ValueError(f"a seed is an integer from 0 to {SEED_MAX}, got {seed}")
    cuda = device.type == "cuda" and torch.cuda.is_available()
    index = (device.index if device.index is not None else torch.cuda.current_device()) if cuda else None
    with torch.random.fork_rng(devices=[index] if cuda else [], device_type="cuda"):
        torch.random.default_generator.manual_seed(seed)
        if cuda:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield seed
