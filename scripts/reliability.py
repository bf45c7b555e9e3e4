"""Reliability runs for a concept database backend: crash safety and multi-process concurrency.

    python scripts/reliability.py crash --db /tmp/r.db --rounds 200          # SIGKILL a bulk import 200 times
    python scripts/reliability.py concurrency --db postgresql://... --seconds 60 --readers 4
    python scripts/reliability.py crash --db local-postgres                  # a throwaway local PostgreSQL

`tests/test_reliability.py` runs short versions of both on every backend. Each command ends with one JSON line.

crash: a child process bulk-imports batches of concepts (each batch one transaction) and prints the names of
every batch once its commit returned; the parent kills it with SIGKILL at a random moment, then opens the
database and checks that every concept reported committed is there with all its images and vectors, that no
concept is there in part, and that searching with a concept's own vector finds that concept first.

concurrency: reader processes search, list and read while two writer processes add concepts and increment a
shared counter (optimistic concurrency: `expected_version`, retried on conflict) for a bounded time. Checks: no
process fails, every reader only ever sees whole concepts and a counter that never goes back, and at the end the
counter equals the increments the writers made and every added concept is there (no lost updates).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from concept_db import open_store  # noqa: E402
from concept_db.sql import ConceptDBConflict  # noqa: E402
from concept_db.types import NewConcept  # noqa: E402

DIM = 32
OWNER = "crash-owner"
EMBEDDER = "e"


def vectors_for(name: str, n: int) -> np.ndarray:
    """Each concept's vectors follow from its name, so the checker knows what must be stored."""
    seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    v = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def images_for(name: str) -> int:
    return 1 + int(hashlib.sha256(name.encode()).digest()[0]) % 3


def new_concept(name: str) -> NewConcept:
    n = images_for(name)
    return NewConcept(name=name, info=f"info of {name}", images=[f"{name}/{j}".encode() for j in range(n)],
                      embeddings={EMBEDDER: vectors_for(name, n)})


def check_whole(store, owner: str, concept) -> None:
    """A concept is there in full: its images, their bytes, one vector per image, the vectors it was given."""
    n = images_for(concept.name)
    assert len(concept.images) == n, f"{concept.name}: {len(concept.images)} images, expected {n}"
    for j, h in enumerate(concept.images):
        assert store.image_bytes(owner, h) == f"{concept.name}/{j}".encode()
    hashes, matrix = store.vectors(owner, concept.id)[EMBEDDER]
    expected = vectors_for(concept.name, n)
    order = [hashes.index(h) for h in concept.images]
    assert np.allclose(matrix[order], expected, atol=1e-6), f"{concept.name}: vectors differ"


def check_all(store, owner: str, concepts, skip: set[str] = frozenset(), sample: int = 10) -> None:
    """`check_whole` for many concepts at once: one read of the owner's vectors; image bytes for a sample."""
    ids, hashes, matrix = store.owner_vectors(owner, EMBEDDER)
    rows: dict[str, dict[str, int]] = {}
    for i, (cid, h) in enumerate(zip(ids, hashes, strict=True)):
        rows.setdefault(cid, {})[h] = i
    todo = [c for c in concepts if c.name not in skip and c.name != "counter"]
    for c in todo:
        n = images_for(c.name)
        assert len(c.images) == n, f"{c.name}: {len(c.images)} images, expected {n}"
        mine = rows.get(c.id, {})
        assert set(mine) == set(c.images), f"{c.name}: vectors for {len(mine)} of {n} images"
        got = matrix[[mine[h] for h in c.images]]
        assert np.allclose(got, vectors_for(c.name, n), atol=1e-6), f"{c.name}: vectors differ"
    for c in random.Random(len(todo)).sample(todo, min(sample, len(todo))):
        for j, h in enumerate(c.images):
            assert store.image_bytes(owner, h) == f"{c.name}/{j}".encode(), f"{c.name}: image {j} differs"


# ---------------------------------------------------------------------- crash


def crash_child(db: str, prefix: str, batch: int) -> None:
    store = open_store(db)
    n = 0
    while True:
        names = [f"{prefix}-{n + i}" for i in range(batch)]
        store.add_many(OWNER, [new_concept(name) for name in names])
        print(json.dumps(names), flush=True)  # only after the commit returned
        n += batch


