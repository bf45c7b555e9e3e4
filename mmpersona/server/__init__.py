"""`mmpersona serve`: the HTTP API for applications (FastAPI + uvicorn; the `serve` extra).

    from mmpersona.server import create_app, KeyStore
    app = create_app(db, KeyStore("keys.json"), vlm=chat_pipeline, t2i=image_pipeline)

`app` assembles the API: the routes, one router per resource, are in `routes/` (`service`, `chat`, `images`,
`concepts`, `profile`); `config` holds the limits, `errors` the error bodies and handlers, `dependencies` what the
routes share (`Server`) and the caller's user, `served` the served pipelines, `media` data URLs in and PNGs out,
`keys` the per-user API keys (a file, or the PostgreSQL database), `worker` the fair queue of local model jobs,
`scheduler` the remote VLM lane, the budget of decoded pixels and the watch on disconnecting clients.
"""

from __future__ import annotations

from .._lazy import lazy_exports

_EXPORTS = {
    "create_app": "mmpersona.server.app",
    "ServeConfig": "mmpersona.server.config",
    "KeyStore": "mmpersona.server.keys",
    "DatabaseKeyStore": "mmpersona.server.keys",
    "open_keys": "mmpersona.server.keys",
    "ModelWorker": "mmpersona.server.worker",
    "QueueFull": "mmpersona.server.worker",
}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports("mmpersona.server", _EXPORTS, globals())
