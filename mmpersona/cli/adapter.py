"""`mmpersona adapter`: the preference adapter, trained across many users."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import typer

from ..errors import MmpersonaError
from .settings import emit, open_db, settings

app = typer.Typer(help="The preference adapter: trained once across many users, it personalizes "
                       "generation from a new user's few choices (`generate --strategies preference`).",
                  no_args_is_help=True)


@app.command("train")
def adapter_train(
    ctx: typer.Context,
    out: Path = typer.Option(..., "--out", help="Folder for the adapter, its checkpoints and training.json."),
    pickapic: Optional[list[Path]] = typer.Option(None, "--pickapic",
                                                  help="A Pick-a-Pic parquet file (caption, jpg_0, jpg_1, label_0, "
                                                       "user_id); repeatable."),
    from_db: bool = typer.Option(True, "--from-db/--no-from-db",
                                 help="Also train on every user's pairwise choices in the database."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Read at most this many Pick-a-Pic rows."),
    steps: int = typer.Option(1000, "--steps", min=1),
    batch_size: int = typer.Option(4, "--batch-size", min=1,
                                   help="Users per micro-batch per process (what GPU memory holds at once)."),
    gradient_accumulation: int = typer.Option(8, "--gradient-accumulation", min=1,
                                              help="Micro-batches per optimizer step: a step sees batch size x "
                                                   "this x processes users (32 by default)."),
    lr: float = typer.Option(1e-3, "--lr"), beta: float = typer.Option(1000.0, "--beta"),
    tokens: int = typer.Option(4, "--tokens", min=1, max=64, help="Condition tokens per user."),
    context: int = typer.Option(4, "--context", min=1, help="Pairs that make a user's embedding in training."),
    heldout: float = typer.Option(0.1, "--heldout", min=0.0, max=0.99, help="Share of users held out."),
    resolution: Optional[int] = typer.Option(None, "--resolution", min=8),
    mixed_precision: str = typer.Option("no", "--mixed-precision", help="no, fp16 or bf16 (accelerate)."),
    gradient_checkpointing: bool = typer.Option(True, "--gradient-checkpointing/--no-gradient-checkpointing",
                                                help="Recompute activations in backward (less memory, ~30% slower)."),
    checkpoint_every: int = typer.Option(200, "--checkpoint-every", min=1),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue from the checkpoint in --out."),
    xl: bool = typer.Option(False, "--xl", help="Train for the SDXL model (t2i_xl) instead of SD 1.5."),
) -> None:
    """Train the preference adapter with multi-user Diffusion-DPO (several GPUs under `accelerate launch`)."""
    from pipelines.adapter_training import AdapterTrainConfig, read_pickapic, rows_from_db, train_adapter

    from ..devices import process_device
    from ..models import load_t2i

    s = settings(ctx)
    # under `accelerate launch`, each process loads its models on its own GPU: the state comes first
    state, device = process_device(s.device)
    s = dataclasses.replace(s, device=str(device))
    config = AdapterTrainConfig(tokens=tokens, steps=steps, batch_size=batch_size,
                                gradient_accumulation=gradient_accumulation, lr=lr, beta=beta, context=context,
                                heldout_users=heldout, resolution=resolution, mixed_precision=mixed_precision,
                                gradient_checkpointing=gradient_checkpointing, checkpoint_every=checkpoint_every)
    rows = read_pickapic(pickapic, limit=limit) if pickapic else []
    role = "t2i_xl" if xl else "t2i"
    with open_db(s) as db:
        if from_db:
            rows += rows_from_db(db)
        if not rows:
            raise MmpersonaError("no pairs to train on: pass --pickapic FILE, or record choices with "
                                 "`mmpersona profile compare`")
        t2i = load_t2i(s.overrides.get(role), role=role, preset=s.preset, device=device, dtype=s.dtype,
                       ip_adapter=False)
        result = train_adapter(t2i, db.embedder, rows, out, config, resume=resume, progress=not s.json)
    acc = result.heldout_pair_accuracy
    emit(s, {**result.to_dict(), "model": t2i.spec.id, "process": state.process_index,
             "processes": state.num_processes},
         f"trained the preference adapter for {t2i.spec.id} on {result.train_users} users: {result.steps} steps "
         f"({result.seconds:.1f}s); held-out pair accuracy "
         f"{'n/a' if acc is None else f'{acc:.3f}'} over {len(result.heldout_users)} users -> {out}")
