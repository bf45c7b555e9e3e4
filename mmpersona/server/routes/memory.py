"""Your memory: what you told the assistant about your concepts and yourself (facts, states, proposals)."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends, Query

from ..dependencies import Server, server, user_of
from ..errors import ApiError
from ..schemas import MemoryPatch, MemoryRequest

router = APIRouter(tags=["memory"])


def _concept_id(srv: Server, user: str, name: str | None) -> str | None:
    return srv.db.resolve(user, name).id if name else None


@router.get("/v1/memory")
def memory_list(concept: str | None = None, status: Literal["proposed", "accepted"] | None = None,
                current: bool = False, limit: int = Query(100, ge=0), offset: int = Query(0, ge=0),
                user: str = Depends(user_of), srv: Server = Depends(server)) -> dict[str, Any]:
    """Your entries, newest first: of one `concept`, by `status`, or only the `current` ones."""
    if limit > srv.limits.max_list:
        raise ApiError(400, f"limit {limit} is over the limit of {srv.limits.max_list}")
    ids = [_concept_id(srv, user, concept)] if concept else None
    entries = srv.db.store.memory(user, concept_ids=ids, status=status, current=current, limit=limit, offset=offset)
    return {"object": "list", "data": [e.to_dict() for e in entries]}


@router.post("/v1/memory", status_code=201)
def memory_add(body: MemoryRequest, user: str = Depends(user_of), srv: Server = Depends(server)) -> dict[str, Any]:
    """Remember something (accepted at once): a fact, or with `topic` a state that replaces the earlier one."""
    return srv.db.store.add_memory(user, body.text, concept_id=_concept_id(srv, user, body.concept),
                                   kind="state" if body.topic else "fact", topic=body.topic or "",
                                   source="user").to_dict()


@router.patch("/v1/memory/{entry_id}")
def memory_edit(entry_id: str, body: MemoryPatch, user: str = Depends(user_of),
                srv: Server = Depends(server)) -> dict[str, Any]:
    """Accept a proposal (`status: accepted`), or change an entry's text, concept or topic."""
    fields: dict[str, Any] = {}
    if body.text is not None:
        fields["text"] = body.text
    if body.status is not None:
        fields["status"] = body.status
    if body.concept is not None:
        fields["concept_id"] = _concept_id(srv, user, body.concept)
    if body.topic is not None:
        fields.update(kind="state" if body.topic else "fact", topic=body.topic)
    if not fields:
        raise ApiError(400, "nothing to change: give text, status, concept or topic")
    return srv.db.store.update_memory(user, entry_id, **fields).to_dict()


@router.delete("/v1/memory/{entry_id}")
def memory_forget(entry_id: str, user: str = Depends(user_of), srv: Server = Depends(server)) -> dict[str, Any]:
    """Forget an entry (a rejected proposal, or one no longer true: a state it replaced holds again)."""
    srv.db.store.delete_memory(user, entry_id)
    return {"id": entry_id, "object": "memory.entry", "deleted": True}
