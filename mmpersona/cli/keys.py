"""`mmpersona keys`: the API keys of `mmpersona serve`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .settings import emit, settings

app = typer.Typer(help="API keys for `mmpersona serve`: each belongs to one user (stored hashed).",
                  no_args_is_help=True)

KEYS_OPTION = typer.Option(None, "--keys", envvar="MMPERSONA_KEYS",
                           help="The API keys file (default: the PostgreSQL database when --db is one, else "
                                "api_keys.json in the data dir; env MMPERSONA_KEYS).")


@app.command("create")
def keys_create(ctx: typer.Context, user: Optional[str] = typer.Option(None, "--user",
                                                                       help="Whose key (default: the global --user)."),
                name: str = typer.Option("", "--name", help="A label, e.g. the application using it."),
                keys: Optional[Path] = KEYS_OPTION) -> None:
    """Create an API key for a user; it is printed once (only its hash is kept)."""
    from ..server.keys import open_keys

    s = settings(ctx)
    store = open_keys(s.db, keys)
    record, key = store.create(user or s.user, name)
    emit(s, {**record.public(), "key": key},
         f"API key for {record.user} (id {record.id}); shown only now, keep it secret:\n{key}")


@app.command("list")
def keys_list(ctx: typer.Context, user: Optional[str] = typer.Option(None, "--user", help="Only this user's."),
              keys: Optional[Path] = KEYS_OPTION) -> None:
    """The API keys (ids, users, labels; never the keys)."""
    from ..server.keys import open_keys

    s = settings(ctx)
    records = [r.public() for r in open_keys(s.db, keys).list(user)]
    emit(s, records, "\n".join(f"{r['id']}  {r['user']}  {r['name'] or '-'}" for r in records) or "no API keys")


@app.command("revoke")
def keys_revoke(ctx: typer.Context, key_id: str = typer.Argument(..., help="The key's id (see `keys list`)."),
                keys: Optional[Path] = KEYS_OPTION) -> None:
    """Revoke an API key: a running server refuses it from the next request on."""
    from ..server.keys import open_keys

    s = settings(ctx)
    record = open_keys(s.db, keys).revoke(key_id)
    emit(s, record.public(), f"revoked {record.id} ({record.user})")
