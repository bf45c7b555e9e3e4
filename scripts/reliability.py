"""Reliability runs for a concept database backend: crash safety and multi-process concurrency.

    python scripts/reliability.py crash --db /tmp/r.db --rounds 200          # SIGKILL a bulk import 200 times
    python scripts/reliability.py concurrency --db postgresql://... --seconds 60 --readers 4
    python scripts/reliability.py crash --db local-postgres                  # a throwaway local PostgreSQL
    python scripts/reliability.py hostile --db local-postgres                # the hostile-input corpus
    python scripts/reliability.py hostile --server                           # ... against `mmpersona serve`

`tests/test_reliability.py` runs short versions of both on every backend. Each command ends with one JSON line.

crash: a child process bulk-imports batches of concepts (each batch one transaction) and prints the names of
every batch once its commit returned; the parent kills it with SIGKILL at a random moment, then opens the
database and checks that every concept reported committed is there with all its images and vectors, that no
concept is there in part, and that searching with a concept's own vector finds that concept first.

concurrency: reader processes search, list and read while two writer processes add concepts and increment a
shared counter (optimistic concurrency: `expected_version`, retried on conflict) for a bounded time. Checks: no
process fails, every reader only ever sees whole concepts and a counter that never goes back, and at the end the
counter equals the increments the writers made and every added concept is there (no lost updates).

hostile: the hostile-input corpus (scripts/hostile_corpus.py: bombs built on the fly, forged and squatting
archives, malformed manifests and RAP files, lookalike handles, undecodable arguments, oversized app requests),
each case run by user "bob" as a CLI (or app) child process. Per case: the exit must be a clean `error: ...`
with code 2 (or a success where the input is legitimate), never a traceback; the child's peak memory is read
from the kernel (wait4); bytes left in its temporary folder and working folder are counted; and user "alice"
then adds and searches her concept, which must give bit-identical results to a database nobody else used.
`--small` builds small bombs (for the test suite).
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
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

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


# ---------------------------------------------------------------------- hostile input


def _run_child(argv: list, env: dict, cwd: Path, timeout: float = 600) -> tuple[int, str, float]:
    """(exit code, stderr, peak RSS in MB) of one child process."""
    import os
    import tempfile

    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=cwd)
        deadline = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.02)
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        return proc.returncode, err.read().decode("utf-8", "replace"), usage.ru_maxrss / 1024


def app_child(case: str, path: str, db: str) -> None:
    """One oversized or malformed app request, made through the app's own methods (no server)."""
    import gradio_app

    from mmpersona import MmpersonaError

    app = gradio_app.App("tiny", db, "cpu", multi_user=True)
    try:
        if case == "history-chars":
            gradio_app.bounded_history([{"role": "user", "content": "x" * 400_000}])
        elif case == "history-turns":  # accepted, but only the most recent turns within the limits go on
            turns = gradio_app.bounded_history([{"role": "user", "content": "hi " * 50}] * 100)
            assert len(turns) <= gradio_app.MAX_HISTORY_TURNS
        elif case == "prompt-chars":
            app.generate("bob", "x" * 100_000, [], 1, 1, 0)
        elif case == "question-chars":
            next(app.chat("bob", None, "q" * 100_000, []))
        elif case in ("rap", "folder"):
            app.import_upload("bob", path, case)
        else:
            raise SystemExit(f"unknown app case {case!r}")
    except (MmpersonaError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def probe_child(mode: str, db: str, inputs: str) -> None:
    """setup: a legitimate archive (inputs/legit.zip) and the vector of image Y (inputs/vy.npy); prints the
    embedder's name. probe: alice adds her concept and searches; prints her results (then erases them)."""
    import hostile_corpus as hc

    from mmpersona import ConceptDB

    x, y = hc.png(1), hc.png(2)
    with ConceptDB(db, preset="tiny", device="cpu") as cdb:
        if mode == "setup":
            np.save(Path(inputs) / "vy.npy", cdb.embedder.embed_images([y])[0])
            cdb.add("carol", "legit", [x, y], info="a legitimate archive")
            cdb.add("carol", "other", [hc.png(3)])
            cdb.export_concepts("carol", Path(inputs) / "legit.zip")
            print(json.dumps(cdb.embedder.name))
            return
        cdb.erase_user("alice")
        cdb.add("alice", "cat", [x], info="alice's cat")
        out = [(m.concept.name, m.score, m.image) for m in cdb.search_image("alice", y)]
        out += [(m.concept.name, m.score, m.image) for m in cdb.search_text("alice", "a cat")]
        cdb.erase_user("alice")
        print(json.dumps(out))


def hostile(db: str, *, small: bool = False, work: Path | None = None, only: set[str] | None = None) -> dict:
    import os
    import shutil
    import tempfile

    import hostile_corpus as hc

    work = Path(work or tempfile.mkdtemp(prefix="mmpersona-hostile-"))
    inputs, tmp, cwd = work / "inputs", work / "tmp", work / "cwd"
    for d in (inputs, tmp, cwd):
        d.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TMPDIR": str(tmp), "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "scripts")])}
    x, y = hc.png(1), hc.png(2)
    (inputs / "x.png").write_bytes(x)
    (inputs / "y.png").write_bytes(y)
    size = (lambda big, little: little) if small else (lambda big, little: big)

    def child(mode: str, database: str) -> Any:
        """Work that loads models runs in a child too: this process stays small, because a child's peak RSS
        as the kernel reports it starts from its parent's size at fork."""
        out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "probe-child", "--prefix", mode,
                              "--db", database, "--path", str(inputs)], capture_output=True, text=True, env=env,
                             check=True)
        return json.loads(out.stdout)

    emb_name = child("setup", str(work / "baseline.db"))
    vy = np.load(inputs / "vy.npy")
    baseline = child("probe", str(work / "baseline-empty.db"))

    cli = [sys.executable, "-m", "mmpersona", "--preset", "tiny", "--db", db, "--user", "bob"]

    def app(case: str, path: Path | str = "-") -> list:
        return [sys.executable, str(Path(__file__).resolve()), "app-child", "--db", db, "--prefix", case,
                "--path", str(path)]

    def imp(path: Path, fmt: str) -> list:
        return [*cli, "concepts", "import", str(path), "--format", fmt]

    def add(name, image: Path = inputs / "x.png") -> list:
        return [*cli, "concepts", "add", name, "--image", str(image)]

    cases: list[tuple[str, list, str]] = [  # (name, argv, expected: "refused" or "accepted")
        ("legitimate-archive", imp(inputs / "legit.zip", "archive"), "accepted"),
        ("forged-vector", imp(hc.forged_vector_archive(inputs / "forged.zip", x, vy, emb_name), "archive"), "accepted"),
        ("squat-in-use", imp(hc.squatting_archive(inputs / "squat.zip", hc.png(4), emb_name, 7), "archive"), "accepted"),
        ("squat-unused", imp(hc.squatting_archive(inputs / "squat2.zip", hc.png(5), "openclip:ViT-L-14-336/openai", 7),
                             "archive"), "accepted"),
        ("vector-bomb", imp(hc.vector_bomb(inputs / "vbomb.zip", hc.png(6), size(4 << 30, 64 << 20)), "archive"),
         "refused"),
        ("header-bomb", imp(hc.header_bomb(inputs / "hbomb.zip", hc.png(6)), "archive"), "refused"),
        ("many-members", imp(hc.many_members(inputs / "many.zip", size(200_001, 2_001)), "archive"),
         "refused" if not small else "accepted"),
        ("shared-bmp-deflated", imp(hc.shared_image_archive(inputs / "bmpz.zip", hc.bmp(*size((4000, 4000), (800, 800))),
                                                            60, compression=zipfile.ZIP_DEFLATED), "archive"),
         "refused"),
        ("shared-bmp-stored", imp(hc.shared_image_archive(inputs / "bmps.zip", hc.bmp(*size((4000, 4000), (800, 800))),
                                                          60), "archive"), "accepted"),
        ("app-rap-zip-bomb", app("rap", hc.unzip_bomb(inputs / "ubomb.zip", size(4 << 30, 100 << 20))), "refused"),
        ("app-folder-not-zip", app("folder", inputs / "x.png"), "refused"),
        ("app-history-chars", app("history-chars"), "refused"),
        ("app-history-turns", app("history-turns"), "accepted"),
        ("app-prompt-chars", app("prompt-chars"), "refused"),
        ("app-question-chars", app("question-chars"), "refused"),
        ("arg-not-utf8", [*cli, "concepts", "add", b"bad\xff", "--image", str(inputs / "x.png")], "refused"),
        ("user-not-utf8", [*cli[:-1], b"\xff", "concepts", "list"], "refused"),
        ("name-bo", add("bo"), "accepted"),
        ("name-cafe", add("café"), "accepted"),
    ]
    cases += [(f"name-{k}", add(v), "refused") for k, v in hc.LOOKALIKE_NAMES.items()]
    # --strict: a malformed file is refused whole, and so is one with a single bad item (without it, that
    # item is skipped and reported, and the import succeeds)
    cases += [(k, [*imp(p, "archive"), "--strict"], "refused")
              for k, p in hc.malformed_archives(inputs / "bad", x).items()]
    cases += [(k, [*imp(p, "rap"), "--strict"], "refused") for k, p in hc.malformed_raps(inputs / "raps", x).items()]
    if only:
        cases = [c for c in cases if c[0] in only or c[0] == "legitimate-archive"]
    results = []
    for name, argv, expected in cases:
        for leftover in tmp.iterdir():
            shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink()
        code, err, rss = _run_child(argv, env, cwd)
        lines = [line for line in err.splitlines() if line.strip()]
        traceback = "Traceback" in err or code not in (0, 2)
        outcome = "traceback" if traceback else ("refused" if code == 2 and lines and
                                                 lines[-1].startswith("error: ") else
                                                 "accepted" if code == 0 else "unclear")
        written = sum(f.stat().st_size for d in (tmp, cwd) for f in d.rglob("*") if f.is_file())
        effect = child("probe", db) != baseline
        results.append({"case": name, "expected": expected, "outcome": outcome, "exit": code,
                        "peak_rss_mb": round(rss, 1), "bytes_written_outside": written, "cross_user_effect": effect,
                        "error": lines[-1][:200] if lines else ""})
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    legit_rss = next(r["peak_rss_mb"] for r in results if r["case"] == "legitimate-archive")
    return {"test": "hostile", "cases": len(results),
            "clean_errors": sum(r["outcome"] == "refused" for r in results),
            "accepted": sum(r["outcome"] == "accepted" for r in results),
            "unexpected": [r["case"] for r in results if r["outcome"] != r["expected"]],
            "tracebacks": sum(r["outcome"] == "traceback" for r in results),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in results),
            "legitimate_import_rss_mb": legit_rss,
            "peak_over_legitimate_mb": round(max(r["peak_rss_mb"] for r in results) - legit_rss, 1),
            "bytes_written_outside": sum(r["bytes_written_outside"] for r in results),
            "cross_user_effects": sum(r["cross_user_effect"] for r in results)}


