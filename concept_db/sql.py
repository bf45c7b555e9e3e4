"""What the relational backends share: validation, the tables' rows, and every operation written once in SQL.

`SQLStore` holds the operations; a backend (`SQLiteStore`, `PostgresStore`) supplies the connection (a wrapper
whose `execute` takes `?` placeholders and returns fully fetched rows), the transaction statements, how rows
are written on conflict, how vectors travel, and search. Table layouts differ per backend (see each module's
migrations); the column order of each table, below, is the same in both.
"""

from __future__ import annotations

import json
import re
import secrets
import threading
import time
from contextlib import contextmanager
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

from .types import (MAX_ALIASES, MAX_CONVERSATION_TITLE, MAX_TURN_TEXT, PROFILE_KINDS, BulkResult, Concept,
                    ConceptNotFound, Conversation, DuplicateConceptError, InvalidConceptError, Match, MemoryEntry,
                    NewConcept, ProfileEvent, Quota, StoredTensor, Turn, Usage, check_owner, check_text, content_hash,
                    handle_skeleton, hash_key, normalize_name)

if TYPE_CHECKING:
    import numpy as np

#: Every table's columns (in storage order) and primary key, for the backends' insert statements.
TABLES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "concepts": (("id", "owner", "name", "category", "info", "attributes", "created", "updated", "version"), ("id",)),
    "handles": (("owner", "handle", "concept_id", "is_alias"), ("owner", "handle")),
    # images are found by hkey = hash_key(hash) and hash together (SQLite indexes hkey), linked by id
    "images": (("hash", "data", "size", "hkey", "id"), ("hash",)),
    "concept_images": (("concept_id", "hash", "position", "image_id"), ("concept_id", "hash")),
    "embeddings": (("owner", "embedder", "concept_id", "image_hash", "vector"),
                   ("owner", "embedder", "concept_id", "image_hash")),
    "embedders": (("name", "dim"), ("name",)),
    "tensors": (("concept_id", "name", "model", "fingerprint", "data", "created"), ("concept_id", "name")),
    "owner_settings": (("owner", "key", "value"), ("owner", "key")),
    "profile_events": (("id", "owner", "kind", "prompt", "image", "other", "comment", "created"), ("id",)),
    "owner_blobs": (("owner", "name", "model", "data", "created"), ("owner", "name")),
    "profile_generations": (("owner", "generation"), ("owner",)),
    "memory_entries": (("id", "owner", "text", "concept_id", "kind", "topic", "status", "source", "valid_from",
                        "superseded_by", "created", "updated"), ("id",)),
    "conversations": (("id", "owner", "title", "created", "updated"), ("id",)),
    "conversation_turns": (("conversation_id", "position", "owner", "question", "answer", "image", "created"),
                           ("conversation_id", "position")),
}
_MEMORY_COLUMNS = ", ".join(TABLES["memory_entries"][0])  # MemoryEntry's fields, in order


