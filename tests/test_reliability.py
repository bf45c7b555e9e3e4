"""The reliability suite on every backend: crash safety (SIGKILL), multi-process concurrency, owner isolation of
every public operation, and erasing one user. Long runs: `python scripts/reliability.py --help`."""

import inspect

import numpy as np
import pytest
from safetensors.numpy import save

import scripts
from concept_db import ConceptNotFound, InvalidConceptError
from concept_db.types import Quota, Usage

reliability = scripts.load("reliability")


def test_crash_safety_sigkill_during_bulk_import(db_url):
    result = reliability.crash(db_url, rounds=6, batch=20, seed=1)
    assert result["committed"] > 0  # kills landed after some commits, and everything committed survived


def test_concurrent_readers_and_writers(db_url):
    result = reliability.concurrency(db_url, seconds=6, readers=3, writers=2)
    assert result["added"] > 0 and result["increments"] > 0 and result["reads"] > 0


def test_hostile_corpus_sample(tmp_path, tiny_cache):
    """A sample of `scripts/reliability.py hostile` (the whole corpus takes minutes): each case is a child
    process, and its outcome, memory, leftovers and effect on another user are checked as the script does."""
    sample = {"forged-vector", "squat-in-use", "vector-bomb", "app-rap-zip-bomb", "arg-not-utf8", "name-bo", "name-cyrillic-o",
              "manifest-nested"}
    result = reliability.hostile(str(tmp_path / "h.db"), small=True, work=tmp_path / "work", only=sample)
    assert result["cases"] == len(sample) + 1 and result["unexpected"] == []
    assert result["tracebacks"] == 0 and result["cross_user_effects"] == 0 and result["bytes_written_outside"] == 0


def test_hostile_server_corpus(tmp_path, tiny_cache):
    """`scripts/reliability.py hostile --server`, whole: a real `mmpersona serve` on 127.0.0.1, bob's (and
    keyless clients') hostile requests, and after each one alice's whole view compared with what it was."""
    hostile_server = scripts.load("hostile_server")
    result = hostile_server.run(tmp_path / "work")
    assert result["cases"] >= 30 and result["unexpected"] == [], result
    assert result["http_500"] == 0 and result["tracebacks"] == 0 and result["path_leaks"] == 0
    assert result["cross_user_effects"] == 0


def vec(seed, dim=8):
    v = np.random.default_rng(seed).normal(size=dim).astype(np.float32)
    return v / np.linalg.norm(v)


def populate(store, owner, seed=0):
    c = store.add(owner, f"{owner}-dog", category="pet", info="info", aliases=[f"{owner}-alias"],
                  images=[f"{owner}-img-a".encode(), f"{owner}-img-b".encode()],
                  embeddings={"e": np.stack([vec(seed), vec(seed + 1)])})
    store.put_tensor(owner, c.id, "tokens", save({"t": np.ones(2, np.float32)}), model="m", fingerprint="f")
    store.add_profile_event(owner, "like", images=[f"{owner}-liked".encode()])
    store.add_profile_event(owner, "pair", images=[f"{owner}-p1".encode(), f"{owner}-p2".encode()], prompt="p")
    store.put_blob(owner, "reward", save({"w": np.zeros(2, np.float32)}), model="m")
    store.set_setting(owner, "threshold", 0.3)
    store.add_memory(owner, f"{owner}-dog sleeps in the hall.", concept_id=c.id, kind="state", topic="bed",
                     valid_from=1.7e9)
    store.add_memory(owner, f"{owner}-dog sleeps on the sofa.", concept_id=c.id, kind="state", topic="bed")
    store.add_memory(owner, f"{owner} is a nurse.", status="proposed")
    chat = store.start_conversation(owner, f"{owner}'s chat")
    store.add_turn(owner, chat.id, "Where is the dog?", "In the hall.", image=f"{owner}-turn".encode())
    return c