# ---------------------------------------------------------------------- entry point


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["crash", "concurrency", "hostile", "crash-child", "writer-child",
                                            "reader-child", "app-child", "probe-child"])
    parser.add_argument("--db", help="path, postgresql:// URL, or local-postgres (all but hostile --server)")
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--readers", type=int, default=3)
    parser.add_argument("--batch", type=int, default=25)
    parser.add_argument("--prefix", default="c")
    parser.add_argument("--id", type=int, default=0)
    parser.add_argument("--path", default="-")
    parser.add_argument("--small", action="store_true", help="hostile: small bombs (quick)")
    parser.add_argument("--server", action="store_true",
                        help="hostile: the HTTP corpus against a real `mmpersona serve` (scripts/hostile_server.py)")
    args = parser.parse_args()
    if args.command == "hostile" and args.server:
        import tempfile

        import hostile_server

        print(json.dumps(hostile_server.run(Path(tempfile.mkdtemp(prefix="mmpersona-hostile-server-")))))
        return
    if args.db is None:
        parser.error("--db is required")
    if args.command == "app-child":
        return app_child(args.prefix, args.path, args.db)
    if args.command == "probe-child":
        return probe_child(args.prefix, args.db, args.path)
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
        elif args.command == "hostile":
            result = hostile(args.db, small=args.small)
        else:
            result = concurrency(args.db, args.seconds, readers=args.readers)
    finally:
        if server is not None:
            server.stop()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