class SQLStore:
    """The `ConceptStore` operations over a relational database; subclasses are the backends."""

    #: statement that opens a write transaction
    _BEGIN = "BEGIN"
    #: appended to text columns in ORDER BY, so that every backend sorts names the same way (by code point)
    _COLLATE = ""
    #: appended to a SELECT that reads a row about to be changed (row lock where the backend has them)
    _FOR_UPDATE = ""
    #: a condition true for handles holding any character outside printable ASCII (the only ones whose
    #: skeleton can differ from themselves; see `types.handle_skeleton`)
    _NON_ASCII: str
    #: a concept row with its aliases and images, in one statement (backend-specific aggregation), read from
    #: `{source}`: the concepts table or a subquery of it
    _SELECT: str

    #: an image's hkey (types.hash_key) computed in SQL from a hash column: profile events refer to images by hash
    _HKEY = "mmp_hash_key({})"
    #: a statement that makes one owner's writers wait for each other until the transaction ends, so that two
    #: writes cannot both pass the quota (None: the backend's write lock already serializes every writer)
    _OWNER_LOCK: str | None = None

    #: per-owner limits on what writes may store (None: none); `ConceptDB(quota=...)` sets it
    quota: Quota | None = None
    #: owner -> (revision, usage at that revision), as this store's own quota checks left it: the next check of
    #: the owner reads one revision instead of counting every row (`_charge`); another writer's commit, or a
    #: rollback, moves the revision away from it and the usage is counted again
    _usage_known: dict[str, tuple[int, Usage]]
    _usage_after: dict[str, Usage]  # owner -> usage once the write in progress lands (set by `_charge`)

    _lock: threading.RLock
    _conn: Any
    _depth: int

    # ------------------------------------------------------------------ backend hooks

    def _insert(self, c, table: str, rows: Sequence[Sequence[Any]], conflict: str = "error") -> None:
        """Insert rows; on a primary-key conflict raise ("error"), keep the old row ("ignore") or replace it."""
        raise NotImplementedError

    def _write_vectors(self, c, owner: str, rows: list[tuple], *, fresh: bool) -> None:
        """Store `(owner, embedder, concept_id, image_hash, float32 vector)` rows, replacing existing ones
        (`fresh`: the concepts are new in this transaction, so nothing can conflict)."""
        raise NotImplementedError

    def _vector(self, value: Any) -> "np.ndarray":
        """A stored vector as a float32 array."""
        raise NotImplementedError

    def _matrix(self, values: Sequence[Any], dim: int) -> "np.ndarray":
        """Stored vectors as one (n, dim) float32 matrix."""
        import numpy as np

        if not values:
            return np.empty((0, dim), np.float32)
        return np.stack([self._vector(v) for v in values]).astype(np.float32, copy=False)

    def _store_images(self, c, images: Sequence[tuple[str, bytes, int]]) -> dict[str, int]:
        """Store those of `(hash, data, hkey)` not stored yet (an image is kept once, by content hash) and
        return the id of every one of them."""
        raise NotImplementedError

    def _rolled_back(self) -> None:
        """Forget what was cached about writes that a rollback undid."""

    def _bump(self, c, owner: str) -> None:
        """Record that the owner's data changed: `revision(owner)` moves (backends that cache per owner also
        invalidate here)."""
        c.execute("INSERT INTO owner_revisions VALUES (?, 1) ON CONFLICT (owner) DO UPDATE "
                  "SET revision = owner_revisions.revision + 1", (owner,))
        after = self._usage_after.pop(owner, None)
        if after is not None:  # a quota check counted this write: its usage is known at the new revision
            self._usage_known[owner] = (self._revision(c, owner), after)

    def _committed(self) -> None:
        """Called after each outermost COMMIT (SQLite hands the checkpoint to its own thread here)."""

    def search(self, owner: str, vector: Any, *, embedder: str, k: int = 5, category: str | None = None,
               min_score: float | None = None) -> list[Match]:
        raise NotImplementedError

    # ------------------------------------------------------------------ transactions

    @contextmanager
    def _tx(self) -> Iterator[Any]:
        """One write transaction; everything in it is committed together or not at all.

        Nested inside `transaction()` it becomes a savepoint: a failed write undoes only itself."""
        with self._lock:
            nested = self._depth > 0
            self._depth += 1
            self._conn.execute("SAVEPOINT w" if nested else self._BEGIN)
            try:
                yield self._conn
            except BaseException:
                if nested:
                    self._conn.execute("ROLLBACK TO w")
                    self._conn.execute("RELEASE w")
                else:
                    self._conn.execute("ROLLBACK")
                self._rolled_back()
                self._usage_known.clear()  # revisions the rollback undid may be reached again
                raise
            finally:
                self._depth -= 1
                self._usage_after.clear()
            self._conn.execute("RELEASE w" if nested else "COMMIT")
            if not nested:
                self._committed()

    @contextmanager
    def transaction(self) -> Iterator["SQLStore"]:
        """Group many writes into one commit (bulk imports): all of them land, or none."""
        with self._tx():
            yield self

    @property
    def schema_version(self) -> int:
        return self._conn.execute("SELECT max(version) FROM schema_migrations").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> "SQLStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ reading concepts

    @staticmethod
    def _concepts(rows: Sequence[tuple]) -> list[Concept]:
        return [Concept(id=cid, owner=owner, name=name, category=category, info=info, aliases=tuple(_json(al)),
                        attributes=json.loads(attributes), images=tuple(_json(imgs)), created=created,
                        updated=updated, version=version)
                for cid, owner, name, category, info, attributes, created, updated, version, al, imgs in rows]

    def get_many(self, owner: str, concept_ids: Sequence[str]) -> dict[str, Concept]:
        """The owner's concepts among `concept_ids` (others' and missing ids are simply absent)."""
        check_owner(owner)
        rows = []
        with self._lock:
            for start in range(0, len(concept_ids), 500):  # stay under SQLite's bound-parameter limit
                chunk = list(concept_ids[start : start + 500])
                # look up by primary key, then keep only the owner's rows (an owner filter in SQL would make
                # the planner scan the owner's index instead)
                rows += [r for r in self._conn.execute(
                    self._SELECT.format(source="concepts") + f" WHERE c.id IN ({','.join('?' * len(chunk))})",
                    chunk) if r[1] == owner]
        return {c.id: c for c in self._concepts(rows)}

    def get(self, owner: str, concept_id: str) -> Concept:
        """The owner's concept with this id; another owner's id raises `ConceptNotFound` like a missing one."""
        found = self.get_many(owner, [concept_id])
        if concept_id not in found:
            raise ConceptNotFound(f"no concept {concept_id!r} for user {owner!r}")
        return found[concept_id]

    def find(self, owner: str, name_or_alias: str) -> Concept | None:
        """Look a concept up by name or alias (`<bo>` or `bo`); None when the owner has none."""
        check_owner(owner)
        handle = normalize_name(name_or_alias)
        with self._lock:
            row = self._conn.execute("SELECT concept_id FROM handles WHERE owner = ? AND handle = ?",
                                     (owner, handle)).fetchone()
            return self.get_many(owner, [row[0]]).get(row[0]) if row else None

    def find_many(self, owner: str, handles: Sequence[str]) -> dict[str, Concept]:
        """Concepts of the owner named or aliased by any of `handles` (exact, already normalised), by handle."""
        check_owner(owner)
        unique = list(dict.fromkeys(handles))
        if not unique:
            return {}
        with self._lock:
            pairs = []
            for start in range(0, len(unique), 500):
                chunk = unique[start : start + 500]
                pairs += self._conn.execute(
                    f"SELECT handle, concept_id FROM handles WHERE owner = ? AND handle IN ({','.join('?' * len(chunk))})",
                    (owner, *chunk)).fetchall()
            concepts = self.get_many(owner, [cid for _, cid in pairs])
        return {h: concepts[cid] for h, cid in pairs if cid in concepts}

    def has_owner(self, owner: str) -> bool:
        """Whether this database has ever held data of `owner` (concepts now, or settings)."""
        check_owner(owner)
        return self._conn.execute(
            "SELECT EXISTS (SELECT 1 FROM concepts WHERE owner = ?) OR EXISTS "
            "(SELECT 1 FROM owner_settings WHERE owner = ?)", (owner, owner)).fetchone()[0] == 1

    def get_setting(self, owner: str, key: str, default: Any = None) -> Any:
        check_owner(owner)
        row = self._conn.execute("SELECT value FROM owner_settings WHERE owner = ? AND key = ?",
                                 (owner, key)).fetchone()
        return json.loads(row[0]) if row else default

    def settings(self, owner: str) -> dict[str, Any]:
        """All of the owner's settings."""
        check_owner(owner)
        return {k: json.loads(v) for k, v in self._conn.execute(
            "SELECT key, value FROM owner_settings WHERE owner = ?", (owner,))}

    def set_setting(self, owner: str, key: str, value: Any) -> None:
        check_owner(owner)
        with self._tx() as c:
            self._insert(c, "owner_settings", [(owner, key, json.dumps(value))], "replace")

    def list(self, owner: str, *, category: str | None = None, limit: int = 100, offset: int = 0) -> list[Concept]:
        """The owner's concepts by name, a page at a time, optionally of one category."""
        check_owner(owner)
        if limit < 0 or offset < 0:
            raise InvalidConceptError("limit and offset must not be negative")
        page = "SELECT * FROM concepts WHERE owner = ?"
        args: list[Any] = [owner]
        if category is not None:
            page += " AND category = ?"
            args.append(category)
        # the page is cut before aliases and images are gathered: rows skipped by OFFSET cost an index step only
        page += f" ORDER BY name{self._COLLATE} LIMIT ? OFFSET ?"
        sql = self._SELECT.format(source=f"({page})") + f" ORDER BY c.name{self._COLLATE}"
        with self._lock:
            return self._concepts(self._conn.execute(sql, (*args, limit, offset)).fetchall())

    def all_concepts(self, owner: str, *, page: int = 500) -> list[Concept]:
        """Every concept of the owner, by name (read a page at a time)."""
        return _paged(lambda offset: self.list(owner, limit=page, offset=offset), page)

    def count(self, owner: str) -> int:
        check_owner(owner)
        return self._conn.execute("SELECT count(*) FROM concepts WHERE owner = ?", (owner,)).fetchone()[0]

    def categories(self, owner: str) -> list[str]:
        check_owner(owner)
        return [r[0] for r in self._conn.execute(
            "SELECT category FROM concepts WHERE owner = ? AND category != '' "
            f"GROUP BY category ORDER BY category{self._COLLATE}", (owner,))]

    # ------------------------------------------------------------------ writing concepts

    def _check_handles_free(self, c, owner: str, handles: Sequence[str], concept_id: str | None) -> None:
        for handle in handles:
            row = c.execute("SELECT concept_id FROM handles WHERE owner = ? AND handle = ?", (owner, handle)).fetchone()
            if row and row[0] != concept_id:
                raise DuplicateConceptError(f"user {owner!r} already has a concept named or aliased <{handle}>")
        looks = self._lookalikes(c, owner, handles)
        for handle in handles:
            _check_lookalike(owner, handle, looks, concept_id)

    def _lookalikes(self, c, owner: str, handles: Sequence[str]) -> dict[str, tuple[str, str]]:
        """skeleton -> (handle, concept id) for the owner's handles that could look like one of `handles`:
        those equal to a new handle's skeleton, and every handle outside ASCII (usually none)."""
        skeletons = list(dict.fromkeys(handle_skeleton(h) for h in handles))
        rows = list(c.execute(f"SELECT handle, concept_id FROM handles WHERE owner = ? AND {self._NON_ASCII}",
                              (owner,)))
        for start in range(0, len(skeletons), 500):
            chunk = skeletons[start : start + 500]
            rows += c.execute(f"SELECT handle, concept_id FROM handles WHERE owner = ? AND handle IN "
                              f"({','.join('?' * len(chunk))})", (owner, *chunk))
        return {handle_skeleton(h): (h, cid) for h, cid in rows}

    def add(self, owner: str, name: str, *, category: str = "", info: str = "", aliases: Sequence[str] = (),
            attributes: dict | None = None, images: Sequence[bytes] = (),
            embeddings: "dict[str, np.ndarray] | None" = None) -> Concept:
        """Add a concept with its reference images (encoded bytes) and, per embedder, one vector per image.

        All or nothing: a failure anywhere leaves the database as it was.
        """
        item = NewConcept(name, category, info, tuple(aliases) if not isinstance(aliases, str) else (aliases,),
                          attributes, tuple(images), embeddings)
        result = self.add_many(owner, [item])
        return self.get(owner, result.added[0])

    def add_many(self, owner: str, items: Iterable[NewConcept], *, skip_invalid: bool = False) -> BulkResult:
        """Add many concepts in one transaction (the fast path for imports).

        Every item is validated before anything is written. With `skip_invalid`, invalid or duplicate items are
        skipped and reported in the result; otherwise the first one raises and nothing is written.
        """
        check_owner(owner)
        result = BulkResult()

        def reject(name: str, error: Exception) -> None:
            if not skip_invalid:
                raise error
            result.skipped.append((name, str(error)))

        prepared = []
        for item in items:
            try:
                prepared.append(_prepare(item))
            except InvalidConceptError as e:
                reject(str(getattr(item, "name", item)), e)
        prepared = _normalize_all(prepared, reject)
        now = time.time()
        rows: dict[str, list[tuple]] = {"concepts": [], "handles": [], "images": [], "concept_images": [],
                                        "embeddings": []}
        with self._tx() as c:
            every = [h for p in prepared for h in (p["name"], *p["aliases"])]
            taken = self._taken_handles(c, owner, every)
            looks = self._lookalikes(c, owner, every)
            dims: dict[str, int] = {}
            taken_ids: set[str] = set()
            fresh_ids = iter(new_ids(len(prepared)))
            for p in prepared:
                handles = [p["name"], *p["aliases"]]
                try:
                    if not taken.isdisjoint(handles):
                        dup = next(h for h in handles if h in taken)
                        raise DuplicateConceptError(f"user {owner!r} already has a concept named or aliased <{dup}>")
                    for h in handles:
                        _check_lookalike(owner, h, looks, None)
                    for embedder, vecs in p["embeddings"].items():
                        self._check_dim(c, dims, embedder, vecs.shape[1])
                except (DuplicateConceptError, InvalidConceptError) as e:
                    reject(p["name"], e)
                    continue
                taken.update(handles)
                # a restored id is kept when free; an id in use (e.g. the same archive imported for another
                # user of this database) gets a fresh one
                cid = p["id"]
                if cid is None or cid in taken_ids or c.execute("SELECT 1 FROM concepts WHERE id = ?",
                                                                (cid,)).fetchone():
                    cid = next(fresh_ids)
                taken_ids.add(cid)
                looks.update((handle_skeleton(h), (h, cid)) for h in handles)
                rows["concepts"].append((cid, owner, p["name"], p["category"], p["info"], p["attributes"],
                                         p["created"] or now, p["updated"] or now, p["version"] or 1))
                rows["handles"].append((owner, p["name"], cid, 0))
                rows["handles"] += [(owner, a, cid, 1) for a in p["aliases"]]
                for position, (h, data) in enumerate(zip(p["hashes"], p["images"], strict=True)):
                    rows["images"].append((h, data, hash_key(h)))
                    rows["concept_images"].append((cid, h, position))
                for embedder, vecs in p["embeddings"].items():
                    rows["embeddings"] += [(owner, embedder, cid, h, v)
                                           for h, v in zip(p["hashes"], vecs, strict=True)]
                result.added.append(cid)
            self._charge(c, owner, images=len(rows["concept_images"]), size=sum(len(r[1]) for r in rows["images"]))
            self._insert(c, "concepts", rows["concepts"])
            self._insert(c, "handles", rows["handles"])
            image_ids = self._store_images(c, rows["images"])
            self._insert(c, "concept_images", [(*link, image_ids[link[1]]) for link in rows["concept_images"]],
                         "ignore")
            self._write_vectors(c, owner, rows["embeddings"], fresh=True)
            self._bump(c, owner)
        return result

    def _taken_handles(self, c, owner: str, handles: Sequence[str]) -> set[str]:
        """Which of `handles` the owner already uses (as a name or an alias)."""
        taken: set[str] = set()
        unique = list(dict.fromkeys(handles))
        for start in range(0, len(unique), 500):
            chunk = unique[start : start + 500]
            taken.update(r[0] for r in c.execute(
                f"SELECT handle FROM handles WHERE owner = ? AND handle IN ({','.join('?' * len(chunk))})",
                (owner, *chunk)))
        return taken

    def update(self, owner: str, concept_id: str, *, name: str | None = None, category: str | None = None,
               info: str | None = None, aliases: Sequence[str] | None = None, attributes: dict | None = None,
               expected_version: int | None = None) -> Concept:
        """Change fields of a concept; `expected_version` turns a concurrent edit into an error, not a loss.

        Fields left out keep their value as of the moment the change is written (the row is read inside the
        write transaction, locked where the backend has row locks), so two concurrent edits of different fields
        both land."""
        check_owner(owner)
        new_name = normalize_name(name) if name is not None else None
        given_aliases = _aliases(aliases) if aliases is not None else None  # all input-sized work before the lock
        changes = {
            "category": check_text(category, "category", 200) if category is not None else None,
            "info": check_text(info, "info") if info is not None else None,
            "attributes": _attributes(attributes) if attributes is not None else None,
        }
        with self._tx() as c:
            row = c.execute(f"SELECT version FROM concepts WHERE id = ? AND owner = ?{self._FOR_UPDATE}",
                            (concept_id, owner)).fetchone()
            if row is None:
                raise ConceptNotFound(f"no concept {concept_id!r} for user {owner!r}")
            current = self.get(owner, concept_id)
            if expected_version is not None and row[0] != expected_version:
                raise ConceptDBConflict(f"concept <{current.name}> changed since version {expected_version}")
            new_name = new_name or current.name
            new_aliases = ([a for a in given_aliases if a != new_name] if given_aliases is not None
                           else list(current.aliases))
            self._check_handles_free(c, owner, [new_name, *new_aliases], concept_id)
            c.execute("UPDATE concepts SET name = ?, category = ?, info = ?, attributes = ?, updated = ?, "
                      "version = version + 1 WHERE id = ?",
                      (new_name, changes["category"] if changes["category"] is not None else current.category,
                       changes["info"] if changes["info"] is not None else current.info,
                       changes["attributes"] or json.dumps(current.attributes, sort_keys=True), time.time(),
                       concept_id))
            c.execute("DELETE FROM handles WHERE concept_id = ?", (concept_id,))
            self._insert(c, "handles",
                         [(owner, new_name, concept_id, 0)] + [(owner, a, concept_id, 1) for a in new_aliases])
            self._bump(c, owner)
        return self.get(owner, concept_id)

    def delete(self, owner: str, concept_id: str) -> None:
        """Delete the owner's concept with its embeddings and tensors; images no longer used are removed."""
        concept = self.get(owner, concept_id)
        with self._tx() as c:
            self._delete_vectors(c, owner, concept_id)
            c.execute("DELETE FROM handles WHERE concept_id = ?", (concept_id,))
            c.execute("DELETE FROM concept_images WHERE concept_id = ?", (concept_id,))
            c.execute("DELETE FROM concepts WHERE id = ? AND owner = ?", (concept_id, owner))
            c.execute("DELETE FROM memory_entries WHERE owner = ? AND concept_id = ?", (owner, concept_id))
            self._drop_orphan_images(c, concept.images)
            self._bump(c, owner)

    def _delete_vectors(self, c, owner: str, concept_id: str, image_hash: str | None = None) -> None:
        """Delete a concept's vectors (or one image's) through primary-key seeks, one per embedder."""
        for (embedder,) in c.execute("SELECT name FROM embedders").fetchall():
            if image_hash is None:
                c.execute("DELETE FROM embeddings WHERE owner = ? AND embedder = ? AND concept_id = ?",
                          (owner, embedder, concept_id))
            else:
                c.execute("DELETE FROM embeddings WHERE owner = ? AND embedder = ? AND concept_id = ? "
                          "AND image_hash = ?", (owner, embedder, concept_id, image_hash))

    def erase_owner(self, owner: str) -> int:
        """Remove everything of one owner; returns how many concepts were removed."""
        check_owner(owner)
        with self._tx() as c:
            self._profile_shrinks(c, owner)
            hashes = [r[0] for r in c.execute(
                "SELECT ci.hash FROM concepts c JOIN concept_images ci ON ci.concept_id = c.id WHERE c.owner = ?",
                (owner,))]
            c.execute("DELETE FROM embeddings WHERE owner = ?", (owner,))
            c.execute("DELETE FROM concept_images WHERE concept_id IN (SELECT id FROM concepts WHERE owner = ?)",
                      (owner,))
            c.execute("DELETE FROM handles WHERE owner = ?", (owner,))
            c.execute("DELETE FROM owner_settings WHERE owner = ?", (owner,))
            hashes += self._delete_profile(c, owner)
            c.execute("DELETE FROM owner_blobs WHERE owner = ?", (owner,))
            c.execute("DELETE FROM memory_entries WHERE owner = ?", (owner,))
            hashes += self._delete_conversations(c, owner)
            n = c.execute("DELETE FROM concepts WHERE owner = ?", (owner,)).rowcount
            self._drop_orphan_images(c, hashes)
            self._bump(c, owner)
        return n

    # ------------------------------------------------------------------ images and embeddings

    def _insert_images(self, c, concept_id: str, hashed: Sequence[tuple[str, bytes]], start: int) -> list[str]:
        """`hashed`: (content hash, bytes) pairs, computed before the transaction."""
        hashes = [h for h, _ in hashed]
        image_ids = self._store_images(c, [(h, data, hash_key(h)) for h, data in hashed])
        self._insert(c, "concept_images", [(concept_id, h, start + offset, image_ids[h])
                                           for offset, h in enumerate(hashes)], "ignore")
        return hashes

    def _insert_embeddings(self, c, owner: str, concept_id: str, hashes: Sequence[str],
                           embeddings: "dict[str, np.ndarray] | None") -> None:
        for embedder, vectors in (embeddings or {}).items():
            vecs = _normalized(embedder, vectors, len(hashes))
            self._check_dim(c, {}, embedder, vecs.shape[1])
            self._write_vectors(c, owner, [(owner, embedder, concept_id, h, v)
                                           for h, v in zip(hashes, vecs, strict=True)], fresh=False)

    def _check_dim(self, c, seen: dict[str, int], embedder: str, dim: int) -> None:
        """Every vector of one embedder has the dimension recorded for it the first time."""
        known = seen.get(embedder)
        if known is None:
            row = c.execute("SELECT dim FROM embedders WHERE name = ?", (embedder,)).fetchone()
            if row is None:
                self._insert(c, "embedders", [(embedder, dim)], "ignore")  # a concurrent writer may win
                row = c.execute("SELECT dim FROM embedders WHERE name = ?", (embedder,)).fetchone()
            known = seen[embedder] = row[0]
        if known != dim:
            raise InvalidConceptError(f"embedder {embedder!r} has dimension {known}, got vectors of {dim}")

    def add_images(self, owner: str, concept_id: str, images: Sequence[bytes],
                   embeddings: "dict[str, np.ndarray] | None" = None) -> Concept:
        """Attach more reference images (and their vectors) to a concept; an image already there is kept once."""
        concept = self.get(owner, concept_id)
        blobs = _image_blobs(images)
        hashed = [(content_hash(data), data) for data in blobs]  # hashed before the lock
        new = {h: data for h, data in hashed if h not in concept.images}
        with self._tx() as c:
            self._charge(c, owner, images=len(new), size=sum(map(len, new.values())))
            hashes = self._insert_images(c, concept_id, hashed, start=len(concept.images))
            self._insert_embeddings(c, owner, concept_id, hashes, embeddings)
            c.execute("UPDATE concepts SET updated = ?, version = version + 1 WHERE id = ?", (time.time(), concept_id))
            self._bump(c, owner)
        return self.get(owner, concept_id)

    def usage(self, owner: str) -> Usage:
        """What `owner` stores, as the quota counts it."""
        check_owner(owner)
        with self._lock:
            return self._usage(self._conn, owner)

    def _usage(self, c, owner: str) -> Usage:
        images, size = c.execute(
            "SELECT COUNT(*), COALESCE(SUM(i.size), 0) FROM concepts c JOIN concept_images ci ON ci.concept_id = c.id "
            "JOIN images i ON i.id = ci.image_id WHERE c.owner = ?", (owner,)).fetchone()
        (events,) = c.execute("SELECT COUNT(*) FROM profile_events WHERE owner = ?", (owner,)).fetchone()
        for column in ("image", "other"):
            (more,) = c.execute(
                f"SELECT COALESCE(SUM(i.size), 0) FROM profile_events e JOIN images i ON "
                f"i.hkey = {self._HKEY.format('e.' + column)} AND i.hash = e.{column} "
                f"WHERE e.owner = ? AND e.{column} IS NOT NULL", (owner,)).fetchone()
            size += more
        (memory,) = c.execute("SELECT COUNT(*) FROM memory_entries WHERE owner = ?", (owner,)).fetchone()
        (chats,) = c.execute("SELECT COUNT(*) FROM conversations WHERE owner = ?", (owner,)).fetchone()
        (turns,) = c.execute("SELECT COUNT(*) FROM conversation_turns WHERE owner = ?", (owner,)).fetchone()
        (more,) = c.execute(  # a photo asked about in many turns is counted once
            f"SELECT COALESCE(SUM(i.size), 0) FROM (SELECT DISTINCT image FROM conversation_turns WHERE owner = ? "
            f"AND image IS NOT NULL) t JOIN images i ON i.hkey = {self._HKEY.format('t.image')} AND i.hash = t.image",
            (owner,)).fetchone()
        return Usage(images=int(images), events=int(events), bytes=int(size) + int(more), memory=int(memory),
                     conversations=int(chats), turns=int(turns))

    def check_quota(self, owner: str, *, images: int = 0, events: int = 0, size: int = 0, conversations: int = 0,
                    turns: int = 0) -> None:
        """Refuse early (`QuotaExceeded`) what the quota will refuse when it is written (before work is spent on it:
        the write checks again, in its transaction)."""
        if self.quota is not None:
            with self._lock:
                now = self._current_usage(self._conn, owner)
            self.quota.check(owner, now, images=images, events=events, size=size, conversations=conversations,
                             turns=turns)

    def _current_usage(self, c, owner: str) -> Usage:
        """The owner's usage: as this store's last quota check left it while the revision is still the one it
        left, else counted."""
        known = self._usage_known.get(owner)
        return known[1] if known is not None and known[0] == self._revision(c, owner) else self._usage(c, owner)

    def _charge(self, c, owner: str, *, images: int = 0, events: int = 0, size: int = 0, memory: int = 0,
                conversations: int = 0, turns: int = 0) -> None:
        """Refuse (`QuotaExceeded`) a write that takes `owner` past the quota, inside its transaction; the usage
        once it lands is kept for the next check (`_bump` files it under the new revision)."""
        if self.quota is None:
            return
        if self._OWNER_LOCK is not None:
            c.execute(self._OWNER_LOCK, (owner,))
        now = self._current_usage(c, owner)
        self.quota.check(owner, now, images=images, events=events, size=size, memory=memory,
                         conversations=conversations, turns=turns)
        self._usage_after[owner] = Usage(now.images + images, now.events + events, now.bytes + size,
                                         now.memory + memory, now.conversations + conversations, now.turns + turns)

    def revision(self, owner: str) -> int:
        """A number that changes whenever the owner's data does (0 before the first write): what a cache of
        anything derived from the owner's concepts compares against."""
        check_owner(owner)
        return self._revision(self._conn, owner)

    @staticmethod
    def _revision(c, owner: str) -> int:
        row = c.execute("SELECT revision FROM owner_revisions WHERE owner = ?", (owner,)).fetchone()
        return int(row[0]) if row else 0

    def remove_image(self, owner: str, concept_id: str, image_hash: str) -> Concept:
        concept = self.get(owner, concept_id)
        if image_hash not in concept.images:
            raise ConceptNotFound(f"concept <{concept.name}> has no image {image_hash[:12]}")
        with self._tx() as c:
            c.execute("DELETE FROM concept_images WHERE concept_id = ? AND hash = ?", (concept_id, image_hash))
            self._delete_vectors(c, owner, concept_id, image_hash)
            c.execute("UPDATE concepts SET updated = ?, version = version + 1 WHERE id = ?", (time.time(), concept_id))
            self._drop_orphan_images(c, [image_hash])
            self._bump(c, owner)
        return self.get(owner, concept_id)

    def _drop_orphan_images(self, c, hashes: Sequence[str]) -> None:
        """Remove those of `hashes` that nothing uses any more (images are shared by content hash)."""
        c.executemany("DELETE FROM images WHERE hkey = ? AND hash = ? AND NOT EXISTS "
                      "(SELECT 1 FROM concept_images ci WHERE ci.image_id = images.id) AND NOT EXISTS "
                      "(SELECT 1 FROM profile_events WHERE image = ?) AND NOT EXISTS "
                      "(SELECT 1 FROM profile_events WHERE other = ?) AND NOT EXISTS "
                      "(SELECT 1 FROM conversation_turns WHERE image = ?)",
                      [(hash_key(h), h, h, h, h) for h in set(hashes)])

    def image_bytes(self, owner: str, image_hash: str) -> bytes:
        """The encoded bytes of one of the owner's images (a concept's reference image, a profile image or the photo
        of a kept conversation's turn)."""
        check_owner(owner)
        if not isinstance(image_hash, str) or not re.fullmatch(r"[0-9a-f]{64}", image_hash):
            raise ConceptNotFound(f"user {owner!r} has no image {str(image_hash)[:12]!r}: not a content hash")
        row = self._conn.execute(
            "SELECT i.data FROM images i WHERE i.hkey = ? AND i.hash = ? AND (EXISTS (SELECT 1 FROM concept_images "
            "ci JOIN concepts c ON c.id = ci.concept_id WHERE ci.image_id = i.id AND c.owner = ?) OR EXISTS "
            "(SELECT 1 FROM profile_events p WHERE p.owner = ? AND (p.image = i.hash OR p.other = i.hash)) OR EXISTS "
            "(SELECT 1 FROM conversation_turns t WHERE t.owner = ? AND t.image = i.hash))",
            (hash_key(image_hash), image_hash, owner, owner, owner)).fetchone()
        if row is None:
            raise ConceptNotFound(f"user {owner!r} has no image {image_hash[:12]}")
        return row[0]

    def known_vectors(self, owner: str, embedder: str, hashes: Sequence[str]) -> "dict[str, np.ndarray]":
        """The owner's own vectors from `embedder` for these content hashes (an image is embedded once per user).

        Never another owner's: a vector stored by someone else may be forged (an imported archive), and even one
        the toolkit computed may differ in its last bits with the batch it was computed in, so reusing it would
        make one user's results depend on what another user did."""
        check_owner(owner)
        out = {}
        for h in set(hashes):
            row = self._conn.execute(
                "SELECT e.vector FROM images i JOIN concept_images ci ON ci.image_id = i.id "
                "JOIN concepts c ON c.id = ci.concept_id AND c.owner = ? "
                "JOIN embeddings e ON e.owner = ? AND e.embedder = ? AND e.concept_id = ci.concept_id "
                "AND e.image_hash = ci.hash WHERE i.hkey = ? AND i.hash = ? LIMIT 1",
                (owner, owner, embedder, hash_key(h), h)).fetchone()
            if row is not None:
                out[h] = self._vector(row[0])
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

    def vectors(self, owner: str, concept_id: str) -> "dict[str, tuple[list[str], np.ndarray]]":
        """Every stored vector of one concept: embedder -> (image hashes, (n, dim) matrix)."""
        self.get(owner, concept_id)
        out: dict[str, tuple[list[str], list[Any]]] = {}
        for embedder, h, value in self._conn.execute(
                "SELECT embedder, image_hash, vector FROM embeddings WHERE owner = ? AND concept_id = ? "
                f"ORDER BY embedder{self._COLLATE}, image_hash", (owner, concept_id)):
            hashes, values = out.setdefault(embedder, ([], []))
            hashes.append(h)
            values.append(value)
        return {e: (hs, self._matrix(vs, 0)) for e, (hs, vs) in out.items()}

    def owner_vectors(self, owner: str, embedder: str) -> "tuple[list[str], list[str], np.ndarray]":
        """All of the owner's vectors from `embedder`: (concept ids, image hashes, (n, dim) matrix), grouped by
        concept. One range read of the owner's rows (for bulk copies, verification and baselines)."""
        check_owner(owner)
        rows = self._conn.execute(
            "SELECT concept_id, image_hash, vector FROM embeddings WHERE owner = ? AND embedder = ? "
            "ORDER BY concept_id, image_hash", (owner, embedder))
        dim = 0 if rows else self.embedder_dims().get(embedder, 0)
        return [r[0] for r in rows], [r[1] for r in rows], self._matrix([r[2] for r in rows], dim)

    def owners(self) -> list[str]:
        """Every owner with data in this database (concepts, settings, profile, per-user artefacts, memory or
        conversations)."""
        tables = ("concepts", "owner_settings", "profile_events", "owner_blobs", "memory_entries", "conversations")
        return sorted({r[0] for table in tables
                       for r in self._conn.execute(f"SELECT DISTINCT owner FROM {table}")})

    def embedder_dims(self) -> dict[str, int]:
        return dict(self._conn.execute("SELECT name, dim FROM embedders"))

    def missing_embeddings(self, owner: str, embedder: str) -> list[tuple[str, str]]:
        """(concept id, image hash) pairs of the owner that have no vector from `embedder` yet."""
        check_owner(owner)
        return [tuple(r) for r in self._conn.execute(
            "SELECT ci.concept_id, ci.hash FROM concepts c JOIN concept_images ci ON ci.concept_id = c.id "
            "WHERE c.owner = ? AND NOT EXISTS (SELECT 1 FROM embeddings e WHERE e.owner = c.owner "
            f"AND e.embedder = ? AND e.concept_id = c.id AND e.image_hash = ci.hash) ORDER BY c.name{self._COLLATE}, "
            "ci.position",
            (owner, embedder))]

    # ------------------------------------------------------------------ preference profiles

    def add_profile_event(self, owner: str, kind: str, *, images: Sequence[bytes] = (), prompt: str = "",
                          comment: str = "", event_id: str | None = None, created: float | None = None) -> ProfileEvent:
        """Record a like / dislike (one image), a pair (chosen, rejected images + prompt) or a prompt.

        `event_id` and `created` restore an event as it was (migrations); an id already present is an error."""
        check_owner(owner)
        expected = {"like": 1, "dislike": 1, "pair": 2, "prompt": 0}.get(kind)
        if expected is None:
            raise InvalidConceptError(f"unknown profile event {kind!r}; valid: {', '.join(PROFILE_KINDS)}")
        blobs = _image_blobs(images)
        if len(blobs) != expected:
            raise InvalidConceptError(f"a {kind} takes {expected} image(s), got {len(blobs)}")
        prompt, comment = check_text(prompt, "prompt", 2000), check_text(comment, "comment", 2000)
        if kind in ("pair", "prompt") and not prompt.strip():
            raise InvalidConceptError(f"a {kind} needs a non-empty prompt")
        hashes = [content_hash(b) for b in blobs]
        image, other = (hashes + [None, None])[:2]
        event = ProfileEvent(_restored_id(event_id) or new_id(), owner, kind, prompt, image, other, comment,
                             float(created) if created is not None else time.time())
        with self._tx() as c:
            self._charge(c, owner, events=1, size=sum(map(len, blobs)))
            self._store_images(c, [(h, b, hash_key(h)) for h, b in zip(hashes, blobs, strict=True)])
            self._insert(c, "profile_events", [(event.id, owner, kind, prompt, event.image, event.other, comment,
                                                event.created)])
            self._bump(c, owner)
        return event

    def profile_events(self, owner: str, kind: str | None = None) -> list[ProfileEvent]:
        check_owner(owner)
        sql = "SELECT id, owner, kind, prompt, image, other, comment, created FROM profile_events WHERE owner = ?"
        args: list[Any] = [owner]
        if kind is not None:
            sql += " AND kind = ?"
            args.append(kind)
        return [ProfileEvent(*r) for r in self._conn.execute(sql + " ORDER BY created, id", args)]

    def delete_profile_event(self, owner: str, event_id: str) -> list[str]:
        """Remove one preference event, and with it the artefacts learned from the profile (`PROFILE_ARTEFACTS`:
        the reward model, the DPO LoRA, ...), which would otherwise keep what the user took back; returns the names
        of the artefacts removed (to be trained again on what is left)."""
        from .types import PROFILE_ARTEFACTS

        check_owner(owner)
        with self._tx() as c:
            row = c.execute("SELECT image, other FROM profile_events WHERE id = ? AND owner = ?",
                            (event_id, owner)).fetchone()
            if row is None:
                raise ConceptNotFound(f"user {owner!r} has no profile entry {event_id!r}")
            self._profile_shrinks(c, owner)
            c.execute("DELETE FROM profile_events WHERE id = ?", (event_id,))
            self._drop_orphan_images(c, [h for h in row if h])
            marks = ", ".join("?" * len(PROFILE_ARTEFACTS))
            removed = sorted(r[0] for r in c.execute(
                f"SELECT name FROM owner_blobs WHERE owner = ? AND name IN ({marks})", (owner, *PROFILE_ARTEFACTS)))
            c.execute(f"DELETE FROM owner_blobs WHERE owner = ? AND name IN ({marks})", (owner, *PROFILE_ARTEFACTS))
            self._bump(c, owner)
        return removed

    def _delete_profile(self, c, owner: str) -> list[str]:
        hashes = [h for row in c.execute("SELECT image, other FROM profile_events WHERE owner = ?", (owner,))
                  for h in row if h]
        c.execute("DELETE FROM profile_events WHERE owner = ?", (owner,))
        return hashes

    def reset_profile(self, owner: str) -> int:
        """Forget the user's whole preference profile (events, derived artefacts); returns events removed."""
        check_owner(owner)
        with self._tx() as c:
            self._profile_shrinks(c, owner)
            n = c.execute("SELECT count(*) FROM profile_events WHERE owner = ?", (owner,)).fetchone()[0]
            self._drop_orphan_images(c, self._delete_profile(c, owner))
            c.execute("DELETE FROM owner_blobs WHERE owner = ?", (owner,))
            c.execute("DELETE FROM owner_settings WHERE owner = ? AND key LIKE 'profile.%'", (owner,))
            self._bump(c, owner)
        return n

    def profile_generation(self, owner: str) -> int:
        """A number that grows whenever the owner's preference profile loses entries (an event removed, a reset,
        an erasure); 0 before the first. Read it before the events a result is computed from, and store the
        result with `put_blob(..., profile_generation=)`: it lands only if nothing was removed meanwhile. Adding
        events leaves it as it is: a result computed from events that are all still there stays valid."""
        check_owner(owner)
        row = self._conn.execute("SELECT generation FROM profile_generations WHERE owner = ?", (owner,)).fetchone()
        return int(row[0]) if row else 0

    def _profile_shrinks(self, c, owner: str) -> None:
        """Bump the owner's profile generation: first in its transaction, so that on PostgreSQL a concurrent
        `_check_profile_generation` either finished before (its artefact is then deleted here) or waits for this
        commit (and sees the new generation). Never reset, not even by an erasure: an old value never returns."""
        c.execute("INSERT INTO profile_generations VALUES (?, 1) ON CONFLICT (owner) DO UPDATE SET "
                  "generation = profile_generations.generation + 1", (owner,))

    def _check_profile_generation(self, c, owner: str, expected: int) -> None:
        from .types import ProfileChanged

        # the row is made to exist before it is locked: an uncommitted one of a concurrent reset is waited for
        self._insert(c, "profile_generations", [(owner, 0)], "ignore")
        row = c.execute(f"SELECT generation FROM profile_generations WHERE owner = ?{self._FOR_UPDATE}",
                        (owner,)).fetchone()
        if int(row[0]) != expected:
            raise ProfileChanged(f"the preference profile of {owner!r} was reset or lost entries while this was "
                                 "computed from it: nothing was stored (run it again on the profile as it is now)")

    # ------------------------------------------------------------------ memory

    def add_memory(self, owner: str, text: str, *, concept_id: str | None = None, kind: str = "fact",
                   topic: str = "", status: str = "accepted", source: str = "", valid_from: float | None = None,
                   entry_id: str | None = None, created: float | None = None,
                   updated: float | None = None) -> MemoryEntry:
        """Remember something the user said (`MemoryEntry`), about their concept `concept_id` or about them.

        An accepted state replaces the current state of the same concept and topic that holds from an earlier
        time (or is itself history, when a newer one is already known). `entry_id`, `created` and `updated`
        restore an entry as it was (migrations)."""
        check_owner(owner)
        now = time.time()
        text, kind, topic, status, source = _memory_fields(text, kind, topic, status, source)
        entry = MemoryEntry(_restored_id(entry_id) or new_id(), owner, text, concept_id, kind, topic, status, source,
                            valid_from=float(valid_from) if valid_from is not None else now,
                            created=float(created) if created is not None else now,
                            updated=float(updated) if updated is not None else now)
        with self._tx() as c:
            self._check_memory_concept(c, owner, concept_id)
            self._charge(c, owner, memory=1)
            self._insert(c, "memory_entries", [_memory_row(entry)])
            self._resolve_states(c, owner, entry)
            self._bump(c, owner)
        return self.memory_entry(owner, entry.id)

    def memory_entry(self, owner: str, entry_id: str) -> MemoryEntry:
        check_owner(owner)
        row = self._conn.execute(f"SELECT {_MEMORY_COLUMNS} FROM memory_entries WHERE id = ? AND owner = ?",
                                 (entry_id, owner)).fetchone()
        if row is None:
            raise ConceptNotFound(f"user {owner!r} has no memory entry {entry_id!r}")
        return MemoryEntry(*row[:2], *_memory_tail(row))

    def memory(self, owner: str, *, concept_ids: Sequence[str | None] | None = None, status: str | None = None,
               current: bool = False, limit: int | None = None, offset: int = 0) -> list[MemoryEntry]:
        """The owner's memory entries, newest first (by `valid_from`, then `created`): of `concept_ids` only when
        given (None in it: the entries about the user), with `status` only, or only the `current` ones
        (accepted, not superseded)."""
        check_owner(owner)
        sql = f"SELECT {_MEMORY_COLUMNS} FROM memory_entries WHERE owner = ?"
        args: list[Any] = [owner]
        if concept_ids is not None:
            ids = [i for i in concept_ids if i is not None]
            parts = [f"concept_id IN ({', '.join('?' * len(ids))})"] if ids else []
            if len(ids) != len(concept_ids):
                parts.append("concept_id IS NULL")
            if not parts:
                return []
            sql += " AND (" + " OR ".join(parts) + ")"
            args += ids
        if current:
            sql += " AND status = 'accepted' AND superseded_by IS NULL"
        elif status is not None:
            sql += " AND status = ?"
            args.append(status)
        sql += f" ORDER BY valid_from DESC, created DESC, id{self._COLLATE}"
        if limit is not None:
            sql += " LIMIT ? OFFSET ?"
            args += [int(limit), int(offset)]
        return [MemoryEntry(*r[:2], *_memory_tail(r)) for r in self._conn.execute(sql, args)]

    def update_memory(self, owner: str, entry_id: str, **fields: Any) -> MemoryEntry:
        """Change an entry's `text`, `kind`, `topic`, `status` (accept a proposal), `concept_id` or `valid_from`;
        the states it leaves and joins are put in order again."""
        allowed = {"text", "kind", "topic", "status", "concept_id", "valid_from"}
        unknown = set(fields) - allowed
        if unknown:
            raise InvalidConceptError(f"cannot change {sorted(unknown)} of a memory entry; valid: {sorted(allowed)}")
        check_owner(owner)
        with self._tx() as c:
            row = c.execute(f"SELECT {_MEMORY_COLUMNS} FROM memory_entries WHERE id = ? AND owner = ?"
                            f"{self._FOR_UPDATE}", (entry_id, owner)).fetchone()
            if row is None:
                raise ConceptNotFound(f"user {owner!r} has no memory entry {entry_id!r}")
            old = MemoryEntry(*row[:2], *_memory_tail(row))
            merged = {f: fields.get(f, getattr(old, f)) for f in ("text", "kind", "topic", "status")}
            text, kind, topic, status, source = _memory_fields(**merged, source=old.source)
            new = replace(old, text=text, kind=kind, topic=topic, status=status,
                          concept_id=fields.get("concept_id", old.concept_id),
                          valid_from=float(fields.get("valid_from", old.valid_from)), updated=time.time(),
                          superseded_by=None)
            if new.concept_id != old.concept_id:
                self._check_memory_concept(c, owner, new.concept_id)
            c.execute("DELETE FROM memory_entries WHERE id = ?", (entry_id,))
            self._insert(c, "memory_entries", [_memory_row(new)])
            self._resolve_states(c, owner, old)
            self._resolve_states(c, owner, new)
            self._bump(c, owner)
        return self.memory_entry(owner, entry_id)

    def delete_memory(self, owner: str, entry_id: str) -> None:
        """Forget one entry; a state it had replaced is current again."""
        check_owner(owner)
        with self._tx() as c:
            row = c.execute(f"SELECT {_MEMORY_COLUMNS} FROM memory_entries WHERE id = ? AND owner = ?",
                            (entry_id, owner)).fetchone()
            if row is None:
                raise ConceptNotFound(f"user {owner!r} has no memory entry {entry_id!r}")
            c.execute("DELETE FROM memory_entries WHERE id = ?", (entry_id,))
            self._resolve_states(c, owner, MemoryEntry(*row[:2], *_memory_tail(row)))
            self._bump(c, owner)

    def _check_memory_concept(self, c, owner: str, concept_id: str | None) -> None:
        if concept_id is not None and c.execute("SELECT 1 FROM concepts WHERE id = ? AND owner = ?",
                                                (concept_id, owner)).fetchone() is None:
            raise ConceptNotFound(f"user {owner!r} has no concept {concept_id!r}")

    def _resolve_states(self, c, owner: str, entry: MemoryEntry) -> None:
        """Put the accepted states of `entry`'s concept and topic in order: each is replaced by the next newer one
        (`superseded_by`), the newest is current. Facts and proposals are never superseded."""
        if entry.kind != "state":
            return
        where = "concept_id IS NULL" if entry.concept_id is None else "concept_id = ?"
        args = [owner, entry.topic] + ([] if entry.concept_id is None else [entry.concept_id])
        chain = c.execute(f"SELECT id, superseded_by FROM memory_entries WHERE owner = ? AND kind = 'state' AND "
                          f"status = 'accepted' AND topic = ? AND {where} ORDER BY valid_from, created, id",
                          args).fetchall()
        chain = [tuple(r) for r in chain]
        for (eid, was), after in zip(chain, [r[0] for r in chain[1:]] + [None], strict=False):
            if was != after:
                c.execute("UPDATE memory_entries SET superseded_by = ? WHERE id = ?", (after, eid))

    # ------------------------------------------------------------------ conversations

    def start_conversation(self, owner: str, title: str = "", *, conversation_id: str | None = None,
                           created: float | None = None, updated: float | None = None) -> Conversation:
        """A new kept chat (`Conversation`); its first turn names it when `title` is empty. `conversation_id`,
        `created` and `updated` restore one as it was (migrations, imports)."""
        check_owner(owner)
        title = _title(title)
        now = time.time()
        chat = Conversation(_restored_id(conversation_id) or new_id(), owner, title,
                            float(created) if created is not None else now,
                            float(updated) if updated is not None else now)
        with self._tx() as c:
            if conversation_id is not None and c.execute("SELECT 1 FROM conversations WHERE id = ?",
                                                         (chat.id,)).fetchone() is not None:
                raise InvalidConceptError(f"conversation id {chat.id!r} is taken (ids are unique across users)")
            self._charge(c, owner, conversations=1)
            self._insert(c, "conversations", [(chat.id, owner, chat.title, chat.created, chat.updated)])
            self._bump(c, owner)
        return chat

    def conversation(self, owner: str, conversation_id: str) -> Conversation:
        check_owner(owner)
        row = self._conn.execute(
            "SELECT c.id, c.owner, c.title, c.created, c.updated, (SELECT COUNT(*) FROM conversation_turns t "
            "WHERE t.conversation_id = c.id) FROM conversations c WHERE c.id = ? AND c.owner = ?",
            (conversation_id, owner)).fetchone()
        if row is None:
            raise _no_conversation(owner, conversation_id)
        return _conversation(row)

    def conversations(self, owner: str, *, limit: int = 100, offset: int = 0) -> list[Conversation]:
        """The owner's kept chats, the most recently continued first."""
        check_owner(owner)
        rows = self._conn.execute(
            "SELECT c.id, c.owner, c.title, c.created, c.updated, (SELECT COUNT(*) FROM conversation_turns t "
            "WHERE t.conversation_id = c.id) FROM conversations c WHERE c.owner = ? "
            f"ORDER BY c.updated DESC, c.id{self._COLLATE} DESC LIMIT ? OFFSET ?", (owner, int(limit), int(offset)))
        return [_conversation(r) for r in rows]

    def all_conversations(self, owner: str, *, page: int = 500) -> list[Conversation]:
        """Every kept chat of the owner (read a page at a time), the most recently continued first."""
        return _paged(lambda offset: self.conversations(owner, limit=page, offset=offset), page)

    def turns(self, owner: str, conversation_id: str, *, last: int | None = None) -> list[Turn]:
        """A kept chat's turns, oldest first (the `last` ones only, when given)."""
        self.conversation(owner, conversation_id)  # the owner's, or not found
        sql = ("SELECT position, question, answer, image, created FROM conversation_turns WHERE conversation_id = ? "
               "AND owner = ? ORDER BY position DESC")
        args: list[Any] = [conversation_id, owner]
        if last is not None:
            sql += " LIMIT ?"
            args.append(max(0, int(last)))
        return [Turn(int(p), q, a, i, float(t)) for p, q, a, i, t in reversed(self._conn.execute(sql, args))]

    def add_turn(self, owner: str, conversation_id: str, question: str, answer: str, *, image: bytes | None = None,
                 created: float | None = None) -> Turn:
        """Keep one question and its answer at the end of a chat, with the photo it was about (stored once, by
        content hash); an untitled chat takes its title from its first question."""
        check_owner(owner)
        question = check_text(question, "question", MAX_TURN_TEXT)
        answer = check_text(answer, "answer", MAX_TURN_TEXT)
        blob = _image_blobs([image])[0] if image is not None else None
        digest = content_hash(blob) if blob is not None else None
        when = float(created) if created is not None else time.time()
        with self._tx() as c:
            row = c.execute(f"SELECT title, updated FROM conversations WHERE id = ? AND owner = ?{self._FOR_UPDATE}",
                            (conversation_id, owner)).fetchone()
            if row is None:
                raise _no_conversation(owner, conversation_id)
            known = digest is not None and c.execute(
                "SELECT 1 FROM conversation_turns WHERE owner = ? AND image = ? LIMIT 1", (owner, digest)).fetchone()
            self._charge(c, owner, turns=1, size=len(blob) if blob is not None and not known else 0)
            (position,) = c.execute("SELECT COALESCE(MAX(position), -1) + 1 FROM conversation_turns "
                                    "WHERE conversation_id = ?", (conversation_id,)).fetchone()
            if blob is not None:
                self._store_images(c, [(digest, blob, hash_key(digest))])
            self._insert(c, "conversation_turns", [(conversation_id, int(position), owner, question, answer, digest,
                                                    when)])
            title = row[0] or _title(" ".join(question.split())[:60])
            c.execute("UPDATE conversations SET title = ?, updated = ? WHERE id = ?",
                      (title, max(float(row[1]), when), conversation_id))
            self._bump(c, owner)
        return Turn(int(position), question, answer, digest, when)

    def rename_conversation(self, owner: str, conversation_id: str, title: str) -> Conversation:
        check_owner(owner)
        title = _title(title)
        with self._tx() as c:
            if c.execute("UPDATE conversations SET title = ?, updated = ? WHERE id = ? AND owner = ?",
                         (title, time.time(), conversation_id, owner)).rowcount == 0:
                raise _no_conversation(owner, conversation_id)
            self._bump(c, owner)
        return self.conversation(owner, conversation_id)

    def delete_conversation(self, owner: str, conversation_id: str) -> None:
        """Forget a kept chat, its turns and the photos nothing else uses."""
        check_owner(owner)
        with self._tx() as c:
            if c.execute("SELECT 1 FROM conversations WHERE id = ? AND owner = ?",
                         (conversation_id, owner)).fetchone() is None:
                raise _no_conversation(owner, conversation_id)
            hashes = [r[0] for r in c.execute("SELECT DISTINCT image FROM conversation_turns WHERE conversation_id = ? "
                                              "AND image IS NOT NULL", (conversation_id,))]
            c.execute("DELETE FROM conversation_turns WHERE conversation_id = ?", (conversation_id,))
            c.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))
            self._drop_orphan_images(c, hashes)
            self._bump(c, owner)

    def _delete_conversations(self, c, owner: str) -> list[str]:
        hashes = [r[0] for r in c.execute("SELECT DISTINCT image FROM conversation_turns WHERE owner = ? "
                                          "AND image IS NOT NULL", (owner,))]
        c.execute("DELETE FROM conversation_turns WHERE owner = ?", (owner,))
        c.execute("DELETE FROM conversations WHERE owner = ?", (owner,))
        return hashes

    # ------------------------------------------------------------------ artefacts

    def put_blob(self, owner: str, name: str, data: bytes, *, model: str,
                 profile_generation: int | None = None) -> None:
        """Store a per-user safetensors artefact (reward model, LoRA), tagged with the model it fits.

        `profile_generation`: the owner's `profile_generation()` read before the profile events the artefact was
        computed from; if the profile has lost entries since, nothing is stored and `ProfileChanged` is raised
        (checked in this write's transaction)."""
        check_owner(owner)
        _check_safetensors(data, f"blob {name!r}")
        with self._tx() as c:
            if profile_generation is not None:
                self._check_profile_generation(c, owner, profile_generation)
            self._insert(c, "owner_blobs", [(owner, name, model, bytes(data), time.time())], "replace")

    def blob_names(self, owner: str) -> list[str]:
        check_owner(owner)
        return [r[0] for r in self._conn.execute(
            f"SELECT name FROM owner_blobs WHERE owner = ? ORDER BY name{self._COLLATE}", (owner,))]

    def get_blob(self, owner: str, name: str) -> tuple[bytes, str] | None:
        """(data, model) of a per-user artefact, or None."""
        check_owner(owner)
        row = self._conn.execute("SELECT data, model FROM owner_blobs WHERE owner = ? AND name = ?",
                                 (owner, name)).fetchone()
        return (row[0], row[1]) if row else None

    # ------------------------------------------------------------------ learned tensors

    def put_tensor(self, owner: str, concept_id: str, name: str, data: bytes, *, model: str,
                   fingerprint: str) -> None:
        """Store a safetensors blob for a concept, tagged with the model (and tokenizer fingerprint) it fits."""
        self.get(owner, concept_id)
        _check_safetensors(data, f"tensor {name!r}")
        with self._tx() as c:
            self._insert(c, "tensors", [(concept_id, name, model, fingerprint, bytes(data), time.time())], "replace")
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



