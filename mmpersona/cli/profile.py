"""`mmpersona profile`: the text-to-image preference profile."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .settings import Settings, emit, open_db, settings

app = typer.Typer(help="Your text-to-image preference profile: likes, dislikes, choices, attributes.",
                  no_args_is_help=True)


def open_profile(s: Settings, db):
    from ..preferences import PreferenceProfile

    return PreferenceProfile(db, s.user)


def _record(ctx: typer.Context, kind: str, image: Path, comment: str) -> None:
    s = settings(ctx)
    with open_db(s) as db:
        e = getattr(open_profile(s, db), kind)(image, comment=comment)
    emit(s, e.to_dict(), f"{kind}d {image}")


@app.command("like")
def profile_like(ctx: typer.Context, image: Path = typer.Argument(...),
                 comment: str = typer.Option("", "--comment", help="What you like about it.")) -> None:
    """Record an image you like (with an optional comment)."""
    _record(ctx, "like", image, comment)


@app.command("dislike")
def profile_dislike(ctx: typer.Context, image: Path = typer.Argument(...),
                    comment: str = typer.Option("", "--comment", help="What you dislike about it.")) -> None:
    """Record an image you dislike (with an optional comment)."""
    _record(ctx, "dislike", image, comment)


@app.command("compare")
def profile_compare(ctx: typer.Context, chosen: Path = typer.Argument(...), rejected: Path = typer.Argument(...),
                    prompt: str = typer.Option(..., "--prompt", help="The prompt both images were made for.")) -> None:
    """Record a pairwise choice: CHOSEN was preferred over REJECTED for --prompt."""
    s = settings(ctx)
    with open_db(s) as db:
        e = open_profile(s, db).compare(prompt, chosen, rejected)
    emit(s, e.to_dict(), f"recorded: {chosen} over {rejected}")


@app.command("show")
def profile_show(ctx: typer.Context) -> None:
    """Counts, attributes and the reward model's state."""
    s = settings(ctx)
    with open_db(s) as db:
        summary = open_profile(s, db).summary()
    a = summary["attributes"]
    emit(s, summary, "\n".join([f"user {s.user}: " + ", ".join(f"{v} {k}s" for k, v in summary["counts"].items()),
                                f"liked attributes: {', '.join(a['liked']) or '-'}",
                                f"disliked attributes: {', '.join(a['disliked']) or '-'}",
                                f"reward model: {summary['reward_model']}"]))


@app.command("edit-attributes")
def profile_edit_attributes(
    ctx: typer.Context,
    liked: Optional[list[str]] = typer.Option(None, "--liked", help="Replace the liked attributes (repeatable)."),
    disliked: Optional[list[str]] = typer.Option(None, "--disliked", help="Replace the disliked ones."),
    extract: bool = typer.Option(False, "--extract", help="Derive them from your comments with the VLM first."),
) -> None:
    """View, derive (ViPer style) or edit the liked / disliked visual attributes."""
    s = settings(ctx)
    with open_db(s) as db:
        profile = open_profile(s, db)
        if extract:
            profile.extract_attributes(s.vlm())
        attrs = profile.set_attributes(liked, disliked) if liked is not None or disliked is not None \
            else profile.attributes
    emit(s, attrs.to_dict(), f"liked: {', '.join(attrs.liked) or '-'}\ndisliked: {', '.join(attrs.disliked) or '-'}")


@app.command("train-reward")
def profile_train_reward(ctx: typer.Context) -> None:
    """Train the personal reward model on your pairs, likes and dislikes; prints its held-out accuracy."""
    s = settings(ctx)
    with open_db(s) as db:
        model = open_profile(s, db).train_reward()
    text = ("no data yet: scores stay neutral (cold start)" if model.cold_start else
            f"trained on {model.pairs} pairs, {model.likes} likes, {model.dislikes} dislikes; held-out pairwise "
            f"accuracy {model.held_out_accuracy if model.held_out_accuracy is not None else 'n/a (too few)'}")
    emit(s, model.summary(), text)


@app.command("train-lora")
def profile_train_lora(
    ctx: typer.Context,
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Training steps (default 200)."),
    rank: Optional[int] = typer.Option(None, "--rank", min=1, help="LoRA rank (default 16)."),
    beta: Optional[float] = typer.Option(None, "--beta", help="DPO strength (default 2000)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Learning rate (default 3e-4)."),
    diversity_floor: Optional[float] = typer.Option(
        None, "--diversity-floor", min=0.0, max=1.0,
        help="Stop (or warn) when the LoRA's images fall under this share of vanilla's diversity (default 0.8; "
             "0: not watched)."),
    diversity_action: Optional[str] = typer.Option(None, "--diversity-action", help="stop (default) or warn."),
    xl: bool = typer.Option(False, "--xl", help="Train for the SDXL model (t2i_xl) instead of SD 1.5."),
    resolution: Optional[int] = typer.Option(None, "--resolution", min=64,
                                             help="Training image size (default: the model's own, 512 / 1024 for "
                                                  "SDXL; 512 or 768 halves or quarters SDXL's memory)."),
) -> None:
    """Train your LoRA with Diffusion-DPO on your pairwise choices (used by `generate --strategies lora`)."""
    from pipelines.dpo import DPOConfig, train_dpo_lora

    from ..models import load_t2i

    s = settings(ctx)
    role = "t2i_xl" if xl else "t2i"
    with open_db(s) as db:
        t2i = load_t2i(s.overrides.get(role), role=role, preset=s.preset, device=s.device, dtype=s.dtype,
                       ip_adapter=False)
        given = {"steps": steps, "rank": rank, "beta": beta, "lr": lr, "resolution": resolution,
                 "diversity_floor": diversity_floor, "diversity_action": diversity_action}
        config = DPOConfig(**{k: v for k, v in given.items() if v is not None})
        result = train_dpo_lora(t2i, db, s.user, config, progress=not s.json)
    warnings = "".join(f"\nwarning: {w}" for w in result.warnings)
    emit(s, {**result.to_dict(), "model": t2i.spec.id},
         f"trained a LoRA for {t2i.spec.id} on {result.pairs} pairs: {result.steps} steps, {result.seconds:.1f}s"
         + warnings)


@app.command("reset")
def profile_reset(ctx: typer.Context) -> None:
    """Forget the whole preference profile (likes, pairs, attributes, reward model, LoRA)."""
    s = settings(ctx)
    with open_db(s) as db:
        n = open_profile(s, db).reset()
    emit(s, {"removed": n}, f"removed {n} profile entries")
