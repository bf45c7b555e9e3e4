"""The concept database: concepts, reference images, embeddings and learned tensors, always scoped by owner.

    from concept_db import open_store
    store = open_store("~/.local/share/mmpersona/concepts.db")     # embedded SQLite (default)

One `ConceptStore` protocol, backends chosen by URL: a path or `sqlite:///path` (embedded, the default), or
`postgresql://user:password@host:port/dbname` (PostgreSQL + pgvector, for a service with many users; needs
`pip install "mmpersona[pg]"`). Importing this package does not import numpy.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .store import ConceptStore
from .types import (Concept, ConceptDBError, ConceptNotFound, DuplicateConceptError, InvalidConceptError, Match,
                    ProfileChanged, StoredTensor, UnknownBackendError, normalize_name)

if TYPE_CHECKING:
    from .sql import SQLStore

__all__ = ["Concept", "ConceptDBError", "ConceptNotFound", "ConceptStore", "DuplicateConceptError",
           "InvalidConceptError", "Match", "ProfileChanged", "StoredTensor", "UnknownBackendError", "normalize_name",
           "open_store"]

BACKENDS = ("sqlite", "postgresql")


def open_store(url: str | Path) -> "SQLStore":
    """Open (creating if needed) the concept database at `url`: a file path, `sqlite:///path`, or
    `postgresql://...` / `postgres://...` (a libpq URL; the database needs the pgvector extension)."""
    text = str(url)
    scheme, sep, rest = text.partition("://")
    if not sep or len(scheme) == 1:  # a plain path (Windows drive letters included)
        scheme, rest = "sqlite", text
    if scheme == "sqlite":
        from .sqlite import SQLiteStore

        return SQLiteStore(rest)
    if scheme in ("postgresql", "postgres"):
        from .postgres import PostgresStore

        return PostgresStore(text)
    raise UnknownBackendError(
        f"no concept database backend for {scheme!r} URLs; valid: a file path, sqlite:///path, postgresql://...")