class _Rows(list):
    """A fully fetched result with the cursor methods this module uses."""

    rowcount = -1

    def fetchone(self):
        return self[0] if self else None

    def fetchall(self):
        return list(self)


def _json(value: Any) -> Any:
    """An aggregated JSON column: text from SQLite, already parsed from PostgreSQL."""
    return json.loads(value) if isinstance(value, str) else value


def _memory_fields(text: Any, kind: Any, topic: Any, status: Any, source: Any) -> tuple[str, str, str, str, str]:
    """A memory entry's text fields, checked: (text, kind, topic, status, source)."""
    from .types import MAX_MEMORY_TEXT, MAX_MEMORY_TOPIC, MEMORY_KINDS, MEMORY_STATUSES

    text = check_text(text, "memory text", MAX_MEMORY_TEXT).strip()
    if not text:
        raise InvalidConceptError("a memory entry needs a non-empty text")
    if kind not in MEMORY_KINDS:
        raise InvalidConceptError(f"unknown memory kind {kind!r}; valid: {', '.join(MEMORY_KINDS)}")
    if status not in MEMORY_STATUSES:
        raise InvalidConceptError(f"unknown memory status {status!r}; valid: {', '.join(MEMORY_STATUSES)}")
    topic = " ".join(check_text(topic, "memory topic", MAX_MEMORY_TOPIC).lower().split())
    if kind == "state" and not topic:
        raise InvalidConceptError("a state needs a topic (what it is the state of, e.g. 'age' or 'bed'): a newer "
                                  "state of the same concept and topic replaces it")
    return text, kind, topic, status, check_text(source, "memory source", 200)


