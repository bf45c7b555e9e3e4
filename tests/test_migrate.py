"""`concept_db.migrate` and `mmpersona concepts migrate`: SQLite -> PostgreSQL and back, resumable, verified."""

import json
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save

from concept_db import open_store
from concept_db.migrate import MigrationError, migrate, summarize
from concept_db.types import NewConcept


def vecs(n, dim=8, seed=0):
    v = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def fill(store):
    """Two users with every kind of data, including an embedder that covers only some images."""
    for u, owner in enumerate(("alice", "bob")):
        items = [NewConcept(name=f"c{i}", category=f"cat{i % 2}", info=f"info {i}", aliases=[f"a{i}"],
                            attributes={"n": i}, images=[f"{owner}-{i}-{j}".encode() for j in range(2)],
                            embeddings={"clip": vecs(2, seed=u * 100 + i)}) for i in range(7)]
        added = store.add_many(owner, items).added
        first = store.get(owner, added[0])
        store.set_embeddings(owner, first.id, "other", [first.images[0]], vecs(1, dim=4, seed=9))
        store.put_tensor(owner, first.id, "tokens", save({"t": np.ones((2, 3), np.float32) * u}), model="m",
                         fingerprint="fp")
        store.add_profile_event(owner, "like", images=[f"{owner}-liked".encode()], comment="nice")
        store.add_profile_event(owner, "pair", images=[b"shared-a", b"shared-b"], prompt="a cat")
        store.put_blob(owner, "reward", save({"w": np.zeros(3, np.float32)}), model="m")
        store.set_setting(owner, "threshold", 0.25 + u)
        store.add_memory(owner, "c0 was three.", concept_id=first.id, kind="state", topic="age", valid_from=1.0e9)
        store.add_memory(owner, "c0 is four.", concept_id=first.id, kind="state", topic="age")
        store.add_memory(owner, f"I am {owner}.", status="proposed", source="chat")
        chat = store.start_conversation(owner, "about c0")
        store.add_turn(owner, chat.id, "Is this c0?", "Yes.", image=b"shared-a")  # a photo a pair also holds
        store.add_turn(owner, chat.id, "And now?", "Still c0.", image=f"{owner}-turn".encode())


@pytest.mark.pg
def test_sqlite_to_postgres_and_back(tmp_path, pg_url):
    src = open_store(tmp_path / "a.db")
    fill(src)
    report = migrate(src, pg_url, batch=3)
    assert [o.owner for o in report.owners] == ["alice", "bob"]
    alice = report.owners[0]
    assert alice.counts == {"concepts": 7, "images": 14, "vectors": 15, "tensors": 1, "events": 2, "blobs": 1,
                            "settings": 1, "memory": 3, "conversations": 1, "turns": 2}
    assert alice.copied["concepts"] == 7 and alice.copied["events"] == 2
    dst = open_store(pg_url)
    for owner in ("alice", "bob"):
        assert summarize(dst, owner) == summarize(src, owner)
        c = dst.find(owner, "a3")
        assert c == src.find(owner, "a3")  # ids, times and versions kept
        q = src.vectors(owner, c.id)["clip"][1][0]
        assert dst.search(owner, q, embedder="clip", k=1)[0].concept.name == "c3"
    assert dst.get_setting("bob", "threshold") == 1.25
    # and back into a fresh SQLite file: the digests still agree
    back = tmp_path / "b.db"
    again = migrate(dst, back)  # paths work as well as URLs and open stores
    assert [o.digest for o in again.owners] == [o.digest for o in report.owners]
    dst.close()
    src.close()


@pytest.mark.pg
def test_resume_copies_only_what_is_missing(tmp_path, pg_url):
    src = open_store(tmp_path / "a.db")
    fill(src)
    dst = open_store(pg_url)
    # an interrupted run: alice's first concepts and one event already landed
    some = src.list("alice", limit=3)
    dst.add_many("alice", [NewConcept(name=c.name, category=c.category, info=c.info, aliases=c.aliases,
                                      attributes=c.attributes, images=[src.image_bytes("alice", h) for h in c.images],
                                      embeddings={"clip": np.stack([src.vectors("alice", c.id)["clip"][1][
                                          src.vectors("alice", c.id)["clip"][0].index(h)] for h in c.images])},
                                      id=c.id, created=c.created, updated=c.updated, version=c.version)
                         for c in some])
    report = migrate(src, dst)
    assert report.owners[0].copied["concepts"] == 4
    rerun = migrate(src, dst)
    assert all(sum(o.copied.values()) == 0 for o in rerun.owners)
    # a target that was changed afterwards fails verification, naming the user
    dst.update("bob", dst.find("bob", "c1").id, info="edited on the target")
    with pytest.raises(MigrationError, match="'bob'.*different content"):
        migrate(src, dst, owners=["bob"])
    dst.close()
    src.close()


def test_same_database_refused(tmp_path):
    with pytest.raises(MigrationError, match="same database"):
        migrate(str(tmp_path / "a.db"), str(tmp_path / "a.db"))


@pytest.mark.pg
def test_cli_migrate(tmp_path, pg_url):
    src = tmp_path / "a.db"
    with open_store(src) as s:
        fill(s)
    cmd = [sys.executable, "-m", "mmpersona", "--json", "concepts", "migrate", "--from", str(src), "--to", pg_url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["verified"] and [o["counts"]["concepts"] for o in data["owners"]] == [7, 7]
    # the copied database answers through the CLI too
    listed = subprocess.run([sys.executable, "-m", "mmpersona", "--json", "--db", pg_url, "--user", "bob",
                             "concepts", "list"], capture_output=True, text=True, timeout=300)
    assert listed.returncode == 0, listed.stderr
    assert sorted(c["name"] for c in json.loads(listed.stdout)["concepts"]) == [f"c{i}" for i in range(7)]
    bad = subprocess.run([sys.executable, "-m", "mmpersona", "concepts", "migrate", "--from", str(src), "--to",
                          "postgresql://nobody@127.0.0.1:1/none"], capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "cannot connect to PostgreSQL" in bad.stderr and "Traceback" not in bad.stderr


def test_passwords_never_reach_reports_or_errors():
    from concept_db.postgres import redacted

    assert redacted("postgresql://app:s3cret@db.example:5432/mm") == "postgresql://app:***@db.example:5432/mm"
    assert redacted("/data/concepts.db") == "/data/concepts.db"
    with pytest.raises(Exception) as err:
        open_store("postgresql://app:s3cret@127.0.0.1:1/mm")
    assert "cannot connect" in str(err.value) and "s3cret" not in str(err.value)


@pytest.mark.pg
def test_cli_erase_user(pg_url):
    with open_store(pg_url) as s:
        fill(s)
    base = [sys.executable, "-m", "mmpersona", "--json", "--db", pg_url, "--user", "alice", "erase-user"]
    refused = subprocess.run(base, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "--yes" in refused.stderr
    done = subprocess.run(base + ["--yes"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"user": "alice", "concepts_removed": 7}
    with open_store(pg_url) as s:
        assert s.owners() == ["bob"] and summarize(s, "bob")[0]["concepts"] == 7