def cross_owner_calls(store, victim):
    """Every public operation, tried by 'mallory' on the victim's concept, images and events."""
    cid, img = victim.id, victim.images[0]
    q = vec(0)
    event = store.profile_events("alice")[0]
    entry = store.memory("alice")[0]
    chat = store.conversations("alice")[0]
    turn_photo = store.turns("alice", chat.id)[0].image
    return {
        "conversation": lambda: store.conversation("mallory", chat.id),
        "conversations": lambda: store.conversations("mallory"),
        "all_conversations": lambda: store.all_conversations("mallory"),
        "turns": lambda: store.turns("mallory", chat.id),
        "add_turn": lambda: store.add_turn("mallory", chat.id, "pwned?", "yes", image=b"alice-turn"),
        "rename_conversation": lambda: store.rename_conversation("mallory", chat.id, "pwned"),
        "delete_conversation": lambda: store.delete_conversation("mallory", chat.id),
        "turn_photo": lambda: store.image_bytes("mallory", turn_photo),
        "memory": lambda: store.memory("mallory"),
        "memory_entry": lambda: store.memory_entry("mallory", entry.id),
        "add_memory": lambda: store.add_memory("mallory", "pwned", concept_id=cid),
        "update_memory": lambda: store.update_memory("mallory", entry.id, text="pwned", status="accepted"),
        "delete_memory": lambda: store.delete_memory("mallory", entry.id),
        "get": lambda: store.get("mallory", cid),
        "get_many": lambda: store.get_many("mallory", [cid]),
        "find": lambda: store.find("mallory", victim.name),
        "find_many": lambda: store.find_many("mallory", [victim.name, victim.aliases[0]]),
        "list": lambda: store.list("mallory"),
        "all_concepts": lambda: store.all_concepts("mallory"),
        "count": lambda: store.count("mallory"),
        "categories": lambda: store.categories("mallory"),
        "update": lambda: store.update("mallory", cid, info="pwned"),
        "delete": lambda: store.delete("mallory", cid),
        "add_images": lambda: store.add_images("mallory", cid, [b"x"]),
        "remove_image": lambda: store.remove_image("mallory", cid, img),
        "image_bytes": lambda: store.image_bytes("mallory", img),
        "search": lambda: store.search("mallory", q, embedder="e"),
        "vectors": lambda: store.vectors("mallory", cid),
        "owner_vectors": lambda: store.owner_vectors("mallory", "e")[0],
        "set_embeddings": lambda: store.set_embeddings("mallory", cid, "e", [img], q[None, :]),
        "missing_embeddings": lambda: store.missing_embeddings("mallory", "e"),
        "revision": lambda: store.revision("mallory"),
        "profile_generation": lambda: store.profile_generation("mallory"),
        "usage": lambda: store.usage("mallory"),
        "check_quota": lambda: store.check_quota("mallory", images=1, events=1, size=1),
        "put_tensor": lambda: store.put_tensor("mallory", cid, "x", save({"t": np.ones(1, np.float32)}),
                                               model="m", fingerprint="f"),
        "get_tensor": lambda: store.get_tensor("mallory", cid, "tokens"),
        "known_vectors": lambda: store.known_vectors("mallory", "e", list(victim.images)),
        "list_tensors": lambda: store.list_tensors("mallory", cid),
        "profile_events": lambda: store.profile_events("mallory"),
        "delete_profile_event": lambda: store.delete_profile_event("mallory", event.id),
        "reset_profile": lambda: store.reset_profile("mallory"),
        "get_blob": lambda: store.get_blob("mallory", "reward"),
        "blob_names": lambda: store.blob_names("mallory"),
        "get_setting": lambda: store.get_setting("mallory", "threshold"),
        "settings": lambda: store.settings("mallory"),
        "has_owner": lambda: store.has_owner("mallory"),
        "erase_owner": lambda: store.erase_owner("mallory"),
    }