def _paged(read: Any, page: int) -> list:
    """Every row `read(offset)` gives, a page at a time, until a page comes back short."""
    out: list = []
    while True:
        got = read(len(out))
        out += got
        if len(got) < page:
            return out


def _no_conversation(owner: str, conversation_id: Any) -> ConceptNotFound:
    return ConceptNotFound(f"user {owner!r} has no conversation {str(conversation_id)[:64]!r}")


def _title(title: Any) -> str:
    return " ".join(check_text(title, "conversation title", MAX_CONVERSATION_TITLE).split())


def _conversation(row: Sequence[Any]) -> Conversation:
    cid, owner, title, created, updated, turns = row
    return Conversation(cid, owner, title, float(created), float(updated), int(turns))


def _memory_row(e: MemoryEntry) -> tuple:
    return (e.id, e.owner, e.text, e.concept_id, e.kind, e.topic, e.status, e.source, e.valid_from, e.superseded_by,
            e.created, e.updated)


def _memory_tail(row: Sequence[Any]) -> tuple:
    """A memory row's fields after (id, owner), in `MemoryEntry`'s order."""
    _, _, text, concept_id, kind, topic, status, source, valid_from, superseded_by, created, updated = row
    return (text, concept_id, kind, topic, status, source, float(valid_from), superseded_by, float(created),
            float(updated))


