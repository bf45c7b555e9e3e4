"""`mmpersona serve`: the HTTP API."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import typer

from .keys import KEYS_OPTION
from .settings import settings


def serve(
    ctx: typer.Context,
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, "--port", min=1, max=65535),
    keys: Optional[Path] = KEYS_OPTION,
    chat: bool = typer.Option(True, "--chat/--no-chat", help="Serve personalized chat (the vlm role)."),
    images: bool = typer.Option(True, "--images/--no-images", help="Serve personalized generation (t2i)."),
    xl: bool = typer.Option(False, "--xl", help="Generate with the SDXL model (t2i_xl)."),
    adapter: Optional[str] = typer.Option(None, "--adapter", help="The preference adapter (folder or hub id)."),
    preload: bool = typer.Option(True, "--preload/--lazy", help="Load the models at start-up (else on first use)."),
    queue_size: int = typer.Option(32, "--queue-size", min=1,
                                   help="Local model jobs that may wait; more are answered 429 with Retry-After."),
    max_user_queue: int = typer.Option(4, "--max-user-queue", min=1,
                                       help="Local model jobs one user may have waiting (fairness: one user's "
                                            "flood is refused while the others are served)."),
    max_remote_concurrency: int = typer.Option(32, "--max-remote-concurrency", min=1,
                                               help="Requests in flight at once to a remote VLM server "
                                                    "(--model vlm=openai:URL#MODEL)."),
    max_batch: int = typer.Option(8, "--max-batch", min=1,
                                  help="Chat requests a local VLM answers in one batched generation."),
    batch_window_ms: int = typer.Option(0, "--batch-window-ms", min=0,
                                        help="How long a batch waits for more requests once it could start "
                                             "(requests already being received are waited for up to 50 ms)."),
    max_tokens: int = typer.Option(512, "--max-tokens", min=1, help="Longest answer a request may ask for."),
    max_image_steps: int = typer.Option(480, "--max-image-steps", min=1,
                                        help="Most work one generation may ask for: images (reranking's candidates "
                                             "included) x steps x pixels / the model's native pixels."),
    max_decode_mpixels: float = typer.Option(134.2, "--max-decode-mpixels", min=1.0,
                                             help="Megapixels of decoded photos held at once (the default: "
                                                  "two 8192x8192 photos, about 1.5 GB at peak); requests wait "
                                                  "for room."),
    batch_size: int = typer.Option(4, "--batch-size", min=1,
                                   help="Images per diffusers call (reranking's candidates too); decoded one at "
                                        "a time (VAE slicing)."),
    cpu_offload: bool = typer.Option(False, "--cpu-offload", help="Model CPU offload (for small GPUs)."),
    vae_tiling: bool = typer.Option(False, "--vae-tiling", help="Decode in tiles (less memory for big images)."),
    max_body_mb: float = typer.Option(32.0, "--max-body-mb", min=0.01, help="Largest request body."),
    face: bool = typer.Option(False, "--face", help="Chat also finds person concepts by face (dlib; the face "
                                                    "extra); loaded with the chat model."),
    health_detail: bool = typer.Option(False, "--health-detail",
                                       help="/health also shows the models' state, the queue and the remote lane "
                                            "(to anyone who can reach it: for a private monitoring network)."),
) -> None:
    """The HTTP API for applications: OpenAI-compatible chat, generation, concepts and preferences per API key."""
    try:
        import uvicorn

        from ..server.app import ServeConfig, create_app, preload_models
    except ImportError as e:
        from ..errors import MissingDependencyError

        raise MissingDependencyError(f'`mmpersona serve` needs FastAPI and uvicorn ({e}): pip install '
                                     '"mmpersona[serve]"') from e
    from pipelines import PersonalizedT2IPipeline, PersonalizedVLMPipeline

    from ..conceptdb import ConceptDB
    from ..server.keys import open_keys

    s = settings(ctx)
    load = {"preset": s.preset, "device": s.device, "dtype": s.dtype}
    from concept_db.types import Quota

    # many users share it: each stores at most the quota (MMPERSONA_QUOTA_IMAGES / _EVENTS / _MB)
    db = ConceptDB(s.db, embedder=s.overrides.get("embedder"), quota=Quota.from_env(), **load)
    store = open_keys(s.db, keys, store=db.store)
    if not store.list():
        typer.echo(f"note: no API keys in {store.path} yet: create one with `mmpersona keys create --user NAME`",
                   err=True)
    role = "t2i_xl" if xl else "t2i"
    config = ServeConfig(queue_size=queue_size, max_body_bytes=int(max_body_mb * 2**20), max_tokens=max_tokens,
                         default_max_tokens=min(128, max_tokens), max_user_queue=max_user_queue,
                         max_remote_concurrency=max_remote_concurrency, max_image_steps=max_image_steps,
                         max_decode_pixels=int(max_decode_mpixels * 1e6), max_batch=max_batch,
                         batch_window_ms=batch_window_ms, health_detail=health_detail)

    def make_chat():
        return PersonalizedVLMPipeline(db, vlm=s.vlm(), max_new_tokens=config.default_max_tokens,
                                       face=(s.overrides.get("face") or True) if face else False, **load)

    def make_images():
        return PersonalizedT2IPipeline(db, t2i=s.overrides.get(role), role=role, adapter=adapter,
                                       batch_size=batch_size, load_options={"cpu_offload": cpu_offload,
                                                                            "vae_slicing": True,
                                                                            "vae_tiling": vae_tiling}, **load)

    api = create_app(db, store, vlm=make_chat if chat else None, t2i=make_images if images else None, config=config)
    if preload:  # a model that cannot be had fails here, before the server listens
        preload_models(api)
    typer.echo(f"serving on http://{host}:{port} (API docs: /docs; health: /health)", err=True)
    uvicorn.run(api, host=host, port=port, log_level="info" if logging.getLogger().level <= logging.INFO else
                "warning")
