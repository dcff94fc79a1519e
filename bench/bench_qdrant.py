"""(b) Exact blocked evaluation vs querying Qdrant one query at a time, same leave-one-out job.

The job: leave-one-out k-NN retrieval (k = 5) of N = 20,000 clustered, L2-normalised 512-d
vectors — every vector queries all the others. kiban's reporter does it with
``kiban_reporter.metrics.evaluate`` (exact, blocked matmul + top-k, metrics included). The
alternative is to ask the vector database, one query at a time, as a search client would:
Qdrant local mode (the embedded default; brute force in numpy), ``query_points`` with
limit k + 1, dropping the query itself.

Qdrant one at a time over 20,000 queries at tens of milliseconds each would take many minutes,
so a sample of queries is timed and the total extrapolated linearly (each query scans the same
collection, so the per-query time does not depend on which query it is); the output says so.
The collection is Qdrant local mode in memory (``":memory:"``): the search code is the same as
with a directory, without the time to write 20,000 points to disk first.

Run: ``python bench/bench_qdrant.py`` (``--quick``: 5,000 vectors, 50 sampled queries).
Numbers are machine-dependent; they are reported, never asserted. Target: speed-up >= 100x.
"""

from __future__ import annotations

import argparse
import time
import uuid

import numpy as np

D = 512
K = 5


def clustered(n: int, seed: int = 0, n_classes: int = 20) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_classes, size=n)
    centres = rng.standard_normal((n_classes, D), dtype=np.float32)
    v = rng.standard_normal((n, D), dtype=np.float32) * 2.0 + centres[labels]
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v, labels


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="5,000 vectors, 50 sampled queries")
    ap.add_argument("--n", type=int, default=None)
    ap.add_argument("--sample", type=int, default=None, help="Qdrant queries timed")
    args = ap.parse_args()
    n = args.n or (5_000 if args.quick else 20_000)
    sample = args.sample or (50 if args.quick else 200)

    from qdrant_client import QdrantClient, models

    from kiban_reporter.metrics import evaluate

    vectors, labels = clustered(n)
    label_str = [f"c{x}" for x in labels]

    evaluate(vectors[:2000], label_str[:2000], ks=(K,), bootstrap=0)  # warm-up
    t0 = time.perf_counter()
    res = evaluate(vectors, label_str, ks=(K,), bootstrap=0)
    t_exact = time.perf_counter() - t0
    assert res.per_query is not None

    client = QdrantClient(location=":memory:")
    client.create_collection(
        "bench", vectors_config=models.VectorParams(size=D, distance=models.Distance.COSINE)
    )
    t0 = time.perf_counter()
    ids = [str(uuid.uuid5(uuid.NAMESPACE_OID, str(i))) for i in range(n)]
    for s in range(0, n, 1000):
        client.upsert(
            "bench",
            points=models.Batch(
                ids=ids[s : s + 1000],
                vectors=vectors[s : s + 1000].tolist(),
                payloads=[{"row": i} for i in range(s, min(n, s + 1000))],
            ),
            wait=True,
        )
    t_load = time.perf_counter() - t0

    rng = np.random.default_rng(1)
    rows = np.sort(rng.choice(n, size=min(sample, n), replace=False))
    client.query_points("bench", query=vectors[0].tolist(), limit=K + 1)  # warm-up
    agree = 0
    t0 = time.perf_counter()
    for q in rows:
        hits = client.query_points(
            "bench", query=vectors[q].tolist(), limit=K + 1, with_payload=["row"]
        ).points
        got = [int((h.payload or {})["row"]) for h in hits if int((h.payload or {})["row"]) != q]
        agree += len(set(got[:K]) & set(res.per_query.indices[q].tolist()))
    t_sample = time.perf_counter() - t0
    per_query = t_sample / rows.size
    t_qdrant = per_query * n
    client.close()

    print(
        f"\nLeave-one-out, k={K}, {n:,} x {D} clustered float32 vectors "
        f"(exact: kiban_reporter.metrics.evaluate, block 1024, metrics included, no bootstrap)\n"
    )
    print("| method | queries timed | time per query | time for all queries |")
    print("|---|---|---|---|")
    print(
        f"| exact blocked evaluation | {n:,} (all) | {t_exact / n * 1e3:.3f} ms "
        f"| {t_exact:.1f} s (measured) |"
    )
    print(
        f"| Qdrant local mode, one query at a time | {rows.size} (sample) "
        f"| {per_query * 1e3:.1f} ms | {t_qdrant:.0f} s (extrapolated: {per_query * 1e3:.1f} ms"
        f" x {n:,}) |"
    )
    print(
        f"\n**speed-up (b): {t_qdrant / t_exact:.0f}x** (target >= 100x). Qdrant top-{K} agreed "
        f"with the exact top-{K} on {agree}/{rows.size * K} neighbours of the sample; loading "
        f"{n:,} points took {t_load:.1f} s (not counted)."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