def new_id() -> str:
    """A time-ordered id (nanoseconds, then randomness): new rows append to the id indexes instead of landing
    at random places in them, which keeps bulk inserts fast."""
    return new_ids(1)[0]


def new_ids(n: int) -> list[str]:
    """`n` time-ordered ids at once (one clock read and one draw of randomness for all of them)."""
    now, rand = time.time_ns(), secrets.token_hex(8 * n)
    return [f"{now + i:016x}{rand[16 * i : 16 * i + 16]}" for i in range(n)]


def _check_lookalike(owner: str, handle: str, looks: dict[str, tuple[str, str]], concept_id: str | None) -> None:
    """Refuse a handle that looks like a different handle of another of the owner's concepts."""
    seen = looks.get(handle_skeleton(handle))
    if seen is not None and seen[0] != handle and seen[1] != concept_id:
        raise DuplicateConceptError(f"<{handle}> looks the same as user {owner!r}'s existing <{seen[0]}> "
                                    "(a lookalike letter from another script); choose a distinct name")


class ConceptDBConflict(InvalidConceptError):
    """An update's `expected_version` no longer matches: someone else changed the concept first."""


def _check_safetensors(data: Any, what: str) -> None:
    """Only safetensors bytes are stored as tensors (never pickle): parse them fully before writing."""
    from safetensors import SafetensorError
    from safetensors.numpy import load as load_safetensors

    try:
        load_safetensors(bytes(data))
    except (SafetensorError, ValueError, TypeError) as e:
        raise InvalidConceptError(f"{what} is not valid safetensors data ({e})") from e


