"""The store suite: written once, run on every backend (embedded SQLite and PostgreSQL + pgvector)."""

import multiprocessing
import os
import sys

import numpy as np
import pytest

import concept_db.sql
from concept_db import (ConceptNotFound, DuplicateConceptError, InvalidConceptError, UnknownBackendError,
                        open_store)
from concept_db.types import content_hash, hash_key

DIM = 16


def vecs(n: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def assert_consistent(store):
    """No child row outlives its concept, and every stored image is used (checked straight in SQL)."""
    q = store._conn.execute
    for table, column in (("handles", "concept_id"), ("concept_images", "concept_id"),
                          ("embeddings", "concept_id"), ("tensors", "concept_id")):
        orphans = q(f"SELECT count(*) FROM {table} WHERE {column} NOT IN (SELECT id FROM concepts)").fetchone()[0]
        assert orphans == 0, f"{orphans} orphan rows in {table}"
    unused = q("SELECT count(*) FROM images WHERE hash NOT IN (SELECT hash FROM concept_images) AND hash NOT IN "
               "(SELECT image FROM profile_events WHERE image IS NOT NULL) AND hash NOT IN "
               "(SELECT other FROM profile_events WHERE other IS NOT NULL)").fetchone()[0]
    assert unused == 0
    assert q("SELECT count(*) FROM concept_images WHERE hash NOT IN (SELECT hash FROM images)").fetchone()[0] == 0
    assert q("SELECT count(*) FROM images GROUP BY hash HAVING count(*) > 1").fetchall() == []  # each image once
    for h, key in q("SELECT hash, hkey FROM images"):  # the key beside each hash is the one lookups compute
        assert key == concept_db.sql.hash_key(h), h
    # every link refers to the image of its hash
    assert q("SELECT count(*) FROM concept_images ci LEFT JOIN images i ON i.id = ci.image_id "
             "WHERE i.hash IS NULL OR i.hash <> ci.hash").fetchone()[0] == 0


def add(store, owner, name, n_images=2, seed=0, **kw):
    images = [f"{owner}-{name}-{i}".encode() for i in range(n_images)]
    return store.add(owner, name, images=images, embeddings={"e": vecs(n_images, seed)}, **kw)


def test_add_get_find_and_handles(store):
    c = add(store, "alice", "<bo>", category="dog", info="my shiba inu", aliases=["bobo", "<Bo-dog>"],
            attributes={"color": "red"})
    assert (c.name, c.handle, c.category, c.version) == ("bo", "<bo>", "dog", 1)
    assert c.aliases == ("Bo-dog", "bobo") and c.attributes == {"color": "red"} and len(c.images) == 2
    assert store.get("alice", c.id) == c
    assert store.find("alice", "<bobo>").id == c.id and store.find("alice", "bo").id == c.id
    assert store.find("alice", "nobody") is None


@pytest.mark.parametrize("name", ["", "<>", "  ", "a/b", "..", "x\\y", "../etc", "a\x00b", "n" * 65])
def test_bad_names_rejected_and_nothing_written(store, name):
    with pytest.raises(InvalidConceptError):
        store.add("alice", name, images=[b"x"])
    assert store.count("alice") == 0


def test_duplicate_name_or_alias(store):
    add(store, "alice", "bo", aliases=["shiba"])
    with pytest.raises(DuplicateConceptError, match="<bo>"):
        add(store, "alice", "<bo>")
    with pytest.raises(DuplicateConceptError, match="<shiba>"):
        add(store, "alice", "other", aliases=["shiba"])
    assert store.count("alice") == 1
    add(store, "bob", "bo")  # names are per owner


def test_failed_add_leaves_nothing(store):
    with pytest.raises(InvalidConceptError, match="shape"):
        store.add("alice", "bo", images=[b"a", b"b"], embeddings={"e": vecs(3)})
    bad = vecs(2)
    bad[1, 0] = np.nan
    with pytest.raises(InvalidConceptError, match="NaN"):
        store.add("alice", "bo", images=[b"a", b"b"], embeddings={"e": bad})
    assert store.count("alice") == 0 and store.find("alice", "bo") is None
    add(store, "alice", "bo")  # the name is still free
    with pytest.raises(InvalidConceptError, match="dimension 16"):
        store.add("alice", "cat", images=[b"c"], embeddings={"e": np.ones((1, 8), np.float32)})
    assert store.count("alice") == 1


def test_update_and_versions(store):
    c = add(store, "alice", "bo", aliases=["shiba"])
    c2 = store.update("alice", c.id, info="now older", aliases=["doggo"], expected_version=1)
    assert c2.version == 2 and c2.info == "now older" and c2.aliases == ("doggo",)
    assert store.find("alice", "shiba") is None and store.find("alice", "doggo").id == c.id
    with pytest.raises(InvalidConceptError, match="changed since version 1"):
        store.update("alice", c.id, info="stale", expected_version=1)
    c3 = store.update("alice", c.id, name="<bobo>")
    assert c3.name == "bobo" and store.find("alice", "bo") is None


def test_list_paging_and_category(store):
    for i in range(7):
        add(store, "alice", f"c{i}", category="dog" if i % 2 else "cat", seed=i)
    names = [c.name for c in store.list("alice", limit=3)] + [c.name for c in store.list("alice", limit=3, offset=3)]
    assert names == [f"c{i}" for i in range(6)]
    assert {c.name for c in store.list("alice", category="dog")} == {"c1", "c3", "c5"}
    assert store.categories("alice") == ["cat", "dog"]


def test_search_topk_by_concept_category_min_score(store):
    data = {f"c{i}": vecs(3, seed=i) for i in range(20)}
    for i, (name, v) in enumerate(data.items()):
        store.add("alice", name, category="even" if i % 2 == 0 else "odd",
                  images=[f"{name}-{j}".encode() for j in range(3)], embeddings={"e": v})
    query = data["c7"][2]
    hits = store.search("alice", query, embedder="e", k=5)
    assert hits[0].concept.name == "c7" and hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert hits[0].image == store.find("alice", "c7").images[2]
    assert len({h.concept.id for h in hits}) == 5  # de-duplicated by concept
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    # exact: compare with brute force over best image per concept
    brute = sorted(((float(np.max(v @ query)), n) for n, v in data.items()), reverse=True)[:5]
    assert [h.concept.name for h in hits] == [n for _, n in brute]
    assert all(h.concept.category == "even" for h in store.search("alice", query, embedder="e", k=3,
                                                                    category="even"))
    assert [h.concept.name for h in store.search("alice", query, embedder="e", k=5, min_score=0.99)] == ["c7"]
    with pytest.raises(InvalidConceptError, match="dimension"):
        store.search("alice", np.ones(8), embedder="e")
    assert store.search("alice", query, embedder="other-embedder") == []


def test_edits_visible_to_next_query(store):
    c = add(store, "alice", "bo", seed=1)
    q = vecs(2, seed=1)[0]
    assert store.search("alice", q, embedder="e")[0].concept.id == c.id
    store.update("alice", c.id, info="changed")
    assert store.search("alice", q, embedder="e")[0].concept.info == "changed"
    store.delete("alice", c.id)
    assert store.search("alice", q, embedder="e") == []
    assert_consistent(store)
    new = add(store, "alice", "bo2", seed=1)
    assert store.search("alice", q, embedder="e")[0].concept.id == new.id


def _writer(path, q):
    s = open_store(path)
    s.add("alice", "from-child", images=[b"child-image"], embeddings={"e": q[None, :]})
    s.close()


def test_other_process_writes_are_seen(store, tmp_path):
    add(store, "alice", "bo", seed=3)
    q = vecs(1, seed=99)[0]
    store.search("alice", q, embedder="e")  # warm the in-process index
    proc = multiprocessing.get_context("spawn").Process(target=_writer, args=(store.url, q))
    proc.start()
    proc.join(60)
    assert proc.exitcode == 0
    assert store.search("alice", q, embedder="e")[0].concept.name == "from-child"


def test_images_stored_once_and_garbage_collected(store):
    a = store.add("alice", "a", images=[b"shared", b"only-a"])
    b = store.add("alice", "b", images=[b"shared"])
    n_images = store._conn.execute("SELECT count(*) FROM images").fetchone()[0]
    assert n_images == 2 and a.images[0] == b.images[0]
    assert store.image_bytes("alice", a.images[1]) == b"only-a"
    store.delete("alice", a.id)
    assert store._conn.execute("SELECT count(*) FROM images").fetchone()[0] == 1
    with pytest.raises(ConceptNotFound):
        store.image_bytes("alice", a.images[1])
    c = store.add_images("alice", b.id, [b"more", b"shared"])
    assert len(c.images) == 2 and c.version == 2
    c = store.remove_image("alice", b.id, c.images[1])
    assert len(c.images) == 1
    assert_consistent(store)


def test_known_vectors_reuse(store):
    c = add(store, "alice", "bo")
    known = store.known_vectors("alice", "e", list(c.images) + ["0" * 64])
    assert set(known) == set(c.images) and known[c.images[0]].shape == (DIM,)
    # never another owner's vector, even for the same image bytes (it may be forged, or differ in its last bits)
    store.add("bob", "copy", images=[store.image_bytes("alice", c.images[0])], embeddings={"e": vecs(1, seed=9)})
    assert store.known_vectors("carol", "e", list(c.images)) == {}
    assert np.array_equal(store.known_vectors("alice", "e", [c.images[0]])[c.images[0]], known[c.images[0]])
    assert store.missing_embeddings("alice", "e") == []
    assert len(store.missing_embeddings("alice", "other")) == 2


def test_owner_isolation(store):
    a = add(store, "alice", "bo", seed=5)
    q = vecs(2, seed=5)[0]
    assert store.search("bob", q, embedder="e") == []
    for call in (lambda: store.get("bob", a.id), lambda: store.update("bob", a.id, info="x"),
                 lambda: store.delete("bob", a.id), lambda: store.image_bytes("bob", a.images[0]),
                 lambda: store.add_images("bob", a.id, [b"x"]), lambda: store.remove_image("bob", a.id, a.images[0]),
                 lambda: store.get_tensor("bob", a.id, "t")):
        with pytest.raises(ConceptNotFound):
            call()
    assert store.find("bob", "bo") is None and store.list("bob") == [] and store.erase_owner("bob") == 0
    assert store.get("alice", a.id).info == ""


def test_erase_owner(store):
    add(store, "alice", "bo")
    b = add(store, "bob", "rex", seed=2)
    assert store.erase_owner("alice") == 1
    assert store.count("alice") == 0 and store.search("alice", vecs(1)[0], embedder="e") == []
    assert store._conn.execute("SELECT count(*) FROM embeddings WHERE owner = 'alice'").fetchone()[0] == 0
    assert store._conn.execute("SELECT count(*) FROM images").fetchone()[0] == 2  # bob's two remain
    assert store.get("bob", b.id).name == "rex"
    assert_consistent(store)


def test_tensors(store):
    from safetensors.numpy import save

    c = add(store, "alice", "bo")
    blob = save({"rows": np.ones((2, 4), np.float32)})
    store.put_tensor("alice", c.id, "tokens", blob, model="tiny:qwen2-vl", fingerprint="abc")
    t = store.get_tensor("alice", c.id, "tokens")
    assert (t.data, t.model, t.fingerprint) == (blob, "tiny:qwen2-vl", "abc")
    with pytest.raises(InvalidConceptError, match="safetensors"):
        store.put_tensor("alice", c.id, "bad", b"\x80\x03pickle", model="m", fingerprint="f")
    assert store.list_tensors("alice", c.id) == ["tokens"]
    store.delete("alice", c.id)
    assert_consistent(store)


def test_reopen_keeps_everything_and_migrations_are_numbered(store, tmp_path):
    c = add(store, "alice", "bo")
    store.close()
    again = open_store(store.url)
    migrations = sys.modules[type(store).__module__].SCHEMA_MIGRATIONS
    assert [v for v, _ in migrations] == list(range(1, len(migrations) + 1))
    assert again.get("alice", c.id) == c and again.schema_version == migrations[-1][0]
    assert again.search("alice", vecs(2)[0], embedder="e")[0].concept.id == c.id
    again.close()


def test_hash_key_is_the_signed_first_64_bits():
    assert hash_key("0" * 64) == 0 and hash_key("7fffffffffffffff" + "0" * 48) == 2**63 - 1
    assert hash_key("8000000000000000" + "f" * 48) == -(2**63) and hash_key("f" * 64) == -1
    h = content_hash(b"bo")
    assert hash_key(h) == int.from_bytes(bytes.fromhex(h[:16]), "big", signed=True)


def test_colliding_hash_keys_keep_images_apart(store, monkeypatch):
    """Lookups go through the 64-bit key and then the full hash: even if every key collided, images stay
    distinct, shared ones are kept once, and each user sees only their own."""
    monkeypatch.setattr(concept_db.sql, "hash_key", lambda h: 42)
    a = store.add("alice", "a", images=[b"one", b"shared"], embeddings={"e": vecs(2)})
    b = store.add("alice", "b", images=[b"two", b"shared"], embeddings={"e": vecs(2, 1)})
    bob = store.add("bob", "c", images=[b"three"])
    assert store._conn.execute("SELECT count(*) FROM images").fetchone()[0] == 4
    for h, data in zip(a.images + b.images, [b"one", b"shared", b"two", b"shared"], strict=True):
        assert store.image_bytes("alice", h) == data
    with pytest.raises(ConceptNotFound):
        store.image_bytes("alice", bob.images[0])
    assert set(store.known_vectors("alice", "e", [content_hash(b"two")])) == {content_hash(b"two")}
    store.delete("alice", a.id)  # "one" goes, "shared" stays for b
    assert store._conn.execute("SELECT count(*) FROM images").fetchone()[0] == 3
    assert store.image_bytes("alice", content_hash(b"shared")) == b"shared"
    store.remove_image("alice", b.id, content_hash(b"shared"))
    with pytest.raises(ConceptNotFound):
        store.image_bytes("alice", content_hash(b"shared"))
    assert_consistent(store)


def test_image_bytes_refuses_what_is_not_a_hash(store):
    add(store, "alice", "bo")
    for bad in ("", "zz", "../" * 30, "a" * 63, 7):
        with pytest.raises(ConceptNotFound, match="not a content hash"):
            store.image_bytes("alice", bad)


def test_sqlite_schema_3_database_upgrades_with_its_images(tmp_path):
    """A database written before migration 4 (images keyed by the hash) opens with everything in place."""
    import sqlite3

    from concept_db.sqlite import SCHEMA_MIGRATIONS, _statements

    path = tmp_path / "old.db"
    raw = sqlite3.connect(path, isolation_level=None)
    raw.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied REAL)")
    for version, sql in SCHEMA_MIGRATIONS[:3]:
        for statement in _statements(sql):
            raw.execute(statement)
        raw.execute("INSERT INTO schema_migrations VALUES (?, 0)", (version,))
    images = [b"first", b"second"]
    hashes = [content_hash(d) for d in images]
    raw.execute("INSERT INTO concepts VALUES ('00aa', 'alice', 'bo', 'dog', '', '{}', 1, 1, 1)")
    raw.execute("INSERT INTO handles VALUES ('alice', 'bo', '00aa', 0)")
    raw.execute("INSERT INTO embedders VALUES ('e', ?)", (DIM,))
    for i, (h, d, v) in enumerate(zip(hashes, images, vecs(2), strict=True)):
        raw.execute("INSERT INTO images VALUES (?, ?, ?)", (h, d, len(d)))
        raw.execute("INSERT INTO concept_images VALUES ('00aa', ?, ?)", (h, i))
        raw.execute("INSERT INTO embeddings VALUES ('alice', 'e', '00aa', ?, ?)", (h, v.tobytes()))
    raw.close()

    store = open_store(str(path))
    assert store.schema_version == len(SCHEMA_MIGRATIONS) >= 4
    c = store.get("alice", "00aa")
    assert c.images == tuple(hashes) and [store.image_bytes("alice", h) for h in hashes] == images
    assert store.search("alice", vecs(2)[1], embedder="e")[0].image == hashes[1]
    again = store.add("alice", "bo2", images=[b"second", b"third"])  # an old image is found, not stored twice
    assert_consistent(store)
    store.delete("alice", c.id)
    assert store.image_bytes("alice", again.images[0]) == b"second"
    assert_consistent(store)
    store.close()


