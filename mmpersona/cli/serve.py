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
    queue_size: int = typer.Option(8, "--queue-size", min=1,
                                   help="Model requests that may wait; more are answered 429 with Retry-After."),
    max_body_mb: float = typer.Option(32.0, "--max-body-mb", min=0.01, help="Largest request body."),
    max_tokens: int = typer.Option(512, "--max-tokens", min=1, help="Longest answer a request may ask for."),
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
    from ..server.keys import KeyStore

    s = settings(ctx)
    store = KeyStore(keys)
    if not store.list():
        typer.echo(f"note: no API keys in {store.path} yet: create one with `mmpersona keys create --user NAME`",
                   err=True)
    load = {"preset": s.preset, "device": s.device, "dtype": s.dtype}
    db = ConceptDB(s.db, embedder=s.overrides.get("embedder"), **load)
    role = "t2i_xl" if xl else "t2i"
    config = ServeConfig(queue_size=queue_size, max_body_bytes=int(max_body_mb * 2**20), max_tokens=max_tokens,
                         default_max_tokens=min(128, max_tokens))

    def make_chat():
        return PersonalizedVLMPipeline(db, vlm=s.vlm(), max_new_tokens=config.default_max_tokens, **load)

    def make_images():
        return PersonalizedT2IPipeline(db, t2i=s.overrides.get(role), role=role, adapter=adapter, **load)

    api = create_app(db, store, vlm=make_chat if chat else None, t2i=make_images if images else None, config=config)
    if preload:  # a model that cannot be had fails here, before the server listens
        preload_models(api)
    typer.echo(f"serving on http://{host}:{port} (API docs: /docs; health: /health)", err=True)
    uvicorn.run(api, host=host, port=port, log_level="info" if logging.getLogger().level <= logging.INFO else
                "warning")