def _image_blobs(images: Sequence[bytes]) -> list[bytes]:
    out = []
    for i, data in enumerate(images):
        if not isinstance(data, (bytes, bytearray)) or not data:
            raise InvalidConceptError(f"image {i} must be non-empty encoded bytes")
        out.append(data if type(data) is bytes else bytes(data))
    return out


def _as_matrix(embedder: str, vectors: Any, n: int) -> "np.ndarray":
    import numpy as np

    if not isinstance(embedder, str) or not embedder:
        raise InvalidConceptError("embedder name must be a non-empty string")
    arr = np.asarray(vectors, dtype=np.float32)
    if arr.ndim != 2 or arr.shape[0] != n:
        raise InvalidConceptError(f"expected {n} vectors for {embedder!r}, got an array of shape {arr.shape}")
    return arr


def _normalized(embedder: str, vectors: Any, n: int) -> "np.ndarray":
    """Vectors as a contiguous float32 (n, dim) array, L2-normalised; NaN, infinity and zero vectors refused."""
    import numpy as np

    arr = _as_matrix(embedder, vectors, n)
    if not np.isfinite(arr).all():
        raise InvalidConceptError(f"vectors for {embedder!r} contain NaN or infinity")
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    if (norms < 1e-12).any():
        raise InvalidConceptError(f"vectors for {embedder!r} contain a zero vector")
    return np.ascontiguousarray(arr / _divisors(norms[:, 0], np.ones(n, dtype=bool))[:, None], dtype=np.float32)