def crash(db: str, rounds: int, *, batch: int = 25, seed: int = 0, min_s: float = 0.3,
          max_s: float = 1.5) -> dict:
    rng = random.Random(seed)
    committed: list[str] = []
    present: dict = {}
    verified: set[str] = set()
    start = time.perf_counter()
    for r in range(rounds):
        child = subprocess.Popen([sys.executable, __file__, "crash-child", "--db", db, "--prefix", f"r{r}",
                                  "--batch", str(batch)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(rng.uniform(min_s, max_s))
        child.send_signal(signal.SIGKILL)
        out, err = child.communicate(timeout=60)
        if child.returncode != -signal.SIGKILL:
            raise AssertionError(f"round {r}: the child ended by itself ({child.returncode}): {err[-2000:]}")
        for line in out.splitlines():
            if line.strip():
                committed += json.loads(line)
        store = open_store(db)  # must open after every kill
        try:
            present = {c.name: c for c in store.all_concepts(OWNER)}
            missing = [n for n in committed if n not in present]
            assert not missing, f"round {r}: {len(missing)} committed concepts lost, e.g. {missing[:3]}"
            # reported or not, whatever is there is whole (committed rows do not change: check each one once)
            check_all(store, OWNER, present.values(), skip=verified)
            verified.update(present)
            for name in rng.sample(committed, min(10, len(committed))):
                hit = store.search(OWNER, vectors_for(name, 1)[0], embedder=EMBEDDER, k=1)
                assert hit and hit[0].concept.name == name and hit[0].score > 0.999, f"round {r}: search for {name}"
        finally:
            store.close()
    return {"test": "crash", "rounds": rounds, "committed": len(committed), "concepts": len(present),
            "seconds": round(time.perf_counter() - start, 1)}


# ---------------------------------------------------------------------- concurrency

SHARED = "shared-owner"


def writer_child(db: str, wid: int, seconds: float) -> None:
    store = open_store(db)
    rng = random.Random(wid)
    counter = store.find(SHARED, "counter")
    added = increments = conflicts = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if rng.random() < 0.5:
            names = [f"w{wid}-{added + i}" for i in range(rng.randint(1, 3))]
            store.add_many(SHARED, [new_concept(name) for name in names])
            added += len(names)
        else:
            while True:  # optimistic increment: read, write if unchanged, else retry
                current = store.get(SHARED, counter.id)
                try:
                    store.update(SHARED, counter.id, attributes={"n": current.attributes["n"] + 1},
                                 expected_version=current.version)
                    increments += 1
                    break
                except ConceptDBConflict:
                    conflicts += 1
    print(json.dumps({"added": added, "increments": increments, "conflicts": conflicts}), flush=True)


def reader_child(db: str, rid: int, seconds: float) -> None:
    store = open_store(db)
    rng = np.random.default_rng(rid)
    counter = store.find(SHARED, "counter")
    last = reads = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        q = rng.normal(size=DIM).astype(np.float32)
        for m in store.search(SHARED, q, embedder=EMBEDDER, k=5):
            if m.concept.name != "counter":
                check_whole(store, SHARED, m.concept)
        for c in store.list(SHARED, limit=20, offset=int(rng.integers(0, 50))):
            if c.name != "counter":
                assert len(c.images) == images_for(c.name), f"partial concept {c.name} listed"
        n = store.get(SHARED, counter.id).attributes["n"]
        assert n >= last, f"counter went back from {last} to {n}"
        last = n
        reads += 1
    print(json.dumps({"reads": reads}), flush=True)


def concurrency(db: str, seconds: float, *, readers: int = 3, writers: int = 2) -> dict:
    with open_store(db) as store:
        store.add(SHARED, "counter", attributes={"n": 0})
    procs = [subprocess.Popen([sys.executable, __file__, "writer-child", "--db", db, "--id", str(i),
                               "--seconds", str(seconds)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(writers)]
    procs += [subprocess.Popen([sys.executable, __file__, "reader-child", "--db", db, "--id", str(i),
                                "--seconds", str(seconds)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for i in range(readers)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=seconds + 120)
        if p.returncode != 0:
            raise AssertionError(f"a {'writer' if p in procs[:writers] else 'reader'} failed: {err[-3000:]}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    wrote, read = results[:writers], results[writers:]
    with open_store(db) as store:
        counter = store.find(SHARED, "counter")
        assert counter.attributes["n"] == sum(w["increments"] for w in wrote), "lost counter updates"
        concepts = store.all_concepts(SHARED)
        names = {c.name for c in concepts} - {"counter"}
        expected = {f"w{i}-{j}" for i, w in enumerate(wrote) for j in range(w["added"])}
        assert names == expected, f"{len(expected - names)} added concepts missing"
        check_all(store, SHARED, concepts)
    return {"test": "concurrency", "seconds": seconds, "added": len(names), "increments": counter.attributes["n"],
            "conflicts_retried": sum(w["conflicts"] for w in wrote), "reads": sum(r["reads"] for r in read)}


# ---------------------------------------------------------------------- entry point


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["crash", "concurrency", "crash-child", "writer-child", "reader-child"])
    parser.add_argument("--db", required=True, help="path, postgresql:// URL, or local-postgres")
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--readers", type=int, default=3)
    parser.add_argument("--batch", type=int, default=25)
    parser.add_argument("--prefix", default="c")
    parser.add_argument("--id", type=int, default=0)
    args = parser.parse_args()
    if args.command == "crash-child":
        return crash_child(args.db, args.prefix, args.batch)
    if args.command == "writer-child":
        return writer_child(args.db, args.id, args.seconds)
    if args.command == "reader-child":
        return reader_child(args.db, args.id, args.seconds)
    server = None
    if args.db == "local-postgres":
        from concept_db import local_pg

        server = local_pg.start()
        args.db = server.url
    try:
        if args.command == "crash":
            result = crash(args.db, args.rounds, batch=args.batch)
        else:
            result = concurrency(args.db, args.seconds, readers=args.readers)
    finally:
        if server is not None:
            server.stop()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
