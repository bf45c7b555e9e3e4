"""Your kept conversations: chats continued by passing their id as `conversation` in a chat request."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query

from ..dependencies import Server, server, user_of
from ..errors import ApiError
from ..schemas import ConversationPatch

router = APIRouter(tags=["conversations"])


@router.get("/v1/conversations")
def conversations_list(limit: int = Query(50, ge=0), offset: int = Query(0, ge=0), user: str = Depends(user_of),
                       srv: Server = Depends(server)) -> dict[str, Any]:
    """Your conversations, the most recently continued first."""
    if limit > srv.limits.max_list:
        raise ApiError(400, f"limit {limit} is over the limit of {srv.limits.max_list}")
    chats = srv.db.store.conversations(user, limit=limit, offset=offset)
    return {"object": "list", "data": [{"object": "conversation", **c.to_dict()} for c in chats]}


@router.get("/v1/conversations/{conversation_id}")
def conversation_read(conversation_id: str, last: int = Query(0, ge=0), user: str = Depends(user_of),
                      srv: Server = Depends(server)) -> dict[str, Any]:
    """A conversation and its turns, oldest first (the `last` ones only; 0: all, up to the list limit). A turn's
    photo is `GET /v1/media/{image}`."""
    store = srv.db.store
    chat = store.conversation(user, conversation_id)
    turns = store.turns(user, chat.id, last=min(last or srv.limits.max_list, srv.limits.max_list))
    return {"object": "conversation", **chat.to_dict(), "turns_shown": len(turns),
            "data": [t.to_dict() for t in turns]}


@router.patch("/v1/conversations/{conversation_id}")
def conversation_rename(conversation_id: str, body: ConversationPatch, user: str = Depends(user_of),
                        srv: Server = Depends(server)) -> dict[str, Any]:
    return {"object": "conversation", **srv.db.store.rename_conversation(user, conversation_id, body.title).to_dict()}


@router.delete("/v1/conversations/{conversation_id}")
def conversation_delete(conversation_id: str, user: str = Depends(user_of),
                        srv: Server = Depends(server)) -> dict[str, Any]:
    """Forget a conversation, its turns and the photos nothing else of yours uses."""
    srv.db.store.delete_conversation(user, conversation_id)
    return {"id": conversation_id, "object": "conversation", "deleted": True}