def _divisors(norms: "np.ndarray", ok: "np.ndarray") -> "np.ndarray":
    """Row norms to divide by; rows already unit length (to float32 precision) are left bit-identical, so that
    stored vectors survive an export/import round trip unchanged."""
    import numpy as np

    return np.where(ok & (np.abs(norms - 1.0) > 1e-6), norms, 1.0).astype(np.float32)


def _normalize_all(prepared: list[dict[str, Any]], reject) -> list[dict[str, Any]]:
    """L2-normalise every item's vectors, one numpy pass per embedder and dimension for the whole batch.

    Items holding a NaN, infinite or zero vector are rejected (raised, or skipped and reported)."""
    import numpy as np

    groups: dict[tuple[str, int], list[int]] = {}
    for i, p in enumerate(prepared):
        for embedder, arr in p["embeddings"].items():
            if arr.shape[0]:
                groups.setdefault((embedder, arr.shape[1]), []).append(i)
    bad: set[int] = set()
    for (embedder, _dim), members in groups.items():
        arrays = [prepared[i]["embeddings"][embedder] for i in members]
        stacked = np.concatenate(arrays)
        norms = np.linalg.norm(stacked, axis=1)
        ok_rows = np.isfinite(stacked).all(axis=1) & (norms > 1e-12)
        normalized = stacked / _divisors(norms, ok_rows)[:, None]
        ends = np.cumsum([arr.shape[0] for arr in arrays])
        starts = np.concatenate(([0], ends[:-1]))
        ok_items = np.logical_and.reduceat(ok_rows, starts)  # every member has at least one row
        for i, start, end, ok in zip(members, starts.tolist(), ends.tolist(), ok_items.tolist(),
                                     strict=True):
            if ok:
                prepared[i]["embeddings"][embedder] = normalized[start:end]
            elif i not in bad:
                bad.add(i)
                reject(prepared[i]["name"], InvalidConceptError(
                    f"vectors for {embedder!r} contain NaN, infinity or a zero vector"))
    return [p for i, p in enumerate(prepared) if i not in bad]


