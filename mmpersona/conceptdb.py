"""`ConceptDB`: the concept store plus the embedder, as a user of the toolkit meets it.

    from mmpersona import ConceptDB
    db = ConceptDB("concepts.db", preset="tiny")
    db.add("alice", "<bo>", ["bo1.jpg", "bo2.jpg"], category="dog", info="Alice's Shiba Inu")
    db.search_image("alice", "photo.jpg", k=3)

Images are checked by the project's safe loader before anything is written; each distinct image (by content
hash) is embedded once per user (never reusing another user's
vector: see `ConceptStore.known_vectors`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from .images import ImageInput, load_image_bytes

if TYPE_CHECKING:
    from concept_db import Concept, Match
    from concept_db.types import Quota

    from .embedder import ClipEmbedder


class ConceptDB:
    """A concept database at `path` (default: the user data dir) with a lazily loaded embedder.

    Args:
        path: database file path or URL; None for `mmpersona.paths.default_db_path()`.
        embedder: a loaded `ClipEmbedder`, an embedder model id, or None for the preset's.
        preset, device, dtype: passed to `load_embedder` when the embedder is first needed.
        quota: per-user limits on stored images, events and bytes (`concept_db.types.Quota`; the server and the
            app use `Quota.from_env()`); None: none.
    """

    def __init__(self, path: str | Path | None = None, *, embedder: "ClipEmbedder | str | None" = None,
                 preset: str = "default", device: Any = "auto", dtype: Any = None, quota: "Quota | None" = None):
        from concept_db import open_store

        from .paths import default_db_path

        self.store = open_store(path if path is not None else default_db_path())
        self.store.quota = quota
        self._embedder = embedder if not isinstance(embedder, (str, type(None))) else None
        self._embedder_spec = embedder if isinstance(embedder, str) else None
        self._load_args = {"preset": preset, "device": device, "dtype": dtype}

    @property
    def embedder(self) -> "ClipEmbedder":
        if self._embedder is None:
            from .models import load_embedder

            self._embedder = load_embedder(self._embedder_spec, **self._load_args)
        return self._embedder

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> "ConceptDB":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ writes that embed

    def _prepare(self, user: str, images: Sequence[ImageInput]) -> tuple[list[bytes], dict[str, Any]]:
        """Validate and read every image first, then embed only those the user has no vector of yet."""
        import numpy as np

        from concept_db.types import content_hash

        # refuse corrupt or oversized input, or input over the user's quota, before anything is embedded or written
        datas = [load_image_bytes(item) for item in images]
        if not datas:
            return [], {}
        self.store.check_quota(user, images=len(datas), size=sum(map(len, datas)))  # checked again as it is written
        emb = self.embedder
        hashes = [content_hash(d) for d in datas]
        known = self.store.known_vectors(user, emb.name, hashes)
        todo = [i for i, h in enumerate(hashes) if h not in known]
        fresh = emb.embed_images([datas[i] for i in todo], progress=len(todo) > 32) if todo else None
        vectors = np.empty((len(datas), emb.dim), dtype=np.float32)
        for row, i in enumerate(todo):
            vectors[i] = fresh[row]
        for i, h in enumerate(hashes):
            if h in known:
                vectors[i] = known[h]
        return datas, {emb.name: vectors}

    def add(self, user: str, name: str, images: Sequence[ImageInput] = (), *, category: str = "", info: str = "",
            aliases: Sequence[str] = (), attributes: dict | None = None) -> "Concept":
        """Register a concept with its reference images; nothing is written if any image is unreadable."""
        datas, embeddings = self._prepare(user, images)
        return self.store.add(user, name, category=category, info=info, aliases=aliases, attributes=attributes,
                              images=datas, embeddings=embeddings)

    def add_images(self, user: str, name_or_id: str, images: Sequence[ImageInput]) -> "Concept":
        concept = self.resolve(user, name_or_id)
        datas, embeddings = self._prepare(user, images)
        return self.store.add_images(user, concept.id, datas, embeddings)

    # ------------------------------------------------------------------ import / export

    def import_concepts(self, user: str, path: str | Path, format: str, *, strict: bool = False,
                        progress: bool = True):
        """Import from a RAP `database.json`, a folder of per-concept folders, or our archive.

        Returns an `ImportReport` (added names, skipped items with reasons)."""
        from .concept_io import import_concepts

        return import_concepts(self.store, user, path, format, get_embedder=lambda: self.embedder, strict=strict,
                               progress=progress)

    def export_concepts(self, user: str, path: str | Path, format: str = "archive") -> int:
        """Export `user`'s concepts (`archive`: lossless zip; `rap`; `folder`); returns the count."""
        from .concept_io import export_concepts

        return export_concepts(self.store, user, path, format)

    # ------------------------------------------------------------------ retrieval

    def search_image(self, user: str, image: ImageInput, *, k: int = 5, category: str | None = None,
                     min_score: float | None = None) -> "list[Match]":
        """The user's concepts that look most like `image`."""
        vector = self.embedder.embed_images([image])[0]
        return self.store.search(user, vector, embedder=self.embedder.name, k=k, category=category,
                                 min_score=min_score)

    def search_text(self, user: str, text: str, *, k: int = 5, category: str | None = None,
                    min_score: float | None = None) -> "list[Match]":
        """The user's concepts whose images best match a text description."""
        vector = self.embedder.embed_texts([text])[0]
        return self.store.search(user, vector, embedder=self.embedder.name, k=k, category=category,
                                 min_score=min_score)

    # ------------------------------------------------------------------ plain record operations

    def resolve(self, user: str, name_or_id: str) -> "Concept":
        """A concept by `<name>`, alias or id."""
        from concept_db import ConceptNotFound, InvalidConceptError

        try:
            found = self.store.find(user, name_or_id)
        except InvalidConceptError:
            found = None
        if found is not None:
            return found
        try:
            return self.store.get(user, name_or_id)
        except ConceptNotFound:
            raise ConceptNotFound(f"user {user!r} has no concept {name_or_id!r}") from None

    def get(self, user: str, name_or_id: str) -> "Concept":
        return self.resolve(user, name_or_id)

    def list(self, user: str, *, category: str | None = None, limit: int = 100, offset: int = 0) -> "list[Concept]":
        return self.store.list(user, category=category, limit=limit, offset=offset)

    def update(self, user: str, name_or_id: str, **fields: Any) -> "Concept":
        return self.store.update(user, self.resolve(user, name_or_id).id, **fields)

    def delete(self, user: str, name_or_id: str) -> "Concept":
        """Remove the concept; returns it as it was (for a reply that names it)."""
        concept = self.resolve(user, name_or_id)
        self.store.delete(user, concept.id)
        return concept

    def remove_image(self, user: str, name_or_id: str, image_hash: str) -> "Concept":
        return self.store.remove_image(user, self.resolve(user, name_or_id).id, image_hash)

    def erase_user(self, user: str) -> int:
        """Remove everything of `user`; returns the number of concepts removed."""
        return self.store.erase_owner(user)
