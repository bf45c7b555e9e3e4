"""The embedded backend: one SQLite file (WAL) plus an in-process, per-owner vector matrix.

Layout: embeddings live in a WITHOUT ROWID table keyed `(owner, embedder, concept_id, image_hash)`, so one
owner's vectors are physically contiguous and load with one range scan, lazily, on that owner's first query.
Writes made through this store update its matrices at once; writes from other processes are noticed through
`PRAGMA data_version` plus a per-owner revision counter, so only the owners that changed are reloaded.
Search is exact (a matrix-vector product over the owner's vectors): at per-owner sizes it is both exact and
faster than the approximate indexes we measured (see shared/STORAGE_FACTS.md).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from .types import (Concept, content_hash, ConceptNotFound, DuplicateConceptError, InvalidConceptError, Match, StoredTensor,
                    check_owner, check_text, normalize_name)

if TYPE_CHECKING:
    import numpy as np

SCHEMA_MIGRATIONS: list[tuple[int, str]] = [
    (1, """
    CREATE TABLE concepts (
        id TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        name TEXT NOT NULL,
        category TEXT NOT NULL DEFAULT '',
        info TEXT NOT NULL DEFAULT '',
        attributes TEXT NOT NULL DEFAULT '{}',
        created REAL NOT NULL,
        updated REAL NOT NULL,
        version INTEGER NOT NULL DEFAULT 1,
        UNIQUE (owner, name)
    );
    CREATE INDEX concepts_owner_category ON concepts (owner, category, name);
    -- names and aliases share one namespace per owner
    CREATE TABLE handles (
        owner TEXT NOT NULL,
        handle TEXT NOT NULL,
        concept_id TEXT NOT NULL REFERENCES concepts (id) ON DELETE CASCADE,
        is_alias INTEGER NOT NULL,
        PRIMARY KEY (owner, handle)
    ) WITHOUT ROWID;
    CREATE TABLE images (
        hash TEXT PRIMARY KEY,
        data BLOB NOT NULL,
        size INTEGER NOT NULL
    );
    CREATE TABLE concept_images (
        concept_id TEXT NOT NULL REFERENCES concepts (id) ON DELETE CASCADE,
        hash TEXT NOT NULL REFERENCES images (hash),
        position INTEGER NOT NULL,
        PRIMARY KEY (concept_id, hash)
    ) WITHOUT ROWID;
    CREATE INDEX concept_images_hash ON concept_images (hash);
    CREATE TABLE embeddings (
        owner TEXT NOT NULL,
        embedder TEXT NOT NULL,
        concept_id TEXT NOT NULL REFERENCES concepts (id) ON DELETE CASCADE,
        image_hash TEXT NOT NULL,
        vector BLOB NOT NULL,
        PRIMARY KEY (owner, embedder, concept_id, image_hash)
    ) WITHOUT ROWID;
    CREATE INDEX embeddings_by_image ON embeddings (image_hash, embedder);
    CREATE TABLE embedders (name TEXT PRIMARY KEY, dim INTEGER NOT NULL);
    CREATE TABLE tensors (
        concept_id TEXT NOT NULL REFERENCES concepts (id) ON DELETE CASCADE,
        name TEXT NOT NULL,
        model TEXT NOT NULL,
        fingerprint TEXT NOT NULL,
        data BLOB NOT NULL,
        created REAL NOT NULL,
        PRIMARY KEY (concept_id, name)
    );
    -- bumped on every write of an owner's data: lets other processes reload only what changed
    CREATE TABLE owner_revisions (owner TEXT PRIMARY KEY, revision INTEGER NOT NULL);
    """),
]


@dataclass
class _OwnerIndex:
    revision: int
    matrix: "np.ndarray"  # (n, dim) float32, rows grouped by concept
    concept_ids: list[str]  # one per group
    starts: "np.ndarray"  # first row of each concept group
    image_hashes: list[str]  # one per row


class SQLiteStore:
    """The embedded `ConceptStore`. Thread-safe; several processes may share one file."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(str(self.path), timeout=30, isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA page_size = 16384")  # 2 KB vectors waste half of a 4 KB page
        self._conn.execute("PRAGMA journal_mode = WAL")
        self._conn.execute("PRAGMA synchronous = NORMAL")
        self._conn.execute("PRAGMA foreign_keys = ON")
        self._migrate()
        self._indexes: dict[tuple[str, str], _OwnerIndex] = {}
        self._data_version = self._read_data_version()

    # ------------------------------------------------------------------ plumbing

    def _migrate(self) -> None:
        with self._tx() as c:
            c.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied REAL)")
            done = {row[0] for row in c.execute("SELECT version FROM schema_migrations")}
            for version, sql in SCHEMA_MIGRATIONS:
                if version not in done:
                    for statement in filter(str.strip, sql.split(";")):
                        c.execute(statement)
                    c.execute("INSERT INTO schema_migrations VALUES (?, ?)", (version, time.time()))

    @property
    def schema_version(self) -> int:
        return self._conn.execute("SELECT max(version) FROM schema_migrations").fetchone()[0]

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; everything in it is committed together or not at all."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _read_data_version(self) -> int:
        return self._conn.execute("PRAGMA data_version").fetchone()[0]

    def _bump(self, c: sqlite3.Connection, owner: str) -> None:
        c.execute("INSERT INTO owner_revisions VALUES (?, 1) ON CONFLICT (owner) DO UPDATE SET revision = revision + 1",
                  (owner,))
        for key in [k for k in self._indexes if k[0] == owner]:
            del self._indexes[key]

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> "SQLiteStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ reading concepts

    def _concept(self, row: sqlite3.Row | tuple) -> Concept:
        cid, owner, name, category, info, attributes, created, updated, version = row
        aliases = tuple(r[0] for r in self._conn.execute(
            "SELECT handle FROM handles WHERE concept_id = ? AND is_alias = 1 ORDER BY handle", (cid,)))
        images = tuple(r[0] for r in self._conn.execute(
            "SELECT hash FROM concept_images WHERE concept_id = ? ORDER BY position", (cid,)))
        return Concept(id=cid, owner=owner, name=name, category=category, info=info, aliases=aliases,
                       attributes=json.loads(attributes), images=images, created=created, updated=updated,
                       version=version)

    _COLUMNS = "id, owner, name, category, info, attributes, created, updated, version"

    def get(self, owner: str, concept_id: str) -> Concept:
        """The owner's concept with this id; another owner's id raises `ConceptNotFound` like a missing one."""
        check_owner(owner)
        with self._lock:
            row = self._conn.execute(f"SELECT {self._COLUMNS} FROM concepts WHERE id = ? AND owner = ?",
                                     (concept_id, owner)).fetchone()
            if row is None:
                raise ConceptNotFound(f"no concept {concept_id!r} for user {owner!r}")
            return self._concept(row)

    def find(self, owner: str, name_or_alias: str) -> Concept | None:
        """Look a concept up by name or alias (`<bo>` or `bo`); None when the owner has none."""
        check_owner(owner)
        handle = normalize_name(name_or_alias)
        with self._lock:
            row = self._conn.execute(
                f"SELECT {', '.join('c.' + c for c in self._COLUMNS.split(', '))} FROM handles h "
                "JOIN concepts c ON c.id = h.concept_id WHERE h.owner = ? AND h.handle = ?", (owner, handle),
            ).fetchone()
            return self._concept(row) if row else None

    def list(self, owner: str, *, category: str | None = None, limit: int = 100, offset: int = 0) -> list[Concept]:
        """The owner's concepts by name, a page at a time, optionally of one category."""
        check_owner(owner)
        if limit < 0 or offset < 0:
            raise InvalidConceptError("limit and offset must not be negative")
        sql = f"SELECT {self._COLUMNS} FROM concepts WHERE owner = ?"
        args: list[Any] = [owner]
        if category is not None:
            sql += " AND category = ?"
            args.append(category)
        with self._lock:
            rows = self._conn.execute(sql + " ORDER BY name LIMIT ? OFFSET ?", (*args, limit, offset)).fetchall()
            return [self._concept(r) for r in rows]

    def count(self, owner: str) -> int:
        check_owner(owner)
        return self._conn.execute("SELECT count(*) FROM concepts WHERE owner = ?", (owner,)).fetchone()[0]

    def categories(self, owner: str) -> list[str]:
        check_owner(owner)
        return [r[0] for r in self._conn.execute(
            "SELECT DISTINCT category FROM concepts WHERE owner = ? AND category != '' ORDER BY category", (owner,))]

    # ------------------------------------------------------------------ writing concepts

    def _check_handles_free(self, c, owner: str, handles: Sequence[str], concept_id: str | None) -> None:
        for handle in handles:
            row = c.execute("SELECT concept_id FROM handles WHERE owner = ? AND handle = ?", (owner, handle)).fetchone()
            if row and row[0] != concept_id:
                raise DuplicateConceptError(f"user {owner!r} already has a concept named or aliased <{handle}>")

    def add(self, owner: str, name: str, *, category: str = "", info: str = "", aliases: Sequence[str] = (),
            attributes: dict | None = None, images: Sequence[bytes] = (),
            embeddings: "dict[str, np.ndarray] | None" = None) -> Concept:
        """Add a concept with its reference images (encoded bytes) and, per embedder, one vector per image.

        All or nothing: a failure anywhere leaves the database as it was.
        """
        check_owner(owner)
        name = normalize_name(name)
        alias_list = _aliases(aliases, name)
        category, info = check_text(category, "category", 200), check_text(info, "info")
        attrs = _attributes(attributes)
        now = time.time()
        cid = uuid.uuid4().hex
        with self._tx() as c:
            self._check_handles_free(c, owner, [name, *alias_list], None)
            c.execute("INSERT INTO concepts VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1)",
                      (cid, owner, name, category, info, attrs, now, now))
            c.executemany("INSERT INTO handles VALUES (?, ?, ?, ?)",
                          [(owner, name, cid, 0)] + [(owner, a, cid, 1) for a in alias_list])
            hashes = self._insert_images(c, cid, images, start=0)
            self._insert_embeddings(c, owner, cid, hashes, embeddings)
            self._bump(c, owner)
        return self.get(owner, cid)

    def update(self, owner: str, concept_id: str, *, name: str | None = None, category: str | None = None,
               info: str | None = None, aliases: Sequence[str] | None = None, attributes: dict | None = None,
               expected_version: int | None = None) -> Concept:
        """Change fields of a concept; `expected_version` turns a concurrent edit into an error, not a loss."""
        current = self.get(owner, concept_id)
        new_name = normalize_name(name) if name is not None else current.name
        new_aliases = _aliases(aliases, new_name) if aliases is not None else list(current.aliases)
        fields = {
            "name": new_name,
            "category": check_text(category, "category", 200) if category is not None else current.category,
            "info": check_text(info, "info") if info is not None else current.info,
            "attributes": _attributes(attributes) if attributes is not None else json.dumps(current.attributes),
        }
        with self._tx() as c:
            self._check_handles_free(c, owner, [new_name, *new_aliases], concept_id)
            cur = c.execute(
                "UPDATE concepts SET name = ?, category = ?, info = ?, attributes = ?, updated = ?, "
                "version = version + 1 WHERE id = ? AND owner = ? AND (? IS NULL OR version = ?)",
                (*fields.values(), time.time(), concept_id, owner, expected_version, expected_version))
            if cur.rowcount == 0:
                raise ConceptDBConflict(f"concept <{current.name}> changed since version {expected_version}")
            c.execute("DELETE FROM handles WHERE concept_id = ?", (concept_id,))
            c.executemany("INSERT INTO handles VALUES (?, ?, ?, ?)",
                          [(owner, new_name, concept_id, 0)] + [(owner, a, concept_id, 1) for a in new_aliases])
            self._bump(c, owner)
        return self.get(owner, concept_id)

    def delete(self, owner: str, concept_id: str) -> None:
        """Delete the owner's concept with its embeddings and tensors; images no longer used are removed."""
        self.get(owner, concept_id)
        with self._tx() as c:
            c.execute("DELETE FROM concepts WHERE id = ? AND owner = ?", (concept_id, owner))
            self._drop_orphan_images(c)
            self._bump(c, owner)

    def erase_owner(self, owner: str) -> int:
        """Remove everything of one owner; returns how many concepts were removed."""
        check_owner(owner)
        with self._tx() as c:
            n = c.execute("DELETE FROM concepts WHERE owner = ?", (owner,)).rowcount
            c.execute("DELETE FROM embeddings WHERE owner = ?", (owner,))
            c.execute("DELETE FROM handles WHERE owner = ?", (owner,))
            self._drop_orphan_images(c)
            self._bump(c, owner)
        return n

    # ------------------------------------------------------------------ images and embeddings

    def _insert_images(self, c, concept_id: str, images: Sequence[bytes], start: int) -> list[str]:
        hashes = []
        for offset, data in enumerate(images):
            if not isinstance(data, (bytes, bytearray)) or not data:
                raise InvalidConceptError(f"image {offset} must be non-empty encoded bytes")
            h = content_hash(bytes(data))
            c.execute("INSERT OR IGNORE INTO images VALUES (?, ?, ?)", (h, bytes(data), len(data)))
            c.execute("INSERT OR IGNORE INTO concept_images VALUES (?, ?, ?)", (concept_id, h, start + offset))
            hashes.append(h)
        return hashes

    def _insert_embeddings(self, c, owner: str, concept_id: str, hashes: Sequence[str],
                           embeddings: "dict[str, np.ndarray] | None") -> None:
        for embedder, vectors in (embeddings or {}).items():
            vecs = self._check_vectors(c, embedder, vectors, len(hashes))
            c.executemany("INSERT OR REPLACE INTO embeddings VALUES (?, ?, ?, ?, ?)",
                          [(owner, embedder, concept_id, h, v.tobytes()) for h, v in zip(hashes, vecs, strict=True)])

    def _check_vectors(self, c, embedder: str, vectors: Any, n: int) -> "np.ndarray":
        import numpy as np

        if not isinstance(embedder, str) or not embedder:
            raise InvalidConceptError("embedder name must be a non-empty string")
        arr = np.asarray(vectors, dtype=np.float32)
        if arr.ndim != 2 or arr.shape[0] != n:
            raise InvalidConceptError(f"expected {n} vectors for {embedder!r}, got an array of shape {arr.shape}")
        row = c.execute("SELECT dim FROM embedders WHERE name = ?", (embedder,)).fetchone()
        if row is None:
            c.execute("INSERT INTO embedders VALUES (?, ?)", (embedder, arr.shape[1]))
        elif row[0] != arr.shape[1]:
            raise InvalidConceptError(f"embedder {embedder!r} has dimension {row[0]}, got vectors of {arr.shape[1]}")
        if not np.isfinite(arr).all():
            raise InvalidConceptError(f"vectors for {embedder!r} contain NaN or infinity")
        norms = np.linalg.norm(arr, axis=1, keepdims=True)
        if (norms < 1e-12).any():
            raise InvalidConceptError(f"vectors for {embedder!r} contain a zero vector")
        return np.ascontiguousarray(arr / norms, dtype=np.float32)

    def add_images(self, owner: str, concept_id: str, images: Sequence[bytes],
                   embeddings: "dict[str, np.ndarray] | None" = None) -> Concept:
        """Attach more reference images (and their vectors) to a concept; an image already there is kept once."""
        concept = self.get(owner, concept_id)
        with self._tx() as c:
            hashes = self._insert_images(c, concept_id, images, start=len(concept.images))
            self._insert_embeddings(c, owner, concept_id, hashes, embeddings)
            c.execute("UPDATE concepts SET updated = ?, version = version + 1 WHERE id = ?", (time.time(), concept_id))
            self._bump(c, owner)
        return self.get(owner, concept_id)

    def remove_image(self, owner: str, concept_id: str, image_hash: str) -> Concept:
        concept = self.get(owner, concept_id)
        if image_hash not in concept.images:
            raise ConceptNotFound(f"concept <{concept.name}> has no image {image_hash[:12]}")
        with self._tx() as c:
            c.execute("DELETE FROM concept_images WHERE concept_id = ? AND hash = ?", (concept_id, image_hash))
            c.execute("DELETE FROM embeddings WHERE owner = ? AND concept_id = ? AND image_hash = ?",
                      (owner, concept_id, image_hash))
            c.execute("UPDATE concepts SET updated = ?, version = version + 1 WHERE id = ?", (time.time(), concept_id))
            self._drop_orphan_images(c)
            self._bump(c, owner)
        return self.get(owner, concept_id)

    def _drop_orphan_images(self, c) -> None:
        c.execute("DELETE FROM images WHERE hash NOT IN (SELECT hash FROM concept_images)")

    def image_bytes(self, owner: str, image_hash: str) -> bytes:
        """The encoded bytes of one of the owner's reference images."""
        check_owner(owner)
        row = self._conn.execute(
            "SELECT i.data FROM images i JOIN concept_images ci ON ci.hash = i.hash "
            "JOIN concepts c ON c.id = ci.concept_id WHERE i.hash = ? AND c.owner = ? LIMIT 1",
            (image_hash, owner)).fetchone()
        if row is None:
            raise ConceptNotFound(f"user {owner!r} has no image {image_hash[:12]}")
        return row[0]

    def known_vectors(self, embedder: str, hashes: Sequence[str]) -> "dict[str, np.ndarray]":
        """Vectors already computed by `embedder` for these content hashes (an image is embedded only once)."""
        import numpy as np

        out = {}
        for h in set(hashes):
            row = self._conn.execute("SELECT vector FROM embeddings WHERE image_hash = ? AND embedder = ? LIMIT 1",
                                     (h, embedder)).fetchone()
            if row is not None:
                out[h] = np.frombuffer(row[0], dtype=np.float32)
        return out

    def set_embeddings(self, owner: str, concept_id: str, embedder: str, image_hashes: Sequence[str],
                       vectors: "np.ndarray") -> None:
        """Store vectors of `embedder` for some of the concept's images (e.g. after switching embedders)."""
        concept = self.get(owner, concept_id)
        unknown = [h for h in image_hashes if h not in concept.images]
        if unknown:
            raise ConceptNotFound(f"concept <{concept.name}> has no image {unknown[0][:12]}")
        with self._tx() as c:
            self._insert_embeddings(c, owner, concept_id, list(image_hashes), {embedder: vectors})
            self._bump(c, owner)

    def missing_embeddings(self, owner: str, embedder: str) -> list[tuple[str, str]]:
        """(concept id, image hash) pairs of the owner that have no vector from `embedder` yet."""
        check_owner(owner)
        return [tuple(r) for r in self._conn.execute(
            "SELECT ci.concept_id, ci.hash FROM concepts c JOIN concept_images ci ON ci.concept_id = c.id "
            "WHERE c.owner = ? AND NOT EXISTS (SELECT 1 FROM embeddings e WHERE e.owner = c.owner "
            "AND e.embedder = ? AND e.concept_id = c.id AND e.image_hash = ci.hash) ORDER BY c.name, ci.position",
            (owner, embedder))]

    # ------------------------------------------------------------------ search

    def _index(self, owner: str, embedder: str) -> _OwnerIndex:
        import numpy as np

        with self._lock:
            version = self._read_data_version()
            if version != self._data_version:  # another connection committed: drop owners that changed
                self._data_version = version
                revisions = dict(self._conn.execute("SELECT owner, revision FROM owner_revisions"))
                for key in [k for k, idx in self._indexes.items() if revisions.get(k[0], 0) != idx.revision]:
                    del self._indexes[key]
            cached = self._indexes.get((owner, embedder))
            if cached is not None:
                return cached
            revision_row = self._conn.execute("SELECT revision FROM owner_revisions WHERE owner = ?",
                                              (owner,)).fetchone()
            rows = self._conn.execute(
                "SELECT concept_id, image_hash, vector FROM embeddings WHERE owner = ? AND embedder = ?",
                (owner, embedder)).fetchall()
            dim_row = self._conn.execute("SELECT dim FROM embedders WHERE name = ?", (embedder,)).fetchone()
            dim = dim_row[0] if dim_row else 0
            matrix = np.frombuffer(b"".join(r[2] for r in rows), dtype=np.float32).reshape(len(rows), dim)
            concept_ids, starts = [], []
            for i, r in enumerate(rows):
                if not concept_ids or concept_ids[-1] != r[0]:
                    concept_ids.append(r[0])
                    starts.append(i)
            index = _OwnerIndex(revision_row[0] if revision_row else 0, matrix, concept_ids,
                                np.asarray(starts, dtype=np.int64), [r[1] for r in rows])
            self._indexes[(owner, embedder)] = index
            return index

    def search(self, owner: str, vector: Any, *, embedder: str, k: int = 5, category: str | None = None,
               min_score: float | None = None) -> list[Match]:
        """The owner's top-k concepts by cosine similarity of their best image, best first.

        Exact over the owner's vectors. Optional category filter and minimum score.
        """
        import numpy as np

        check_owner(owner)
        if k < 1:
            raise InvalidConceptError(f"k must be at least 1, got {k}")
        q = np.asarray(vector, dtype=np.float32).reshape(-1)
        index = self._index(owner, embedder)
        if index.matrix.shape[0] == 0:
            return []
        if q.shape[0] != index.matrix.shape[1]:
            raise InvalidConceptError(
                f"query has dimension {q.shape[0]}, embedder {embedder!r} has {index.matrix.shape[1]}")
        if not np.isfinite(q).all():
            raise InvalidConceptError("query vector contains NaN or infinity")
        norm = float(np.linalg.norm(q))
        if norm < 1e-12:
            raise InvalidConceptError("query vector is zero")
        scores = index.matrix @ (q / norm)
        best = np.maximum.reduceat(scores, index.starts)  # best image per concept
        candidates = best.shape[0]
        if category is None and min_score is None:
            top = np.argpartition(-best, min(k, candidates) - 1)[:k] if candidates > k else np.arange(candidates)
            order = top[np.argsort(-best[top], kind="stable")]
        else:
            order = np.argsort(-best, kind="stable")
        matches: list[Match] = []
        for g in order:
            score = float(best[g])
            if min_score is not None and score < min_score:
                break
            try:
                concept = self.get(owner, index.concept_ids[g])
            except ConceptNotFound:  # deleted by another process since the index was read
                continue
            if category is not None and concept.category != category:
                continue
            end = index.starts[g + 1] if g + 1 < len(index.starts) else index.matrix.shape[0]
            row = int(index.starts[g] + np.argmax(scores[index.starts[g]:end]))
            matches.append(Match(concept, score, index.image_hashes[row]))
            if len(matches) == k:
                break
        return matches

    # ------------------------------------------------------------------ learned tensors

    def put_tensor(self, owner: str, concept_id: str, name: str, data: bytes, *, model: str,
                   fingerprint: str) -> None:
        """Store a safetensors blob for a concept, tagged with the model (and tokenizer fingerprint) it fits."""
        self.get(owner, concept_id)
        from safetensors import SafetensorError
        from safetensors.numpy import load as load_safetensors

        try:
            load_safetensors(bytes(data))
        except (SafetensorError, ValueError, TypeError) as e:
            raise InvalidConceptError(f"tensor {name!r} is not valid safetensors data ({e})") from e
        with self._tx() as c:
            c.execute("INSERT OR REPLACE INTO tensors VALUES (?, ?, ?, ?, ?, ?)",
                      (concept_id, name, model, fingerprint, bytes(data), time.time()))
            self._bump(c, owner)

    def get_tensor(self, owner: str, concept_id: str, name: str) -> StoredTensor:
        self.get(owner, concept_id)
        row = self._conn.execute("SELECT model, fingerprint, data, created FROM tensors WHERE concept_id = ? "
                                 "AND name = ?", (concept_id, name)).fetchone()
        if row is None:
            raise ConceptNotFound(f"concept {concept_id!r} has no tensor {name!r}")
        return StoredTensor(concept_id, name, row[0], row[1], row[2], row[3])

    def list_tensors(self, owner: str, concept_id: str) -> list[str]:
        self.get(owner, concept_id)
        return [r[0] for r in self._conn.execute("SELECT name FROM tensors WHERE concept_id = ? ORDER BY name",
                                                 (concept_id,))]


class ConceptDBConflict(InvalidConceptError):
    """An update's `expected_version` no longer matches: someone else changed the concept first."""


def _aliases(aliases: Sequence[str], name: str) -> list[str]:
    if isinstance(aliases, str):
        aliases = [aliases]
    out = []
    for a in aliases:
        bare = normalize_name(a, "alias")
        if bare != name and bare not in out:
            out.append(bare)
    return out


def _attributes(attributes: dict | None) -> str:
    if attributes is None:
        return "{}"
    if not isinstance(attributes, dict):
        raise InvalidConceptError(f"attributes must be a dict, got {type(attributes).__name__}")
    try:
        text = json.dumps(attributes, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise InvalidConceptError(f"attributes must be JSON-serialisable ({e})") from e
    return check_text(text, "attributes")