def _prepare(item: NewConcept) -> dict[str, Any]:
    """Validate one new concept completely, before any write."""
    if not isinstance(item, NewConcept):
        raise InvalidConceptError(f"expected a NewConcept, got {type(item).__name__}")
    name = normalize_name(item.name)
    images = _image_blobs(item.images)
    hashes = [content_hash(d) for d in images]
    embeddings = {e: _as_matrix(e, v, len(images)) for e, v in (item.embeddings or {}).items()}
    seen: dict[str, int] = {}
    for i, h in enumerate(hashes):
        seen.setdefault(h, i)
    first = list(seen.values())
    if len(first) < len(hashes):  # the same image given twice is kept once (with its first vector)
        images, hashes = [images[i] for i in first], [hashes[i] for i in first]
        embeddings = {e: m[first] for e, m in embeddings.items()}
    return {
        "name": name,
        "aliases": _aliases(item.aliases, name),
        "category": check_text(item.category, "category", 200),
        "info": check_text(item.info, "info"),
        "attributes": _attributes(item.attributes),
        "images": images,
        "hashes": hashes,
        "embeddings": embeddings,
        "id": _restored_id(item.id),
        "created": float(item.created) if item.created is not None else None,
        "updated": float(item.updated) if item.updated is not None else None,
        "version": int(item.version) if item.version is not None else None,
    }


def _restored_id(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not re.fullmatch(r"[0-9a-f]{16,64}", value):
        raise InvalidConceptError(f"concept id {value!r} is not a valid id")
    return value


def _aliases(aliases: Sequence[str], name: str | None = None) -> list[str]:
    """The aliases normalized, each once, in order, without `name`: at most `MAX_ALIASES`, refused before any
    other work (and before any lock is taken: the callers run this first)."""
    aliases = [aliases] if isinstance(aliases, str) else list(aliases)
    if len(aliases) > MAX_ALIASES:
        raise InvalidConceptError(f"a concept takes at most {MAX_ALIASES} aliases, got {len(aliases)}")
    out = dict.fromkeys(normalize_name(a, "alias") for a in aliases)
    out.pop(name, None)
    return list(out)


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
