"""`mmpersona chat`: ask the VLM about a photo, once or interactively."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from concept_db.types import NEW_CONVERSATION

from ..errors import MmpersonaError
from .settings import emit, open_db, settings


def chat(
    ctx: typer.Context,
    question: Optional[str] = typer.Argument(None, help="Ask once and exit; omit for an interactive chat."),
    image: Optional[Path] = typer.Option(None, "--image", help="The photo the question is about (with --session: "
                                                                "the conversation's last photo unless given)."),
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
    session: Optional[str] = typer.Option(None, "--session",
                                          help="Continue this kept conversation (`mmpersona chats list`); 'new' "
                                               "starts one and prints its id."),
    keep: Optional[bool] = typer.Option(None, "--keep/--no-keep",
                                        help="Keep the conversation to continue later (default: an interactive "
                                             "chat is kept, a single question is not unless --session)."),
) -> None:
    """Ask a VLM about an image with your concepts retrieved and injected (RAP style)."""
    from pipelines.vlm import PersonalizedVLMPipeline

    s = settings(ctx)
    if image is None and session in (None, NEW_CONVERSATION):
        raise MmpersonaError("give the photo with --image (or continue a kept conversation with --session ID)")
    if keep is False and session is not None:
        raise MmpersonaError("--session keeps the conversation: leave out --no-keep")
    with open_db(s) as db:
        conversation = None if session in (None, NEW_CONVERSATION) else db.store.conversation(s.user, session).id
        pipe = PersonalizedVLMPipeline(db, vlm=s.vlm(), detector=s.overrides.get("detector"),
                                       regions=regions, assign=assign, boxes=boxes, marks=marks, verify=verify,
                                       instance=(s.overrides.get("instance") or True) if instance else False,
                                       face=(s.overrides.get("face") or True) if face else False,
                                       preset=s.preset, device=s.device, dtype=s.dtype, k=k,
                                       min_score=min_score, max_new_tokens=max_new_tokens, mode=mode)
        kept = keep if keep is not None else (question is None or session is not None)
        chat_session = pipe.chat(s.user, image, keep=kept, conversation=conversation)
        if question is not None:
            answer = chat_session.ask(question)
            proposed = pipe.remember(s.user, question, answer, source="chat") if remember else []
            concepts = pipe.propose_concepts(s.user, question, chat_session.image, answer) if remember else []
            emit(s, {**answer.to_dict(), "proposed": [e.to_dict() for e in proposed],
                     "proposed_concepts": [p.to_dict() for p in concepts],
                     "conversation": chat_session.conversation_id},
                 "\n".join([_answer_text(answer), *_proposed_lines(proposed),
                            *[_concept_command(p, image) for p in concepts], *_kept_line(chat_session)]))
            return
        if conversation is not None:
            typer.echo(f"continuing {conversation} ({len(chat_session.history) // 2} earlier turns)", err=True)
        try:
            _interactive(s, pipe, chat_session, remember)
        finally:
            for line in _kept_line(chat_session):
                typer.echo(line, err=True)


def _kept_line(session) -> list[str]:
    if session.conversation_id is None:
        return []
    return [f"(kept as conversation {session.conversation_id}: continue it with "
            f"`mmpersona chat --session {session.conversation_id}`)"]


def _interactive(s, pipe, session, remember: bool) -> None:
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
                session.image = line[7:].strip()
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
                typer.echo(json.dumps({**answer.to_dict(), "proposed": [e.to_dict() for e in proposed],
                                       "conversation": session.conversation_id}, default=str))
                continue
            typer.echo("assistant> ", nl=False)
            for piece in pieces:
                typer.echo(piece, nl=False)
            typer.echo("")
            typer.echo(_retrieved_line(session.answers[-1]), err=True)
            if remember:  # after the answer is out: proposing never delays it
                for text in _proposed_lines(pipe.remember(s.user, line, session.answers[-1], source="chat")):
                    typer.echo(text, err=True)
                _confirm_concepts(s, pipe, session, line)
        except MmpersonaError as e:  # one bad turn does not end the conversation
            typer.echo(f"error: {e}", err=True)


def _where(p) -> str:
    return f"the region {','.join(map(str, p.box))} ({p.source})" if p.box else "the whole photo"


def _concept_command(p, image) -> str:
    """How to confirm a concept proposal after a one-shot question: one command."""
    import shlex

    box = f" --box {','.join(map(str, p.box))}" if p.box else ""
    photo = shlex.quote(str(image)) if image is not None else "PHOTO"
    return (f"new concept? {p.handle} ({p.category or 'no category'}) from {_where(p)}: mmpersona concepts add "
            f"{shlex.quote(p.name)} --image {photo}{box} --category {shlex.quote(p.category)} "
            f"--info {shlex.quote(p.info)}")


def _confirm_concepts(s, pipe, session, line: str) -> None:
    """Concepts the user just introduced ("this is my friend Anna"): each added with one 'y'."""
    for p in pipe.propose_concepts(s.user, line, session.image, session.answers[-1]):
        try:
            said = input(f"add {p.handle} ({p.category or 'no category'}{', ' + p.info if p.info else ''}) "
                         f"from {_where(p)}? [y/N] ").strip().lower()
        except EOFError:
            return
        if said in {"y", "yes"}:
            concept = pipe.add_proposed(s.user, p, session.image)
            typer.echo(f"added {concept.handle}", err=True)


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