def test_sqlite_checkpoints_in_the_background_and_close_stops_it(tmp_path):
    """Commits are copied from the write-ahead log into the database file by the store's own thread (the
    writer's automatic checkpoint is only a backstop), and closing the store stops that thread."""
    import sqlite3
    import threading
    import time

    store = open_store(str(tmp_path / "c.db"))
    assert store._conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] >= 16 * 1000
    with store.transaction():
        for i in range(50):
            add(store, "alice", f"c{i}", seed=i)

    def in_main_file() -> int:  # immutable=1: read the database file alone, ignoring the WAL
        raw = sqlite3.connect(f"file:{tmp_path / 'c.db'}?immutable=1", uri=True)
        try:
            return raw.execute("SELECT count(*) FROM concepts").fetchone()[0]
        except sqlite3.Error:
            return 0
        finally:
            raw.close()

    deadline = time.monotonic() + 20
    while in_main_file() < 50 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert in_main_file() == 50
    assert store.count("alice") == 50  # and the store reads on as before
    thread = store._checkpointer._thread
    assert thread is not None and thread.is_alive() and thread in threading.enumerate()
    store.close()
    assert not thread.is_alive()


def test_sqlite_checkpoint_thread_ends_with_an_unclosed_store(tmp_path):
    import gc

    store = open_store(str(tmp_path / "c.db"))
    add(store, "alice", "bo")
    thread = store._checkpointer._thread
    assert thread.is_alive()
    del store
    gc.collect()
    thread.join(timeout=10)
    assert not thread.is_alive()


