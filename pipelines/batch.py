"""Batch generation: many prompts, one PNG and one JSON sidecar per image, resumable, data-parallel.

Under `accelerate launch --num_processes N`, process i takes prompts i, i+N, i+2N, ... (no communication is
needed). A prompt whose images and sidecars all exist is skipped, so a killed run continues where it stopped;
each image is written to a temporary name and renamed, and its sidecar is written last, so a half-written
image is never taken for a finished one.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

from mmpersona.errors import MmpersonaError

logger = logging.getLogger(__name__)


def read_prompts(prompts: Sequence[str], file: str | Path | None) -> list[str]:
    """Prompts from `--prompt` options and/or a file (one per line; blank lines and `#` comments ignored)."""
    items = [p.strip() for p in prompts if p.strip()]
    if file is not None:
        path = Path(file)
        if not path.is_file():
            raise MmpersonaError(f"prompt file {str(path)!r} not found")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise MmpersonaError(f"prompt file {str(path)!r} is not UTF-8 text") from e
        from_file = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
        if not from_file:
            raise MmpersonaError(f"prompt file {str(path)!r} has no prompts")
        items += from_file
    if not items:
        raise MmpersonaError("give at least one --prompt or a --prompts file")
    return items


def item_paths(out_dir: Path, prompt_index: int, image_index: int) -> tuple[Path, Path]:
    stem = f"{prompt_index:05d}-{image_index:02d}"
    return out_dir / f"{stem}.png", out_dir / f"{stem}.json"


def generate_batch(prompts: list[str], *, out_dir: str | Path, user: str, n: int = 1,
                   strategies: Sequence[str] | None = None, steps: int = 30, seed: int = 0,
                   guidance_scale: float = 7.5,
                   role: str = "t2i", db: Any = None, preset: str = "default", device: Any = "auto",
                   dtype: Any = None, model: str | None = None, embedder: str | None = None,
                   progress: bool = True, batch_size: int | None = None,
                   load_options: dict[str, Any] | None = None, adapter: Any = None) -> dict[str, Any]:
    """Generate this process's share of `prompts`; returns counts for this process.

    `strategies` None: the pipeline's defaults for what is loaded. `batch_size` and `load_options` (model CPU
    offload, VAE slicing / tiling) and `adapter` (the preference adapter) as in `PersonalizedT2IPipeline`."""
    from tqdm.auto import tqdm

    from mmpersona.devices import process_device

    from .t2i import PersonalizedT2IPipeline, get_strategy

    for name in strategies or ():  # fail before loading any model
        get_strategy(name)
    state, device = process_device(device)  # one accelerator per process, before any model is loaded
    rank, world = state.process_index, state.num_processes
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mine = [(i, p) for i, p in enumerate(prompts) if i % world == rank]
    todo = [(i, p) for i, p in mine if not all(item_paths(out, i, j)[1].is_file() and item_paths(out, i, j)[0].is_file()
                                                for j in range(n))]
    report = {"process": rank, "processes": world, "prompts": len(mine), "skipped": len(mine) - len(todo),
              "generated": 0, "files": [], "seconds": 0.0}
    if not todo:
        return report
    pipe = PersonalizedT2IPipeline(db, t2i=model, role=role, preset=preset, device=device, dtype=dtype,
                                   embedder=embedder, strategies=strategies, batch_size=batch_size,
                                   load_options=load_options, adapter=adapter)
    import time

    start = time.perf_counter()
    for i, prompt in tqdm(todo, desc=f"generating (process {rank + 1}/{world})", disable=not progress,
                          unit="prompt", position=rank):
        # seeds differ per prompt and image, and do not depend on how prompts are split across processes
        result = pipe(prompt, user=user, n=n, steps=steps, seed=seed + i * 1000, strategies=strategies,
                      guidance_scale=guidance_scale)
        for j, (image, meta) in enumerate(zip(result.images, result.metadata, strict=True)):
            png, sidecar = item_paths(out, i, j)
            tmp = png.with_name(f".{png.name}.{os.getpid()}.tmp")
            image.save(tmp, format="PNG")
            os.replace(tmp, png)
            meta = {**meta, "file": png.name, "prompt_index": i, "image_index": j}
            tmp = sidecar.with_name(f".{sidecar.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(meta, indent=2), encoding="utf-8")
            os.replace(tmp, sidecar)
            report["files"].append(png.name)
            report["generated"] += 1
    report["seconds"] = round(time.perf_counter() - start, 3)  # generation only, not start-up
    pipe.db.close()
    return report
