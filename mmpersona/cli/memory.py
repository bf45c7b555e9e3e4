"""`mmpersona memory`: what the assistant remembers of what you told it (facts, states, proposals)."""

from __future__ import annotations

from typing import Optional

import typer

from ..errors import MmpersonaError
from .settings import emit, open_db, settings

app = typer.Typer(help="Your memory: what you told the assistant about your concepts and yourself.",
                  no_args_is_help=True)


def entry_line(e, handles: dict[str, str]) -> str:
    who = handles.get(e.concept_id, e.concept_id) if e.concept_id else "(you)"
    state = f"state:{e.topic}" if e.kind == "state" else "fact"
    flag = "proposed" if e.status == "proposed" else "replaced" if e.superseded_by else "current"
    return f"{e.id}  {flag:<9} {state:<18} {who:<16} {e.text}"


def _handles(db, user: str, entries) -> dict[str, str]:
    ids = sorted({e.concept_id for e in entries if e.concept_id})
    return {cid: c.handle for cid, c in db.store.get_many(user, ids).items()} if ids else {}


@app.command("list")
def memory_list(
    ctx: typer.Context,
    concept: Optional[str] = typer.Option(None, "--concept", help="Only the entries about this concept."),
    proposed: bool = typer.Option(False, "--proposed", help="Only the proposals waiting for your answer."),
    current: bool = typer.Option(False, "--current", help="Only what holds now (accepted, not replaced)."),
    limit: int = typer.Option(100, "--limit", min=0),
    offset: int = typer.Option(0, "--offset", min=0),
) -> None:
    """Your memory entries, newest first."""
    s = settings(ctx)
    with open_db(s) as db:
        ids = [db.resolve(s.user, concept).id] if concept else None
        entries = db.store.memory(s.user, concept_ids=ids, status="proposed" if proposed else None,
                                  current=current, limit=limit, offset=offset)
        handles = _handles(db, s.user, entries)
    emit(s, {"user": s.user, "entries": [e.to_dict() for e in entries]},
         "\n".join([entry_line(e, handles) for e in entries] + [f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}"]))


@app.command("add")
def memory_add(
    ctx: typer.Context,
    text: str = typer.Argument(..., help="What to remember, e.g. \"Bo's bed is on the balcony.\""),
    concept: Optional[str] = typer.Option(None, "--concept", help="The concept it is about (none: about you)."),
    state: Optional[str] = typer.Option(None, "--state", help="A state of this topic (e.g. bed, age): it replaces "
                                                              "the concept's earlier state of the topic."),
) -> None:
    """Remember something yourself (accepted at once)."""
    s = settings(ctx)
    with open_db(s) as db:
        cid = db.resolve(s.user, concept).id if concept else None
        e = db.store.add_memory(s.user, text, concept_id=cid, kind="state" if state else "fact", topic=state or "",
                                source="user")
        line = entry_line(e, _handles(db, s.user, [e]))
    emit(s, e.to_dict(), f"remembered {line}")


@app.command("edit")
def memory_edit(
    ctx: typer.Context,
    entry: str = typer.Argument(..., help="The entry's id (`memory list`)."),
    text: Optional[str] = typer.Option(None, "--text"),
    concept: Optional[str] = typer.Option(None, "--concept", help="Move it to this concept ('-': about you)."),
    state: Optional[str] = typer.Option(None, "--state", help="Make it a state of this topic ('-': a fact)."),
) -> None:
    """Change an entry's text, concept or kind."""
    s = settings(ctx)
    with open_db(s) as db:
        fields: dict = {}
        if text is not None:
            fields["text"] = text
        if concept is not None:
            fields["concept_id"] = None if concept == "-" else db.resolve(s.user, concept).id
        if state is not None:
            fields.update(kind="fact", topic="") if state == "-" else fields.update(kind="state", topic=state)
        if not fields:
            raise MmpersonaError("nothing to change: give --text, --concept or --state")
        e = db.store.update_memory(s.user, entry, **fields)
        line = entry_line(e, _handles(db, s.user, [e]))
    emit(s, e.to_dict(), f"changed {line}")


@app.command("accept")
def memory_accept(ctx: typer.Context, entries: list[str] = typer.Argument(..., help="Proposed entries' ids.")) -> None:
    """Accept proposals: from now on they are used when answering."""
    s = settings(ctx)
    with open_db(s) as db:
        done = [db.store.update_memory(s.user, e, status="accepted") for e in entries]
    emit(s, {"accepted": [e.to_dict() for e in done]}, f"accepted {len(done)} entr{'y' if len(done) == 1 else 'ies'}")


@app.command("rm")
def memory_rm(ctx: typer.Context, entries: list[str] = typer.Argument(..., help="Entries' ids (a proposal "
                                                                                 "removed is rejected).")) -> None:
    """Forget entries (a state they replaced holds again)."""
    s = settings(ctx)
    with open_db(s) as db:
        for e in entries:
            db.store.delete_memory(s.user, e)
    emit(s, {"removed": entries}, f"removed {len(entries)} entr{'y' if len(entries) == 1 else 'ies'}")


@app.command("auto-accept")
def memory_auto_accept(ctx: typer.Context, on: bool = typer.Argument(..., help="true or false.")) -> None:
    """Accept what the assistant proposes to remember without asking (or ask again)."""
    from pipelines.memory import AUTO_ACCEPT_SETTING

    s = settings(ctx)
    with open_db(s) as db:
        db.store.set_setting(s.user, AUTO_ACCEPT_SETTING, bool(on))
    emit(s, {"auto_accept": bool(on)}, f"auto-accept {'on' if on else 'off'}")