def test_sqlite_reading_starts_no_checkpoint_thread(tmp_path):
    open_store(str(tmp_path / "c.db")).close()
    store = open_store(str(tmp_path / "c.db"))
    assert store.list("alice") == [] and store.search("alice", vecs(1)[0], embedder="e") == []
    assert store._checkpointer._thread is None
    store.close()


@pytest.mark.pg
def test_postgres_schema_1_database_upgrades_with_its_images(pg_url):
    """A PostgreSQL database written before migration 2 (links by hash) opens with everything in place."""
    import psycopg

    from concept_db.postgres import SCHEMA_MIGRATIONS

    images = [b"first", b"second"]
    hashes = [content_hash(d) for d in images]
    with psycopg.connect(pg_url, autocommit=True) as raw:
        raw.execute("DROP SCHEMA public CASCADE")
        raw.execute("CREATE SCHEMA public")
        raw.execute("CREATE TABLE schema_migrations (version integer PRIMARY KEY, applied double precision)")
        raw.execute(SCHEMA_MIGRATIONS[0][1])
        raw.execute("INSERT INTO schema_migrations VALUES (1, 0)")
        raw.execute("INSERT INTO concepts VALUES ('00aa', 'alice', 'bo', 'dog', '', '{}', 1, 1, 1)")
        raw.execute("INSERT INTO handles VALUES ('alice', 'bo', '00aa', 0)")
        for i, (h, d) in enumerate(zip(hashes, images, strict=True)):
            raw.execute("INSERT INTO images VALUES (%s, %s, %s)", (h, d, len(d)))
            raw.execute("INSERT INTO concept_images VALUES ('00aa', %s, %s)", (h, i))
    store = open_store(pg_url)
    assert store.schema_version == len(SCHEMA_MIGRATIONS) >= 2
    c = store.get("alice", "00aa")
    assert c.images == tuple(hashes) and [store.image_bytes("alice", h) for h in hashes] == images
    again = store.add("alice", "bo2", images=[b"second", b"third"])
    assert_consistent(store)
    store.delete("alice", c.id)
    assert store.image_bytes("alice", again.images[0]) == b"second"
    with pytest.raises(ConceptNotFound):
        store.image_bytes("alice", hashes[0])
    assert_consistent(store)
    store.close()


