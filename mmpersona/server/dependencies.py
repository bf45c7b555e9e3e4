"""What every route depends on: the server's shared parts (`Server`) and the caller's user, from the API key."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from pipelines.taste import ShownPairs

from .errors import ApiError

if TYPE_CHECKING:
    from mmpersona.conceptdb import ConceptDB

    from .config import ServeConfig
    from .keys import KeyStore
    from .scheduler import PixelBudget, RemoteLane
    from .served import Served
    from .worker import ModelWorker


@dataclass(frozen=True)
class Server:
    """The parts the routes share: the database, the keys, the limits, the lanes work goes through (the model
    worker for local models, the remote lane for a remote VLM, the budget of decoded pixels) and the served
    models. One per app, in `app.state.server`."""

    db: "ConceptDB"
    keys: "KeyStore"
    limits: "ServeConfig"
    worker: "ModelWorker"
    remote: "RemoteLane"
    decode: "PixelBudget"
    chat: "Served"
    images: "Served"
    taste: ShownPairs = field(default_factory=ShownPairs)  # the pairs `next-pair` showed each user
    taste_filling: threading.Lock = field(default_factory=threading.Lock)  # held while the taste pool is generated


bearer = HTTPBearer(auto_error=False, description="An API key from `mmpersona keys create --user NAME`.")


async def server(request: Request) -> Server:
    return request.app.state.server


async def user_of(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> str:
    """The user of the request's API key (401 without a valid one)."""
    # async: a dict lookup and one stat, not worth a threadpool hop on every request
    if credentials is None:
        raise ApiError(401, "missing API key: send `Authorization: Bearer <key>` (create a key with "
                            "`mmpersona keys create --user NAME`)", "authentication_error", "missing_api_key")
    keys = request.app.state.server.keys
    if getattr(keys, "blocking", False):  # a database query: not on the event loop
        from starlette.concurrency import run_in_threadpool

        user = await run_in_threadpool(keys.user_for, credentials.credentials)
    else:
        user = keys.user_for(credentials.credentials)
    if user is None:
        raise ApiError(401, "invalid API key", "authentication_error", "invalid_api_key")
    return user
