"""The service itself: health (no key) and the served models."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from ... import __version__
from ..dependencies import Server, server, user_of

router = APIRouter(tags=["service"])


@router.get("/health")
def health(srv: Server = Depends(server)) -> dict[str, Any]:
    """Liveness (no key needed). Load (the models' state, the worker queue, the remote lane) only when the server
    runs with `--health-detail`: it tells anyone when other users are busy."""
    if not srv.limits.health_detail:
        return {"status": "ok", "version": __version__}
    worker = srv.worker
    return {"status": "ok", "version": __version__,
            "models": {"chat": srv.chat.state, "images": srv.images.state},
            "queue": {"waiting": worker.waiting, "size": worker.queue_size, "busy": worker.busy},
            "remote": {"in_flight": srv.remote.in_flight, "waiting": srv.remote.waiting,
                       "size": srv.remote.concurrency}}


@router.get("/v1/models")
def models(user: str = Depends(user_of), srv: Server = Depends(server)) -> dict[str, Any]:
    data = []
    for served, kind in ((srv.chat, "chat"), (srv.images, "images")):
        if served.state == "loaded":
            pipe = served.get()
            spec = (pipe.vlm if kind == "chat" else pipe.t2i).spec
            data.append({"id": spec.id, "object": "model", "created": 0, "owned_by": "mmpersona",
                         "mmpersona": {"kind": kind}})
        elif served.state == "not loaded":
            data.append({"id": f"mmpersona-{kind}", "object": "model", "created": 0, "owned_by": "mmpersona",
                         "mmpersona": {"kind": kind, "state": "not loaded"}})
    return {"object": "list", "data": data}
