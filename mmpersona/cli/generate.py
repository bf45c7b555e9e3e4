"""`mmpersona generate`: batch generation for a user."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .settings import emit, settings


def generate(
    ctx: typer.Context,
    prompt: Optional[list[str]] = typer.Option(None, "--prompt", help="A prompt (repeatable)."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="A file with one prompt per line."),
    out: Path = typer.Option(..., "--out", help="Output folder: one PNG and one JSON sidecar per image."),
    n: int = typer.Option(1, "-n", min=1, help="Images per prompt."),
    strategies: str = typer.Option("default", "--strategies",
                                   help="Comma-separated: attributes, viper, ip_adapter, subject, lora, preference, "
                                        "rerank; '' for none; 'default': attributes, ip_adapter (when an IP-Adapter "
                                        "is loaded), rerank."),
    adapter: Optional[str] = typer.Option(None, "--adapter",
                                          help="The preference adapter for the `preference` strategy: a folder from "
                                               "`mmpersona adapter train`, or a hub id."),
    steps: int = typer.Option(30, "--steps", min=1), seed: int = typer.Option(0, "--seed"),
    guidance: float = typer.Option(7.5, "--guidance"),
    xl: bool = typer.Option(False, "--xl", help="Use the SDXL model (t2i_xl)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1,
                                             help="Images per diffusers call at most, each decoded on its own "
                                                  "(VAE slicing): less GPU memory, the same images."),
    cpu_offload: bool = typer.Option(False, "--cpu-offload", help="Model CPU offload (for small GPUs)."),
    vae_tiling: bool = typer.Option(False, "--vae-tiling", help="Decode in tiles (less memory for big images)."),
) -> None:
    """Batch generation for the user; resumable; data-parallel under `accelerate launch`."""
    from pipelines.batch import generate_batch, read_prompts

    s = settings(ctx)
    items = read_prompts(prompt or [], prompts)
    names = None if strategies.strip() == "default" else [x.strip() for x in strategies.split(",") if x.strip()]
    report = generate_batch(items, out_dir=out, user=s.user, n=n, strategies=names, steps=steps, seed=seed,
                            guidance_scale=guidance, role="t2i_xl" if xl else "t2i", db=s.db, preset=s.preset,
                            device=s.device, dtype=s.dtype, model=s.overrides.get("t2i_xl" if xl else "t2i"),
                            embedder=s.overrides.get("embedder"), progress=not s.json, batch_size=batch_size,
                            load_options={"cpu_offload": cpu_offload, "vae_slicing": batch_size is not None,
                                          "vae_tiling": vae_tiling}, adapter=adapter)
    emit(s, report, f"process {report['process'] + 1}/{report['processes']}: generated {report['generated']} "
                    f"image(s), skipped {report['skipped']} finished prompt(s) -> {out}")
