"""`mmpersona chats`: your kept conversations (`mmpersona chat` keeps them; `chat --session ID` continues one)."""

from __future__ import annotations

import time

import typer

from .settings import emit, open_db, settings

app = typer.Typer(help="Your kept conversations: list, read, rename, delete.", no_args_is_help=True)


def chat_line(c) -> str:
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(c.updated))
    return f"{c.id}  {when}  {c.turns:>4} turn{'' if c.turns == 1 else 's'}  {c.title or '(untitled)'}"


@app.command("list")
def chats_list(
    ctx: typer.Context,
    limit: int = typer.Option(50, "--limit", min=0),
    offset: int = typer.Option(0, "--offset", min=0),
) -> None:
    """Your conversations, the most recently continued first."""
    s = settings(ctx)
    with open_db(s) as db:
        chats = db.store.conversations(s.user, limit=limit, offset=offset)
    emit(s, {"user": s.user, "conversations": [c.to_dict() for c in chats]},
         "\n".join([chat_line(c) for c in chats] + [f"{len(chats)} conversation{'' if len(chats) == 1 else 's'}"]))


@app.command("show")
def chats_show(
    ctx: typer.Context,
    conversation: str = typer.Argument(..., help="The conversation's id (`chats list`)."),
    last: int = typer.Option(0, "--last", min=0, help="Only the last N turns (0: all)."),
) -> None:
    """A conversation's turns, oldest first."""
    s = settings(ctx)
    with open_db(s) as db:
        chat = db.store.conversation(s.user, conversation)
        turns = db.store.turns(s.user, chat.id, last=last or None)
    lines = [chat_line(chat)]
    for t in turns:
        photo = f"  [photo {t.image[:12]}]" if t.image else ""
        lines += [f"you> {t.question}{photo}", f"assistant> {t.answer}"]
    emit(s, {**chat.to_dict(), "messages": [t.to_dict() for t in turns]}, "\n".join(lines))


@app.command("rename")
def chats_rename(
    ctx: typer.Context,
    conversation: str = typer.Argument(...),
    title: str = typer.Argument(...),
) -> None:
    """Give a conversation a title."""
    s = settings(ctx)
    with open_db(s) as db:
        chat = db.store.rename_conversation(s.user, conversation, title)
    emit(s, chat.to_dict(), chat_line(chat))


@app.command("rm")
def chats_rm(
    ctx: typer.Context,
    conversations: list[str] = typer.Argument(..., help="Ids of the conversations to delete."),
) -> None:
    """Delete conversations, their turns and the photos nothing else uses."""
    s = settings(ctx)
    with open_db(s) as db:
        for cid in conversations:
            db.store.delete_conversation(s.user, cid)
    emit(s, {"deleted": conversations}, f"deleted {len(conversations)} conversation(s)")