@pytest.mark.pg
def test_postgres_backfills_the_same_hash_keys(pg_url):
    """PostgreSQL's migration computes hkey in SQL; it must equal types.hash_key for every hash."""
    store = open_store(pg_url)
    hashes = [content_hash(bytes([i])) for i in range(64)] + ["f" * 64, "8" + "0" * 63, "7" + "f" * 63]
    for h in hashes:
        got = store._conn.execute("SELECT ('x' || substr(?, 1, 16))::bit(64)::bigint", (h,)).fetchone()[0]
        assert got == hash_key(h), h
    store.close()


def test_unknown_backend(tmp_path):
    with pytest.raises(UnknownBackendError, match="valid: a file path"):
        open_store("mongodb://localhost/x")
    assert os.path.exists(open_store(f"sqlite://{tmp_path}/x.db").path)


def test_find_many_settings_and_owner_presence(store):
    c = add(store, "alice", "bo", aliases=["shiba"])
    found = store.find_many("alice", ["bo", "shiba", "nobody"])
    assert set(found) == {"bo", "shiba"} and found["shiba"].id == c.id
    assert store.find_many("bob", ["bo"]) == {}
    assert store.has_owner("alice") and not store.has_owner("bob")
    store.set_setting("bob", "threshold", 0.42)
    assert store.has_owner("bob") and store.get_setting("bob", "threshold") == 0.42
    assert store.get_setting("alice", "threshold", 0.1) == 0.1
    store.erase_owner("bob")
    assert store.get_setting("bob", "threshold") is None and not store.has_owner("bob")


