"""The embedded backend: one SQLite file (WAL) plus an in-process, per-owner vector matrix.

Layout: embeddings live in a WITHOUT ROWID table keyed `(owner, embedder, concept_id, image_hash)`, so one
owner's vectors are physically contiguous and load with one range scan, lazily, on that owner's first query.
Images are a rowid table found by content hash through a small index on `hkey`, the hash's first 64 bits (every
lookup compares the full hash too), and concept-image links refer to them by id (migration 4): new images append.
Writes made through this store update its matrices at once; writes from other processes are noticed through
`PRAGMA data_version` plus a per-owner revision counter, so only the owners that changed are reloaded.
Search is exact (a matrix-vector product over the owner's vectors): at per-owner sizes it is both exact and
faster than the approximate indexes we measured (see shared/STORAGE_FACTS.md).
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from .sql import TABLES, SQLStore, _Rows
from .sql import ConceptDBConflict, new_id  # noqa: F401  (re-exported: their historical home)
from .types import Concept, InvalidConceptError, Match, check_owner, hash_key

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
    ) WITHOUT ROWID;
    -- names and aliases share one namespace per owner
    CREATE TABLE handles (
        owner TEXT NOT NULL,
        handle TEXT NOT NULL,
        concept_id TEXT NOT NULL,
        is_alias INTEGER NOT NULL,
        PRIMARY KEY (owner, handle)
    ) WITHOUT ROWID;
    CREATE INDEX handles_concept ON handles (concept_id);
    CREATE TABLE images (
        hash TEXT PRIMARY KEY,
        data BLOB NOT NULL,
        size INTEGER NOT NULL
    ) WITHOUT ROWID;
    -- handles, concept_images and embeddings carry no foreign keys: checking them cost more than half of a
    -- bulk insert, and every delete in this module removes child rows itself, in the same transaction
    CREATE TABLE concept_images (
        concept_id TEXT NOT NULL,
        hash TEXT NOT NULL,
        position INTEGER NOT NULL,
        PRIMARY KEY (concept_id, hash)
    ) WITHOUT ROWID;
    CREATE INDEX concept_images_hash ON concept_images (hash);
    -- keyed by owner first: one owner's vectors are stored together and load with one range scan
    CREATE TABLE embeddings (
        owner TEXT NOT NULL,
        embedder TEXT NOT NULL,
        concept_id TEXT NOT NULL,
        image_hash TEXT NOT NULL,
        vector BLOB NOT NULL,
        PRIMARY KEY (owner, embedder, concept_id, image_hash)
    ) WITHOUT ROWID;
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
    (2, """
    -- per-user settings, e.g. the retrieval threshold chosen by `concepts calibrate`
    CREATE TABLE owner_settings (
        owner TEXT NOT NULL,
        key TEXT NOT NULL,
        value TEXT NOT NULL,
        PRIMARY KEY (owner, key)
    ) WITHOUT ROWID;
    """),
    (3, """
    -- text-to-image preference history: likes, dislikes (with comments), pairwise choices, prompts
    CREATE TABLE profile_events (
        id TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        kind TEXT NOT NULL,
        prompt TEXT NOT NULL DEFAULT '',
        image TEXT,
        other TEXT,
        comment TEXT NOT NULL DEFAULT '',
        created REAL NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX profile_events_owner ON profile_events (owner, kind, created);
    CREATE INDEX profile_events_image ON profile_events (image);
    CREATE INDEX profile_events_other ON profile_events (other);
    -- per-user binary artefacts: reward model weights, LoRA weights (safetensors only)
    CREATE TABLE owner_blobs (
        owner TEXT NOT NULL,
        name TEXT NOT NULL,
        model TEXT NOT NULL,
        data BLOB NOT NULL,
        created REAL NOT NULL,
        PRIMARY KEY (owner, name)
    ) WITHOUT ROWID;
    """),
    (4, """
    -- Images become a rowid table found through hkey (types.hash_key: the hash's first 64 bits; every lookup
    -- compares the full hash too), and links refer to them by id. Keyed by the 64-character hash, as before,
    -- every bulk insert landed at random places in two trees of ~100 bytes per image (images, and the links'
    -- hash index): past a few hundred thousand images nearly every page of both was rewritten at each commit.
    -- Now the only such tree is the hkey index (~15 bytes per image); new rows append everywhere else.
    CREATE TABLE images_v4 (
        hash TEXT NOT NULL,
        data BLOB NOT NULL,
        size INTEGER NOT NULL,
        hkey INTEGER NOT NULL,
        id INTEGER PRIMARY KEY
    );
    INSERT INTO images_v4 (hash, data, size, hkey) SELECT hash, data, size, mmp_hash_key(hash) FROM images;
    CREATE INDEX images_hkey ON images_v4 (hkey);
    CREATE TABLE concept_images_v4 (
        concept_id TEXT NOT NULL,
        hash TEXT NOT NULL,
        position INTEGER NOT NULL,
        image_id INTEGER NOT NULL,
        PRIMARY KEY (concept_id, hash)
    ) WITHOUT ROWID;
    INSERT INTO concept_images_v4 SELECT ci.concept_id, ci.hash, ci.position, i.id FROM concept_images ci
        JOIN images_v4 i ON i.hkey = mmp_hash_key(ci.hash) AND i.hash = ci.hash;
    DROP TABLE concept_images;
    DROP TABLE images;
    ALTER TABLE images_v4 RENAME TO images;
    ALTER TABLE concept_images_v4 RENAME TO concept_images;
    CREATE INDEX concept_images_image ON concept_images (image_id);
    """),
    (5, """
    -- bumped whenever an owner's preference profile loses entries (an event removed, a reset, an erasure): a
    -- result derived from the profile is stored only if the generation read with its events is still current
    CREATE TABLE profile_generations (owner TEXT PRIMARY KEY, generation INTEGER NOT NULL) WITHOUT ROWID;
    """),
    (6, """
    -- what the user told the assistant (types.MemoryEntry): facts, and states that hold until a newer one
    CREATE TABLE memory_entries (
        id TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        text TEXT NOT NULL,
        concept_id TEXT,
        kind TEXT NOT NULL,
        topic TEXT NOT NULL,
        status TEXT NOT NULL,
        source TEXT NOT NULL,
        valid_from REAL NOT NULL,
        superseded_by TEXT,
        created REAL NOT NULL,
        updated REAL NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX memory_entries_owner ON memory_entries (owner, concept_id);
    """),
    (7, """
    -- chats the user can come back to (types.Conversation) and their turns (types.Turn: a photo by content hash)
    CREATE TABLE conversations (
        id TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        title TEXT NOT NULL,
        created REAL NOT NULL,
        updated REAL NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX conversations_owner ON conversations (owner, updated);
    CREATE TABLE conversation_turns (
        conversation_id TEXT NOT NULL,
        position INTEGER NOT NULL,
        owner TEXT NOT NULL,
        question TEXT NOT NULL,
        answer TEXT NOT NULL,
        image TEXT,
        created REAL NOT NULL,
        PRIMARY KEY (conversation_id, position)
    ) WITHOUT ROWID;
    CREATE INDEX conversation_turns_owner ON conversation_turns (owner, image);
    CREATE INDEX conversation_turns_image ON conversation_turns (image);
    """),
]


class _LockedConnection:
    def __init__(self, conn: sqlite3.Connection, lock: threading.RLock):
        self._conn, self._lock = conn, lock

    def execute(self, sql: str, args: Sequence[Any] = ()) -> _Rows:
        with self._lock:
            cur = self._conn.execute(sql, args)
            rows = _Rows(cur.fetchall())
            rows.rowcount = cur.rowcount
            return rows

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        with self._lock:
            self._conn.executemany(sql, rows)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def total_changes(self) -> int:
        return self._conn.total_changes


class _Checkpointer:
    """Copies committed WAL frames into the database file from a thread and connection of its own.

    SQLite's automatic checkpoint runs inside the COMMIT that crosses its threshold, so the writer waits while
    the frames are copied and the file is fsynced: in a 1M-vector bulk import that wait was about a quarter of
    the insert time, and the disk idled while Python prepared the next batch. Here the writer only pokes this
    thread after a commit (the store's own automatic checkpoint stays as a backstop at `BACKSTOP_PAGES`).
    Durability is unchanged (WAL, synchronous=NORMAL); a checkpoint cut short by a crash is redone on open.
    """

    MIN_INTERVAL_S = 0.1  # many small commits share one checkpoint (and one fsync)
    BACKSTOP_PAGES = 65536  # 1 GiB of 16 KiB pages: the writer checkpoints itself if this thread falls behind

    def __init__(self, path: Path):
        self.path = path
        self.lock = threading.Lock()  # held while a checkpoint runs; optimize() takes it too
        self._wake, self._stop = threading.Event(), threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()

    def poke(self) -> None:
        if self._stop.is_set():
            return
        if self._pid != os.getpid():  # a forked child: nothing of the parent's thread is here
            self.lock, self._wake, self._thread, self._pid = threading.Lock(), threading.Event(), None, os.getpid()
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name=f"mmpersona-checkpoint:{self.path.name}",
                                            daemon=True)
            self._thread.start()
        self._wake.set()

    def _run(self) -> None:
        try:  # mode=rw: never create a file that is gone
            conn = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=rw", uri=True, isolation_level=None,
                                   check_same_thread=False)
        except sqlite3.Error:
            return
        try:
            while not self._stop.is_set():
                if not self._wake.wait(timeout=1.0):
                    continue
                self._wake.clear()
                with self.lock:
                    if self._stop.is_set():
                        break
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()  # never blocks readers or writers
                self._stop.wait(self.MIN_INTERVAL_S)
        except sqlite3.Error:  # the file went away or is unreadable: the writer's own checkpoint takes over
            pass
        finally:
            conn.close()

    def stop(self) -> None:
        """Let the thread end (also when its store is garbage-collected without being closed)."""
        self._stop.set()
        self._wake.set()

    def close(self) -> None:
        self.stop()
        if self._thread is not None and self._pid == os.getpid():
            self._thread.join()


#: Memory for owners' vectors held between queries (`MMPERSONA_VECTOR_CACHE_MB` overrides); at 512-d float32
#: the default holds about 500k vectors, i.e. 50 owners of 10k concepts.
DEFAULT_CACHE_BYTES = int(float(os.environ.get("MMPERSONA_VECTOR_CACHE_MB", "1024")) * 1024 * 1024)


@dataclass
class _OwnerIndex:
    revision: int
    matrix: "np.ndarray"  # (n, dim) float32, rows grouped by concept
    concept_ids: list[str]  # one per group
    starts: "np.ndarray"  # first row of each concept group
    image_hashes: list[str]  # one per row
    categories: "np.ndarray"  # one per concept group (object array of str)
    ends: "np.ndarray"  # one past the last row of each concept group
    single: bool  # one vector per concept: rows are groups, no reduction needed
    records: dict[str, Concept] = field(default_factory=dict)  # concepts already read for this owner


class SQLiteStore(SQLStore):
    """The embedded `ConceptStore`. Thread-safe; several processes may share one file."""

    def __init__(self, path: str | Path, *, cache_bytes: int = DEFAULT_CACHE_BYTES):
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._usage_known, self._usage_after = {}, {}
        # every statement runs under the store's lock and is fully fetched before the lock is released, so one
        # store can serve many threads (the app's workers) through its single connection
        raw = sqlite3.connect(str(self.path), timeout=30, isolation_level=None, check_same_thread=False)
        raw.create_function("mmp_hash_key", 1, hash_key, deterministic=True)  # used by migration 4
        self._conn = _LockedConnection(raw, self._lock)
        self._conn.execute("PRAGMA page_size = 16384")  # 2 KB vectors waste half of a 4 KB page
        self._conn.execute("PRAGMA journal_mode = WAL")
        self._conn.execute("PRAGMA synchronous = NORMAL")
        self._conn.execute("PRAGMA cache_size = -65536")  # 64 MiB: bulk inserts touch many index pages
        self._conn.execute("PRAGMA foreign_keys = ON")
        self._conn.execute(f"PRAGMA wal_autocheckpoint = {_Checkpointer.BACKSTOP_PAGES}")
        self._conn.execute("PRAGMA journal_size_limit = 67108864")  # a WAL grown by a bulk import shrinks back
        self._checkpointer = _Checkpointer(self.path)
        weakref.finalize(self, self._checkpointer.stop)
        self._changes = 0
        self._depth = 0
        self._migrate()
        # owners' vectors in memory, least recently searched first; bounded by `cache_bytes`
        self._indexes: OrderedDict[tuple[str, str], _OwnerIndex] = OrderedDict()
        self.cache_bytes = cache_bytes
        self._data_version = self._read_data_version()

    @property
    def url(self) -> str:
        """What `open_store` takes to open this database again."""
        return str(self.path)

    # ------------------------------------------------------------------ plumbing

    _BEGIN = "BEGIN IMMEDIATE"  # take the write lock at once: no read-then-upgrade deadlocks between processes
    _NON_ASCII = "handle GLOB '*[^ -~]*'"
    _SELECT = (
        "SELECT c.id, c.owner, c.name, c.category, c.info, c.attributes, c.created, c.updated, c.version, "
        "(SELECT json_group_array(handle) FROM (SELECT handle FROM handles "
        "WHERE concept_id = c.id AND is_alias = 1 ORDER BY handle)), "
        "(SELECT json_group_array(hash) FROM (SELECT hash FROM concept_images "
        "WHERE concept_id = c.id ORDER BY position)) FROM {source} c"
    )

    def _insert(self, c, table: str, rows: Sequence[Sequence[Any]], conflict: str = "error") -> None:
        columns, _ = TABLES[table]
        verb = {"error": "INSERT", "ignore": "INSERT OR IGNORE", "replace": "INSERT OR REPLACE"}[conflict]
        c.executemany(f"{verb} INTO {table} VALUES ({', '.join('?' * len(columns))})", rows)

    def _store_images(self, c, images: Sequence[tuple[str, bytes, int]]) -> dict[str, int]:
        # no unique index on the hash (migration 4): look the batch up through hkey, then append the new ones
        # with the next ids. Cannot race: every write runs under BEGIN IMMEDIATE, one writer at a time.
        ids: dict[str, int] = {}
        keys = list({key for _, _, key in images})
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            ids.update(c.execute(f"SELECT hash, id FROM images WHERE hkey IN ({', '.join('?' * len(chunk))})",
                                 chunk))
        new = {h: (data, key) for h, data, key in images if h not in ids}
        if new:
            first = (c.execute("SELECT max(id) FROM images").fetchone()[0] or 0) + 1
            ids.update((h, first + i) for i, h in enumerate(new))
            self._insert(c, "images", [(h, data, len(data), key, ids[h]) for h, (data, key) in new.items()])
        return ids

    def _write_vectors(self, c, owner: str, rows: list[tuple], *, fresh: bool) -> None:
        self._insert(c, "embeddings", [(o, e, cid, h, v.tobytes()) for o, e, cid, h, v in rows],
                     "error" if fresh else "replace")

    def _vector(self, value: Any) -> "np.ndarray":
        import numpy as np

        return np.frombuffer(value, dtype=np.float32)

    def _matrix(self, values: Sequence[Any], dim: int) -> "np.ndarray":
        import numpy as np

        if not values:
            return np.empty((0, dim), np.float32)
        return np.frombuffer(b"".join(values), dtype=np.float32).reshape(len(values), -1)  # one copy, not n

    def _migrate(self) -> None:
        with self._tx() as c:
            c.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied REAL)")
            done = {row[0] for row in c.execute("SELECT version FROM schema_migrations")}
            for version, sql in SCHEMA_MIGRATIONS:
                if version not in done:
                    for statement in _statements(sql):
                        c.execute(statement)
                    c.execute("INSERT INTO schema_migrations VALUES (?, ?)", (version, time.time()))

    def _read_data_version(self) -> int:
        return self._conn.execute("PRAGMA data_version").fetchone()[0]

    def _bump(self, c: sqlite3.Connection, owner: str) -> None:
        super()._bump(c, owner)
        for key in [k for k in self._indexes if k[0] == owner]:
            del self._indexes[key]

    def _committed(self) -> None:
        changes = self._conn.total_changes()
        if changes != self._changes:  # something was written: let the checkpoint thread copy it over
            self._changes = changes
            self._checkpointer.poke()

    def close(self) -> None:
        self._checkpointer.close()
        super().close()

    def optimize(self) -> None:
        """Rewrite the database file (VACUUM) so that each owner's vectors are contiguous on disk again after
        bulk imports, and refresh the query planner's statistics. Takes about 30 s per GB."""
        with self._lock, self._checkpointer.lock:
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._conn.execute("VACUUM")
            self._conn.execute("PRAGMA optimize")

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
                self._indexes.move_to_end((owner, embedder))
                return cached
            revision_row = self._conn.execute("SELECT revision FROM owner_revisions WHERE owner = ?",
                                              (owner,)).fetchone()
            # one range scan of the primary key, grouped by concept
            row_ids, image_hashes, matrix = self.owner_vectors(owner, embedder)
            category_of = dict(self._conn.execute("SELECT id, category FROM concepts WHERE owner = ?", (owner,)))
            concept_ids, starts = [], []
            for i, cid in enumerate(row_ids):
                if not concept_ids or concept_ids[-1] != cid:
                    concept_ids.append(cid)
                    starts.append(i)
            starts_arr = np.asarray(starts, dtype=np.int64)
            index = _OwnerIndex(revision_row[0] if revision_row else 0, matrix, concept_ids, starts_arr,
                                image_hashes,
                                np.asarray([category_of.get(cid, "") for cid in concept_ids], dtype=object),
                                np.append(starts_arr[1:], len(row_ids)), len(concept_ids) == len(row_ids))
            self._indexes[(owner, embedder)] = index
            total = sum(i.matrix.nbytes for i in self._indexes.values())
            while total > self.cache_bytes and len(self._indexes) > 1:  # keep at least the one just loaded
                _, evicted = self._indexes.popitem(last=False)
                total -= evicted.matrix.nbytes
            return index

    def search(self, owner: str, vector: Any, *, embedder: str, k: int = 5, category: str | None = None,
               min_score: float | None = None) -> list[Match]:
        """The owner's top-k concepts by cosine similarity of their best image, best first.

        Exact over the owner's vectors; optional category filter and minimum score.
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
        best = scores if index.single else np.maximum.reduceat(scores, index.starts)  # best image per concept
        n = best.shape[0]
        if category is None and min_score is None:
            groups = np.argpartition(best, n - k)[-k:] if n > k else np.arange(n)
        else:
            eligible = np.ones(best.shape[0], dtype=bool)
            if category is not None:
                eligible &= index.categories == category
            if min_score is not None:
                eligible &= best >= min_score
            groups = np.flatnonzero(eligible)
            if groups.shape[0] > k:
                groups = groups[np.argpartition(best[groups], groups.shape[0] - k)[-k:]]
        groups = groups[np.argsort(-best[groups], kind="stable")]
        records = self._records(owner, index, [index.concept_ids[g] for g in groups])
        matches = []
        for g in groups:
            concept = records.get(index.concept_ids[g])
            if concept is None:  # deleted by another process after the index was read
                continue
            start, end = index.starts[g], index.ends[g]
            row = int(start if index.single else start + np.argmax(scores[start:end]))
            matches.append(Match(concept, float(best[g]), index.image_hashes[row]))
        return matches

    def _records(self, owner: str, index: _OwnerIndex, ids: list[str]) -> dict[str, Concept]:
        """Concept records of search hits, each read once per index lifetime (any write drops the index)."""
        missing = [i for i in ids if i not in index.records]
        if missing:
            index.records.update(self.get_many(owner, missing))
        return index.records

def _statements(script: str) -> list[str]:
    """Split a migration script into statements (semicolons inside comments or strings do not split)."""
    out, buf = [], ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            out.append(buf.strip())
            buf = ""
    if buf.strip() and not all(ln.strip().startswith("--") or not ln.strip() for ln in buf.splitlines()):
        raise ValueError(f"incomplete SQL statement in migration: {buf.strip()[:80]!r}")
    return out