# operations that take no owner, or only write the caller's own data (checked to leave the victim alone below)
NOT_OWNER_SCOPED = {"add", "add_many", "add_profile_event", "put_blob", "set_setting", "owners", "start_conversation",
                    "embedder_dims", "transaction", "optimize", "close", "schema_version", "url",
                    "quota",  # the per-owner limits: a setting of the store, the same for every owner
                    # the server's API keys (PostgreSQL): found by key id, checked by their hash (test_scheduler)
                    "put_api_key", "api_key", "api_keys", "delete_api_key"}


def test_isolation_every_public_operation(store):
    victim = populate(store, "alice")
    store.quota = Quota(images=1, events=1, bytes=10**9)  # alice is over it; mallory's checks count only his
    calls = cross_owner_calls(store, victim)
    public = {name for name, _ in inspect.getmembers(type(store)) if not name.startswith("_")}
    assert public - NOT_OWNER_SCOPED - set(calls) == set(), "a public operation has no isolation check"
    before = reliability_snapshot(store, "alice")
    for name, call in calls.items():
        try:
            result = call()
        except ConceptNotFound:
            continue
        assert result in ([], {}, None, 0, False, Usage()), f"{name} returned another owner's data: {result!r}"
    # writes in mallory's own name, with alice's names, images and keys, stay mallory's
    store.add("mallory", victim.name, aliases=list(victim.aliases), images=[b"alice-img-a"],
              embeddings={"e": vec(0)[None, :]})
    store.add_many("mallory", [])
    store.add_profile_event("mallory", "like", images=[b"alice-liked"])
    store.put_blob("mallory", "reward", save({"w": np.ones(2, np.float32)}), model="m")
    store.set_setting("mallory", "threshold", 0.9)
    store.add_memory("mallory", "alice-dog sleeps in the garage.", kind="state", topic="bed")
    alices = store.conversations("alice")[0]
    with pytest.raises(InvalidConceptError, match="taken"):  # her conversation's id cannot be made his
        store.start_conversation("mallory", "mine", conversation_id=alices.id)
    his = store.start_conversation("mallory", alices.title)
    store.add_turn("mallory", his.id, "Where is the dog?", "In the garage.", image=b"alice-turn")
    store.delete_conversation("mallory", his.id)  # her turn's photo, which his held too, stays hers
    assert store.search("alice", vec(0), embedder="e", k=5)[0].concept.owner == "alice"
    # the victim's data is untouched
    assert reliability_snapshot(store, "alice") == before


def reliability_snapshot(store, owner):
    from concept_db.migrate import summarize

    return summarize(store, owner)


def test_erase_user_removes_everything_of_theirs_and_only_theirs(store):
    populate(store, "alice", seed=0)
    populate(store, "bob", seed=10)
    shared = store.add("bob", "shared-pic", images=[b"alice-img-a"])  # bob holds a copy of one of alice's images
    bob_before = reliability_snapshot(store, "bob")
    assert store.erase_owner("alice") == 1
    q = store._conn.execute
    for table in ("concepts", "handles", "embeddings", "owner_settings", "profile_events", "owner_blobs",
                  "memory_entries", "conversations", "conversation_turns"):
        assert q(f"SELECT count(*) FROM {table} WHERE owner = ?", ("alice",)).fetchone()[0] == 0, table
    assert q("SELECT count(*) FROM tensors WHERE concept_id NOT IN (SELECT id FROM concepts)").fetchone()[0] == 0
    remaining = {r[0] for r in q("SELECT data FROM images")}
    assert not any(bytes(d).startswith(b"alice-") and bytes(d) != b"alice-img-a" for d in remaining)
    assert b"alice-img-a" in {bytes(d) for d in remaining}  # still bob's
    assert "alice" not in store.owners() and not store.has_owner("alice")
    assert reliability_snapshot(store, "bob") == bob_before
    assert store.image_bytes("bob", shared.images[0]) == b"alice-img-a"
    assert store.search("alice", vec(0), embedder="e") == []
