"""Hard negatives for learning a concept's tokens, without an outside service.

Yo'LLaVA and MC-LLaVA retrieved hard negatives from LAION's retrieval service, which is gone (Yo'LLaVA #9,
MC-LLaVA #7). Two local sources instead, both cached:
- `mine`: the images of a local folder most similar to the concept (CLIP, the database's own embedder), the
  near-duplicates of its own images left out: other dogs for a dog;
- `generate`: images of the concept's category made by the toolkit's own text-to-image model ("a photo of a
  dog"), one per seed.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmpersona.errors import MmpersonaError

if TYPE_CHECKING:
    from mmpersona.conceptdb import ConceptDB
    from mmpersona.models import LoadedT2I

#: a folder image this similar to one of the concept's own images is taken to be the concept itself
DUPLICATE_SIMILARITY = 0.97


def _cache_root() -> Path:
    from mmpersona.paths import cache_dir

    return cache_dir() / "negatives"


def folder_vectors(db: "ConceptDB", folder: str | Path, *, progress: bool = False) -> tuple[list[Path], Any]:
    """The images of `folder` and their vectors from the database's embedder, computed once per folder state
    (names, sizes, modification times) and embedder, cached as safetensors."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    from .calibrate import images_in

    images = images_in(folder)
    if not images:
        raise MmpersonaError(f"{str(folder)!r} holds no images to mine negatives from")
    emb = db.embedder
    state = "\x1f".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in images)
    key = hashlib.sha256(f"{emb.name}\x1f{Path(folder).resolve()}\x1f{state}".encode()).hexdigest()[:24]
    file = _cache_root() / "mined" / f"{key}.safetensors"
    if file.is_file():
        return images, load_file(str(file))["vectors"]
    vectors = np.asarray(emb.embed_images(images, progress=progress), dtype=np.float32)
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_suffix(".partial")
    save_file({"vectors": vectors}, str(tmp), metadata={"embedder": emb.name, "files": json.dumps(
        [p.name for p in images])})
    tmp.replace(file)
    return images, vectors


def mine(db: "ConceptDB", user: str, name: str, folder: str | Path, n: int = 10, *,
         progress: bool = False) -> list[Path]:
    """The `n` images of `folder` most like concept `name` (the best cosine similarity to any of its reference
    images), those at `DUPLICATE_SIMILARITY` or more left out as the concept itself."""
    import numpy as np

    concept = db.resolve(user, name)
    stored = db.store.vectors(user, concept.id).get(db.embedder.name)
    if stored is None or not len(stored[0]):
        raise MmpersonaError(f"{concept.handle} has no vectors from {db.embedder.name} "
                             "(run `mmpersona concepts reindex`)")
    images, vectors = folder_vectors(db, folder, progress=progress)
    refs = stored[1] / np.linalg.norm(stored[1], axis=1, keepdims=True)
    best = (vectors @ refs.T).max(axis=1)
    order = [i for i in np.argsort(-best, kind="stable") if best[i] < DUPLICATE_SIMILARITY]
    return [images[i] for i in order[:n]]


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:80] or "x"


def generate(t2i: "LoadedT2I", category: str, n: int = 8, *, seed: int = 0, steps: int = 25,
             progress: bool = False) -> list[Path]:
    """`n` images of `category` ("a photo of a dog") from the text-to-image pipeline, seeds `seed`..`seed+n-1`,
    each made once and cached as PNG per (model, category, steps, seed)."""
    import torch
    from tqdm.auto import tqdm

    if n < 1:
        raise MmpersonaError(f"the number of generated negatives must be at least 1, got {n}")
    if t2i.ip_adapter:
        raise MmpersonaError("generate negatives with a pipeline loaded without its IP-Adapter "
                             "(load_t2i(..., ip_adapter=False)): an IP-Adapter needs an image to condition on")
    subject = category.strip() or "object"
    folder = _cache_root() / "generated" / _safe(t2i.spec.id) / _safe(subject) / f"steps{steps}"
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for s in tqdm(range(seed, seed + n), desc=f"negatives: {subject}", disable=not progress, unit="image"):
        path = folder / f"{s}.png"
        if not path.is_file():
            generator = torch.Generator(device="cpu").manual_seed(s)
            image = t2i.pipeline(f"a photo of a {subject}", num_inference_steps=steps, generator=generator).images[0]
            tmp = path.with_suffix(".partial.png")
            image.save(tmp)
            tmp.replace(path)
        out.append(path)
    return out
