"""Owner-filtered retrieval speed of the concept database against a numpy baseline measured in the same run.

    python benchmarks/retrieval.py --n 100000          # also 10000, 1000000
    python benchmarks/retrieval.py --n 1000000 --db /tmp/r.db --keep   # reuse a built database
    python benchmarks/retrieval.py --n 1000000 --db postgresql://user:pw@host/dbname   # an empty database
    python benchmarks/retrieval.py --n 1000000 --db local-postgres   # a throwaway local server (concept_db.local_pg)

Synthetic L2-normalised vectors (clustered, as real embeddings are), `--dim` 512, `--owners` 100; one concept with
one reference image per vector. Prints one final JSON line with
n, owners, dim, insert_per_s, open_s, query_p50_ms, query_p95_ms, baseline_p50_ms, ratio, recall_at_5, peak_rss_mb.

- insert_per_s: vectors written per second through the bulk write path (`add_many`, one transaction per batch
  of `--batch`), closing the store included (with SQLite that waits for the last checkpoint, which copies the
  write-ahead log into the database file); only the store's time counts, not making the synthetic vectors.
- open_s: open the database in a fresh store object and answer one query (its owner's vectors load lazily),
  after `store.optimize()` (SQLite: VACUUM, each owner's vectors contiguous on disk; PostgreSQL: ANALYZE), which a
  fresh build runs; open_before_optimize_s and optimize_s are reported beside it.
- query_*: `store.search(owner, q, k=5)` over `--query-owners` owners already loaded (warm), `--queries` queries.
- baseline_p50_ms: numpy matmul + argpartition over the same owner's vectors held contiguously in memory.
- ratio: query_p50_ms / baseline_p50_ms. recall_at_5: against the exact top-5 of the baseline.
Targets at 1M: ratio <= 2, recall_at_5 = 1.0, insert_per_s >= 20000, open_s <= 0.2 (embedded store);
PostgreSQL: query_p50_ms <= 10 with recall_at_5 = 1.0. With PostgreSQL, peak_rss_mb is this client's only.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from concept_db import open_store  # noqa: E402
from concept_db.types import NewConcept  # noqa: E402

EMBEDDER = "bench-512"


def owner_name(i: int) -> str:
    return f"user{i:03d}"


def make_vectors(rng: np.random.Generator, n: int, dim: int, centers: np.ndarray) -> np.ndarray:
    picks = rng.integers(0, centers.shape[0], n)
    v = centers[picks] + 0.35 * rng.standard_normal((n, dim), dtype=np.float32)
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def build(path: str, n: int, owners: int, dim: int, batch: int, seed: int) -> float:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((64, dim), dtype=np.float32)
    store = open_store(path)
    elapsed = 0.0  # time spent in the store only: making the synthetic data is not part of the insert rate
    written = 0
    try:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, unit="vec", desc="insert", file=sys.stderr)
    except ImportError:  # pragma: no cover
        bar = None
    while written < n:
        size = min(batch, n - written)
        vectors = make_vectors(rng, size, dim, centers)
        owner_ids = rng.integers(0, owners, size)
        per_owner = []
        for o in np.unique(owner_ids):
            rows = np.flatnonzero(owner_ids == o)
            per_owner.append((owner_name(int(o)), [
                NewConcept(name=f"c{written + int(r)}", category=f"cat{int(r) % 5}",
                           images=[f"img-{written + int(r)}".encode()], embeddings={EMBEDDER: vectors[r : r + 1]})
                for r in rows]))
        start = time.perf_counter()
        with store.transaction():  # one commit per batch, as a bulk import does
            for owner, items in per_owner:
                store.add_many(owner, items)
        elapsed += time.perf_counter() - start
        written += size
        if bar:
            bar.update(size)
    if bar:
        bar.close()
    start = time.perf_counter()
    store.close()  # counted: it waits for the last background checkpoint, so every vector is in the file
    elapsed += time.perf_counter() - start
    return n / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--owners", type=int, default=100)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--batch", type=int, default=20_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--query-owners", type=int, default=5)
    parser.add_argument("--db", default=None, help="database path or postgresql:// URL (default: a temp file); "
                        "`local-postgres` starts a throwaway local PostgreSQL + pgvector server")
    parser.add_argument("--keep", action="store_true", help="keep (and reuse) the database at --db")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    workdir = server = None
    if args.db is None:
        workdir = Path(tempfile.mkdtemp(prefix="mmpersona-bench-"))
        args.db = str(workdir / "concepts.db")
    elif args.db == "local-postgres":
        from concept_db import local_pg

        # enough shared memory to keep the queried owners' partitions cached, as a tuned server would
        server = local_pg.start(settings={"shared_buffers": "4GB", "max_wal_size": "8GB"})
        args.db = server.url
    postgres = args.db.startswith(("postgresql://", "postgres://"))
    rng = np.random.default_rng(args.seed + 1)
    centers = np.random.default_rng(args.seed).standard_normal((64, args.dim), dtype=np.float32)
    queries = make_vectors(rng, args.queries, args.dim, centers)
    owner_order = rng.permutation(args.owners)
    query_owners = [owner_name(int(o)) for o in owner_order[: args.query_owners]]

    def open_and_query(owner: str) -> float:
        start = time.perf_counter()
        s = open_store(args.db)
        s.search(owner, queries[0], embedder=EMBEDDER, k=5)
        elapsed = time.perf_counter() - start
        s.close()
        return elapsed

    insert_per_s = open_before = optimize_s = None
    if postgres:
        with open_store(args.db) as s:
            existing = len(s.owners())
        if existing and not args.keep:
            sys.exit(f"{args.db} already holds concepts of {existing} users: give an empty database, or --keep "
                     "to query what an earlier run built")
        exists = existing > 0
    else:
        exists = Path(args.db).exists()
    if not (args.keep and exists):
        for suffix in ("", "-wal", "-shm"):
            if not postgres:
                Path(args.db + suffix).unlink(missing_ok=True)
        insert_per_s = build(args.db, args.n, args.owners, args.dim, args.batch, args.seed)
        open_before = open_and_query(owner_name(int(owner_order[-1])))
        start = time.perf_counter()
        with open_store(args.db) as s:
            s.optimize()
        optimize_s = time.perf_counter() - start
    open_s = open_and_query(owner_name(int(owner_order[-2])))
    store = open_store(args.db)

    for o in query_owners:  # warm: load each queried owner once
        store.search(o, queries[0], embedder=EMBEDDER, k=5)
    # the baseline holds the same owners' vectors contiguously in memory, as plain numpy arrays
    baseline = {}
    for o in query_owners:
        ids, _, matrix = store.owner_vectors(o, EMBEDDER)
        baseline[o] = (np.ascontiguousarray(matrix), ids)

    times, base_times, hits = [], [], 0
    for i, q in enumerate(queries):
        o = query_owners[i % len(query_owners)]
        t = time.perf_counter()
        result = store.search(o, q, embedder=EMBEDDER, k=5)
        times.append(time.perf_counter() - t)
        matrix, ids = baseline[o]
        t = time.perf_counter()
        scores = matrix @ q
        top = np.argpartition(-scores, 4)[:5]
        top = top[np.argsort(-scores[top])]
        base_times.append(time.perf_counter() - t)
        hits += len({m.concept.id for m in result} & {ids[j] for j in top})
    store.close()

    p50 = float(np.percentile(times, 50)) * 1000
    base_p50 = float(np.percentile(base_times, 50)) * 1000
    result = {
        "n": args.n, "owners": args.owners, "dim": args.dim,
        "insert_per_s": round(insert_per_s, 1) if insert_per_s else None,
        "open_s": round(open_s, 4),
        "open_before_optimize_s": round(open_before, 4) if open_before is not None else None,
        "optimize_s": round(optimize_s, 2) if optimize_s is not None else None,
        "query_p50_ms": round(p50, 4), "query_p95_ms": round(float(np.percentile(times, 95)) * 1000, 4),
        "baseline_p50_ms": round(base_p50, 4), "ratio": round(p50 / base_p50, 3),
        "recall_at_5": round(hits / (5 * len(queries)), 4),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    print(f"{args.n} vectors, {args.owners} owners: query p50 {p50:.3f} ms vs numpy {base_p50:.3f} ms",
          file=sys.stderr)
    print(json.dumps(result))
    if workdir is not None and not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    if server is not None:
        server.stop()
        shutil.rmtree(server.datadir, ignore_errors=True)


if __name__ == "__main__":
    main()
