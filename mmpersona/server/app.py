"""The HTTP API (`mmpersona serve`): concepts, personalized chat and generation, preference events, per user.

Every route under `/v1` needs an API key (`Authorization: Bearer <key>`), and the key's user is the only user
a request can read or change. Chat speaks OpenAI's chat completions protocol (streaming by server-sent
events), so any OpenAI client is a client; generation takes the shape of `/v1/images/generations`. Local model
work (embedding, retrieval, generation) runs in one worker thread from a bounded, fair queue
(`worker.ModelWorker`): a full queue, or a user with too many requests waiting, is a 429 with Retry-After. A
remote VLM's requests go out concurrently from the event loop (`scheduler.RemoteLane`); decoded photos share a
pixel budget (`scheduler.PixelBudget`); a client that disconnects has its work dropped or stopped
(`scheduler.Watch`). Every failure is a JSON body `{"error": {"message", "type", "code"}}`, as OpenAI's API
sends.

This module only assembles: the routes are in `routes/` (one router per resource), the limits in `config`,
the errors in `errors`, what the routes share in `dependencies`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from fastapi import FastAPI

from .. import __version__
from . import errors
from .config import ServeConfig
from .dependencies import Server
from .routes import chat, concepts, conversations, images, memory, profile, service
from .scheduler import PixelBudget, RemoteLane
from .served import Served, chat_pipeline
from .worker import ModelWorker

if TYPE_CHECKING:
    from mmpersona.conceptdb import ConceptDB
    from pipelines.t2i import PersonalizedT2IPipeline
    from pipelines.vlm import PersonalizedVLMPipeline

    from .keys import KeyStore

__all__ = ["ServeConfig", "create_app", "preload_models"]


def create_app(db: "ConceptDB", keys: "KeyStore", *, vlm: "PersonalizedVLMPipeline | Callable | None" = None,
               t2i: "PersonalizedT2IPipeline | Callable | None" = None, config: ServeConfig | None = None,
               worker: ModelWorker | None = None) -> FastAPI:
    """The API over `db`, with users' keys in `keys`.

    `vlm` / `t2i`: the chat and generation pipelines (on `db`), or functions that build them (called in the
    model worker on first use), or None for a server without that part.
    """
    limits = config or ServeConfig()
    worker = worker or ModelWorker(limits.queue_size, per_user=limits.max_user_queue, max_batch=limits.max_batch,
                                   batch_window=limits.batch_window_ms / 1000)
    chat_model = Served("chat", (lambda: chat_pipeline(vlm())) if callable(vlm) and not hasattr(vlm, "db")
                        else chat_pipeline(vlm) if vlm is not None else None)
    image_model = Served("image", t2i)

    app = FastAPI(title="mmpersona", version=__version__,
                  description="Personalized chat (OpenAI-compatible) and generation, your concepts and your "
                              "preference profile. Every /v1 route takes `Authorization: Bearer <API key>`; the "
                              "key's user is the only user a request reaches.")
    app.state.server = Server(db=db, keys=keys, limits=limits, worker=worker,
                              remote=RemoteLane(limits.max_remote_concurrency, limits.queue_size),
                              decode=PixelBudget(limits.max_decode_pixels), chat=chat_model, images=image_model)
    app.state.worker, app.state.limits, app.state.chat, app.state.images = worker, limits, chat_model, image_model
    errors.install(app, limits.max_body_bytes)
    for routes in (service, chat, images, concepts, profile, memory, conversations):
        app.include_router(routes.router)
    return app


def preload_models(app: FastAPI) -> None:
    """Build the app's models now (else on first use), on the model worker's thread: a model that cannot be had
    fails here, with its error.

    On the worker's thread, where every model job runs, so that one thread owns all of torch's work: torch
    computing on two threads starts two OpenMP thread teams, which oversubscribe the cores (on 2 cores, the tiny
    VLM's answers on the worker took about a quarter longer once the main thread had computed too).
    """
    for served in (app.state.chat, app.state.images):
        if served.state == "not loaded":
            app.state.worker.submit(served.get).result()
