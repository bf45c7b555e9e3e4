"""`mmpersona chat`: ask the VLM about a photo, once or interactively."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ..errors import MmpersonaError
from .settings import emit, open_db, settings


def chat(
    ctx: typer.Context,
    question: Optional[str] = typer.Argument(None, help="Ask once and exit; omit for an interactive chat."),
    image: Path = typer.Option(..., "--image", help="The photo the question is about."),
    k: int = typer.Option(3, "-k", min=1, help="Concepts retrieved per source."),
    min_score: Optional[float] = typer.Option(None, "--min-score", help="Threshold (default: calibrated)."),
    regions: bool = typer.Option(False, "--regions", help="Also retrieve per detected region."),
    assign: bool = typer.Option(False, "--assign", help="Regions: one concept per region, one region per concept."),
    boxes: bool = typer.Option(False, "--boxes", help="Tell the model each region concept's box."),
    marks: bool = typer.Option(False, "--marks", help="Draw numbered marks on the photo, named in the prompt."),
    verify: bool = typer.Option(False, "--verify", help="Let the VLM confirm each retrieved concept first."),
    instance: bool = typer.Option(False, "--instance", help="Match images with DINOv2 beside CLIP (fused)."),
    face: bool = typer.Option(False, "--face", help="Find person concepts by face (dlib; the face extra)."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", min=1),
    mode: str = typer.Option("retrieval", "--mode", help="retrieval, tokens (learned) or hybrid."),
    remember: bool = typer.Option(True, "--remember/--no-remember",
                                  help="Propose memory entries from what you say (after each answer)."),
) -> None:
    """Ask a VLM about an image with your concepts retrieved and injected (RAP style)."""
    from pipelines.vlm import PersonalizedVLMPipeline

    from ..images import load_image

    s = settings(ctx)
    with open_db(s) as db:
        pipe = PersonalizedVLMPipeline(db, vlm=s.vlm(), detector=s.overrides.get("detector"),
                                       regions=regions, assign=assign, boxes=boxes, marks=marks, verify=verify,
                                       instance=(s.overrides.get("instance") or True) if instance else False,
                                       face=(s.overrides.get("face") or True) if face else False,
                                       preset=s.preset, device=s.device, dtype=s.dtype, k=k,
                                       min_score=min_score, max_new_tokens=max_new_tokens, mode=mode)
        if question is not None:
            answer = pipe(image, question, user=s.user)
            proposed = pipe.remember(s.user, question, answer, source="chat") if remember else []
            emit(s, {**answer.to_dict(), "proposed": [e.to_dict() for e in proposed]},
                 "\n".join([_answer_text(answer), *_proposed_lines(proposed)]))
            return
        session = pipe.chat(s.user, image)
        typer.echo("Interactive chat: type a question; '/image PATH' changes the photo; '/quit' or Ctrl-D ends.",
                   err=True)
        while True:
            try:
                line = input("you> ").strip()
            except EOFError:
                break
            if not line:
                continue
            if line in {"/quit", "/exit"}:
                break
            if line.startswith("/image "):
                try:
                    session.image = load_image(line[7:].strip())
                except MmpersonaError as e:
                    typer.echo(f"error: {e}", err=True)
                    continue
                typer.echo(f"image: {line[7:].strip()}", err=True)
                continue
            try:
                pieces = session.stream(line) if not s.json else None
                if pieces is None:
                    answer = session.ask(line)
                    proposed = pipe.remember(s.user, line, answer, source="chat") if remember else []
                    typer.echo(json.dumps({**answer.to_dict(), "proposed": [e.to_dict() for e in proposed]},
                                          default=str))
                    continue
                typer.echo("assistant> ", nl=False)
                for piece in pieces:
                    typer.echo(piece, nl=False)
                typer.echo("")
                typer.echo(_retrieved_line(session.answers[-1]), err=True)
                if remember:  # after the answer is out: proposing never delays it
                    for text in _proposed_lines(pipe.remember(s.user, line, session.answers[-1], source="chat")):
                        typer.echo(text, err=True)
            except MmpersonaError as e:  # one bad turn does not end the conversation
                typer.echo(f"error: {e}", err=True)


def _retrieved_line(answer) -> str:
    if answer.abstained:
        line = "(no concept recognised: answered without personal context)"
    else:
        line = "(used " + ", ".join(f"{r.concept.handle} {r.source} {r.score:.3f}" for r in answer.retrieved) + ")"
    if answer.memory:
        line += f"\n(remembered: {len(answer.memory)} entr{'y' if len(answer.memory) == 1 else 'ies'})"
    return line


def _proposed_lines(entries) -> list[str]:
    verb = "remembered" if entries and entries[0].status == "accepted" else "to remember? (mmpersona memory accept ID)"
    return [f"{verb}: {e.id} {e.text}" for e in entries]


def _answer_text(answer) -> str:
    return f"{answer.answer}\n{_retrieved_line(answer)}"