def test_vector_cache_is_bounded(tmp_path):
    store = open_store(tmp_path / "c.db")
    for o in range(4):
        add(store, f"user{o}", "bo", seed=o)
    store.cache_bytes = 2 * 2 * DIM * 4  # room for two owners' two vectors
    for o in range(4):
        assert store.search(f"user{o}", vecs(2, seed=o)[0], embedder="e")[0].concept.owner == f"user{o}"
    assert [k[0] for k in store._indexes] == ["user2", "user3"]
    assert store.search("user0", vecs(2, seed=0)[0], embedder="e")[0].concept.owner == "user0"  # reloaded
    store.close()


def test_one_store_many_threads(store):
    """Readers and writers sharing one store object from several threads: no errors, no lost writes."""
    import threading

    add(store, "alice", "seed")
    errors = []

    def writer(i):
        try:
            for j in range(10):
                add(store, "alice", f"w{i}-{j}", n_images=1, seed=i * 100 + j)
        except Exception as e:  # collected and asserted below
            errors.append(e)

    def reader():
        try:
            for _ in range(30):
                for m in store.search("alice", vecs(1, seed=7)[0], embedder="e", k=3):
                    assert m.concept.owner == "alice" and m.concept.images
                store.list("alice", limit=5)
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(2)] + [
        threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert store.count("alice") == 21


def test_profile_events_images_and_isolation(store):
    like = store.add_profile_event("alice", "like", images=[b"liked-img"], comment="warm colours")
    pair = store.add_profile_event("alice", "pair", images=[b"chosen", b"rejected"], prompt="a cat")
    store.add_profile_event("alice", "prompt", prompt="a dog")
    assert [e.kind for e in store.profile_events("alice")] == ["like", "pair", "prompt"]
    assert store.profile_events("alice", "like")[0].comment == "warm colours"
    assert store.image_bytes("alice", pair.other) == b"rejected"
    with pytest.raises(ConceptNotFound):
        store.image_bytes("bob", like.image)  # another user's profile image
    assert store.profile_events("bob") == []
    for bad in (lambda: store.add_profile_event("alice", "love", images=[b"x"]),
                lambda: store.add_profile_event("alice", "pair", images=[b"x"], prompt="p"),
                lambda: store.add_profile_event("alice", "pair", images=[b"x", b"y"], prompt=" ")):
        with pytest.raises(InvalidConceptError):
            bad()
    # a profile image shared with a concept survives the profile's reset, the others go
    add(store, "alice", "bo")
    shared = store.add_profile_event("alice", "dislike", images=[b"alice-bo-0"])
    assert store.reset_profile("alice") == 4
    assert store.profile_events("alice") == []
    assert store.image_bytes("alice", shared.image) == b"alice-bo-0"
    assert_consistent(store)
    assert store._conn.execute("SELECT count(*) FROM images WHERE data IN (?, ?)",
                               (b"liked-img", b"rejected")).fetchone()[0] == 0
    store.add_profile_event("bob", "like", images=[b"bob-img"])
    store.erase_owner("bob")
    assert store.profile_events("bob") == []
    assert store._conn.execute("SELECT count(*) FROM images WHERE data = ?", (b"bob-img",)).fetchone()[0] == 0


@pytest.mark.pg
def test_postgres_reconnects_between_transactions(pg_url):
    """A connection the server dropped (restart, idle timeout) is re-opened on the next call."""
    import psycopg

    store = open_store(pg_url)
    c = add(store, "alice", "bo")
    pid = store._conn.execute("SELECT pg_backend_pid()").fetchone()[0]
    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    with pytest.raises(Exception, match="(?i)terminat|closed|connection"):
        store.get("alice", c.id)  # the call that meets the dropped connection fails clearly...
    assert store.get("alice", c.id) == c  # ...and the next one reconnects
    assert store.search("alice", vecs(2)[0], embedder="e")[0].concept.id == c.id
    store.close()


def test_quota_refuses_what_goes_past_it_and_stores_nothing_of_it(store):
    """No storage quota let one user fill the disk. Concept images, profile events and their bytes are counted
    per owner (an image stored by another owner too is still counted for each), checked in the write's
    transaction; a refused write stores nothing, and deleting makes room."""
    from concept_db.types import Quota, QuotaExceeded

    store.quota = Quota(images=3, events=2, bytes=10_000)
    bo = add(store, "alice", "bo", n_images=2)
    shared = b"s" * 100
    store.add("bob", "copy", images=[shared], embeddings={"e": vecs(1)})
    before = store.usage("alice")
    with pytest.raises(QuotaExceeded, match="concept images"):
        add(store, "alice", "mam", n_images=2)
    with pytest.raises(QuotaExceeded, match="concept images"):
        store.add_images("alice", bo.id, [b"x", b"y"], embeddings={"e": vecs(2)})
    assert store.usage("alice") == before and [c.name for c in store.list("alice")] == ["bo"]
    c = store.add("alice", "one", images=[shared], embeddings={"e": vecs(1)})  # bob's copy changes nothing
    assert store.usage("alice").images == 3 and store.usage("alice").bytes == before.bytes + 100
    store.add_profile_event("alice", "like", images=[b"l" * 50])
    store.add_profile_event("alice", "prompt", prompt="a dog")
    with pytest.raises(QuotaExceeded, match="profile events"):
        store.add_profile_event("alice", "like", images=[b"m" * 50])
    assert len(store.profile_events("alice")) == 2 and store.usage("alice").bytes == before.bytes + 150
    store.add_profile_event("bob", "like", images=[b"m" * 50])  # bob has his own quota
    with pytest.raises(QuotaExceeded, match="MB"):
        store.add("bob", "big", images=[b"b" * 10_000], embeddings={"e": vecs(1)})
    store.delete("alice", c.id)
    add(store, "alice", "mam", n_images=1)  # deleting made room
    assert_consistent(store)
    store.quota = None
    add(store, "alice", "free", n_images=5)


def test_revision_moves_with_every_write_on_every_backend(store):
    """PostgreSQL's revision stayed 0 (only SQLite recorded writes), so a cache keyed by it (the retriever's
    instance vectors) never saw a new concept there."""
    assert store.revision("alice") == 0
    c = add(store, "alice", "bo")
    seen = [store.revision("alice")]
    store.update("alice", c.id, info="edited")
    seen.append(store.revision("alice"))
    store.add_profile_event("alice", "like", images=[b"l"])
    seen.append(store.revision("alice"))
    store.delete("alice", c.id)
    seen.append(store.revision("alice"))
    assert seen[0] > 0 and seen == sorted(set(seen)), seen
    assert store.revision("bob") == 0  # another owner's writes move only theirs


def test_quota_checks_count_once_and_follow_every_other_writer(store, db_url):
    """Counting a user's usage read all their rows (25 ms under the store's lock for 2,000 images and 10,000
    event images): each quota check now reads one revision, and counts again only when another writer, a
    rollback or a write without a check moved it. The usage it goes on is always the counted one."""
    from concept_db.types import Quota, QuotaExceeded

    store.quota = Quota(images=6, events=3, bytes=None)
    counted = []
    real = store._usage
    store._usage = lambda c, owner: counted.append(owner) or real(c, owner)
    bo = add(store, "alice", "bo", n_images=2)
    add(store, "alice", "mam", n_images=1)
    store.add_profile_event("alice", "like", images=[b"l1"])
    assert counted == ["alice"]  # the first check counted; the next ones read the revision
    assert store._usage_known["alice"][1] == real(store._conn, "alice")
    other = open_store(db_url)  # another writer (another process, as far as this store can tell)
    other.add("alice", "far", images=[b"f1", b"f2"], embeddings={"e": vecs(2)})
    with pytest.raises(QuotaExceeded, match="concept images"):  # 5 stored (2 by the other), 2 more refused
        add(store, "alice", "two", n_images=2)
    assert counted == ["alice", "alice"]
    other.close()
    with pytest.raises(DuplicateConceptError):  # a write that fails after its check: its count is not kept
        with store.transaction():
            add(store, "alice", "one", n_images=1)
            add(store, "alice", "bo", n_images=1)
    store.update("alice", bo.id, info="edited")  # a write without a check moves the revision
    add(store, "alice", "one", n_images=1)
    assert counted == ["alice"] * 4 and store._usage_known["alice"][1] == real(store._conn, "alice")
    with pytest.raises(QuotaExceeded):
        add(store, "alice", "seventh", n_images=1)
    store.quota = None
