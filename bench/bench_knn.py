"""Micro-benchmark of the exact retrieval-evaluation kernel (``kiban_reporter.metrics``).

(a) Efficiency: GFLOP/s of the blocked search (matmul + group exclusion + exact top-k with the
    tie rule), counting 2*Nq*Nc*D FLOP, divided by the GFLOP/s of ONE plain numpy matmul of the
    same block shape. The ratio says how much of the BLAS speed the bookkeeping costs;
    target >= 0.6.
(b) The exact kernel against faiss, what a scientist would reach for instead: faiss
    ``IndexFlatIP`` (exact inner-product search) with the same leave-one-group-out exclusion
    done the usual way -- over-fetch, drop same-group hits, re-fetch (with k + the largest
    group, which cannot run short) for the queries left with fewer than k. Same vectors, same
    queries, same thread count (the cores ``exact_knn`` uses, ``faiss.omp_set_num_threads``);
    ratio = faiss time / kernel time (target >= 1.0), best of interleaved repeats, with each
    side's process CPU time. Both must return the same top-k set for every query except ties
    (asserted). faiss-cpu is a bench-only dependency (``pip install kiban[bench]``); without
    it the row is skipped.
(c) Peak memory of a full ``evaluate`` (search + metrics + 1,000 bootstrap resamples) on
    50k and 200k x 1,024 vectors with a query sample, each in a fresh subprocess: ru_maxrss
    delta (after the vectors exist) and tracemalloc peak. All-vs-all at 200k is 8e13 FLOP
    (about half an hour on two cores), so the query sample is how such sizes are evaluated.

Run: ``python bench/bench_knn.py`` (``--quick`` for a fast smoke run). Numbers are machine-
dependent; they are reported, never asserted.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import numpy as np

D = 1024


def _vectors(n: int, seed: int, n_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Normalised float32 vectors built in chunks (no float64 temporaries of full size)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_classes, size=n)
    centres = rng.standard_normal((n_classes, D), dtype=np.float32)
    v = np.empty((n, D), dtype=np.float32)
    for s in range(0, n, 8192):
        e = min(n, s + 8192)
        chunk = rng.standard_normal((e - s, D), dtype=np.float32) * 3.0 + centres[labels[s:e]]
        chunk /= np.linalg.norm(chunk, axis=1, keepdims=True)
        v[s:e] = chunk
    return v, labels


def bench_efficiency(n_cand: int, n_queries: int, block: int, k: int) -> dict:
    from kiban_reporter.metrics.knn import exact_knn

    v, _ = _vectors(n_cand, 0)
    groups = np.arange(n_cand) // 50  # 50 rows per group (e.g. tiles of one slide)
    qrows = np.sort(np.random.default_rng(1).choice(n_cand, n_queries, replace=False))
    buf = np.empty((block, n_cand), dtype=np.float32)
    qb = v[qrows[:block]]
    np.matmul(qb, v.T, out=buf)  # warm-up
    exact_knn(v, k, qrows[:block], None, groups, block)  # warm-up
    # Interleaved repeats, best of each: the machine is shared, so the minimum is the least
    # disturbed measurement of both sides of the ratio.
    t_mm = t_k = float("inf")
    for _ in range(3):
        for _ in range(2):
            t = time.perf_counter()
            np.matmul(qb, v.T, out=buf)
            t_mm = min(t_mm, time.perf_counter() - t)
        t = time.perf_counter()
        exact_knn(v, k, qrows, None, groups, block)
        t_k = min(t_k, time.perf_counter() - t)
    gf_mm = 2 * block * n_cand * D / t_mm / 1e9
    del buf
    gf_k = 2 * n_queries * n_cand * D / t_k / 1e9
    return {
        "n_cand": n_cand,
        "n_queries": n_queries,
        "block": block,
        "k": k,
        "matmul_block_s": t_mm,
        "matmul_gflops": gf_mm,
        "kernel_s": t_k,
        "kernel_gflops": gf_k,
        "ratio": gf_k / gf_mm,
    }


def _faiss_loo_group(
    index: object, v: np.ndarray, qrows: np.ndarray, groups: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """faiss top-k with the query's whole group excluded: over-fetch, filter, re-fetch.

    The usual way (faiss has no per-query exclusion): fetch 2k (enough for almost every query:
    only rows of the query's own group are dropped), keep the first k hits outside the group,
    and search again, with k + the largest group, only for the queries left short -- that
    fetch cannot run short, since at most a whole group is dropped. Returns ids, similarities
    and how many queries needed the second search.
    """
    max_group = int(np.bincount(groups).max())
    q = v[qrows]
    qg = groups[qrows][:, None]
    out = np.full((qrows.size, k), -1, dtype=np.int64)
    out_sims = np.full((qrows.size, k), -np.inf, dtype=np.float32)
    todo = np.arange(qrows.size)
    fetch = 2 * k
    refetched = 0
    while todo.size:
        sims, ids = index.search(q[todo], fetch)  # type: ignore[attr-defined]
        keep = (ids >= 0) & (groups[np.maximum(ids, 0)] != qg[todo])
        short = keep.sum(axis=1) < k
        done = todo[~short]
        if done.size:
            ok_keep = keep[~short]
            # the first k kept hits of each row, in faiss's (similarity) order
            sel = ok_keep & (np.cumsum(ok_keep, axis=1) <= k)
            out[done] = ids[~short][sel].reshape(done.size, k)
            out_sims[done] = sims[~short][sel].reshape(done.size, k)
        todo = todo[short]
        if todo.size:
            if fetch >= k + max_group:
                raise AssertionError("faiss returned fewer than k rows outside the group")
            refetched += todo.size
            fetch = k + max_group  # enough for every query: at most max_group are excluded
    return out, out_sims, refetched


def _check_same_neighbours(
    v: np.ndarray,
    qrows: np.ndarray,
    groups: np.ndarray,
    ours: np.ndarray,
    theirs: np.ndarray,
    k: int,
    tol: float = 1e-6,
) -> tuple[int, int]:
    """Assert the kernel and faiss found the same top-k sets, except ties.

    Two BLAS builds round the last bit of a similarity differently, so where the sets differ
    the differing rows must be (near-)ties: the k similarities of both sets, recomputed in
    float64 and sorted, agree within ``tol``, and no set holds a row of the query's group.
    Returns (queries whose sets differ, queries checked).
    """
    assert ours.shape == theirs.shape == (qrows.size, k)
    assert (ours >= 0).all() and (theirs >= 0).all(), "a query got fewer than k neighbours"
    qg = groups[qrows][:, None]
    assert (groups[ours] != qg).all(), "kernel result includes same-group rows"
    assert (groups[theirs] != qg).all(), "faiss result includes same-group rows"
    differ = np.flatnonzero((np.sort(ours, axis=1) != np.sort(theirs, axis=1)).any(axis=1))
    q = v[qrows[differ]].astype(np.float64)
    for i, row in enumerate(differ):
        a = np.sort(v[ours[row]].astype(np.float64) @ q[i])
        b = np.sort(v[theirs[row]].astype(np.float64) @ q[i])
        assert np.allclose(a, b, rtol=0, atol=tol), (
            f"query row {qrows[row]}: kernel {ours[row]} ({a}) vs faiss {theirs[row]} ({b}) "
            "differ beyond ties"
        )
    return int(differ.size), int(qrows.size)


def bench_faiss(n_cand: int, n_queries: int, block: int, k: int, repeats: int = 5) -> dict:
    """Exact kernel vs faiss IndexFlatIP, leave-one-group-out, same vectors and threads."""
    try:
        import faiss
    except ImportError:
        return {"skipped": "faiss not installed (pip install 'kiban[bench]' or faiss-cpu)"}
    from kiban_reporter.metrics.knn import exact_knn, usable_threads

    threads = usable_threads()  # what exact_knn runs on; faiss gets the same
    faiss.omp_set_num_threads(threads)
    v, _ = _vectors(n_cand, 0)
    groups = np.arange(n_cand) // 50  # 50 rows per group, as in (a)
    qrows = np.sort(np.random.default_rng(1).choice(n_cand, n_queries, replace=False))
    t_build = time.perf_counter()
    index = faiss.IndexFlatIP(D)
    index.add(v)
    t_build = time.perf_counter() - t_build
    exact_knn(v, k, qrows[:block], None, groups, block)  # warm-up, both sides
    _faiss_loo_group(index, v, qrows[:block], groups, k)
    t_k = t_f = c_k = c_f = float("inf")
    for _ in range(repeats):  # interleaved, best of each (shared machine)
        t, c = time.perf_counter(), time.process_time()
        res = exact_knn(v, k, qrows, None, groups, block)
        t_k = min(t_k, time.perf_counter() - t)
        c_k = min(c_k, time.process_time() - c)
        t, c = time.perf_counter(), time.process_time()
        f_ids, _, refetched = _faiss_loo_group(index, v, qrows, groups, k)
        t_f = min(t_f, time.perf_counter() - t)
        c_f = min(c_f, time.process_time() - c)
    n_differ, n_checked = _check_same_neighbours(v, qrows, groups, res.indices, f_ids, k)
    return {
        "n_cand": n_cand,
        "n_queries": n_queries,
        "k": k,
        "threads": threads,
        "repeats": repeats,
        "kernel_s": t_k,
        "faiss_s": t_f,
        "kernel_cpu_s": c_k,
        "faiss_cpu_s": c_f,
        "faiss_add_s": t_build,
        "refetched": refetched,
        "ratio": t_f / t_k,
        "topk_sets_differ_by_ties": n_differ,
        "topk_sets_agree": 1 - n_differ / n_checked,
    }


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux), so data generation does not mask the peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _memory_child(n: int, n_queries: int, block: int, n_boot: int) -> None:
    """Runs in a subprocess: build data, then measure evaluate()'s extra peak memory."""
    import resource
    import tracemalloc

    from kiban_reporter.metrics import evaluate

    v, labels = _vectors(n, 2)
    label_str = np.array([f"class{x}" for x in labels])
    groups = np.array([f"slide{x:05d}" for x in np.arange(n) // 100])
    qmask = np.zeros(n, dtype=bool)
    qmask[np.random.default_rng(3).choice(n, n_queries, replace=False)] = True
    reset = _reset_peak_rss()
    base_kb = _status_kb("VmRSS") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    t = time.perf_counter()
    res = evaluate(v, label_str, groups, query_mask=qmask, bootstrap=n_boot, block_size=block)
    elapsed = time.perf_counter() - t
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    peak_kb = _status_kb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {
                "n": n,
                "n_queries": n_queries,
                "block": block,
                "bootstrap": n_boot,
                "vectors_mb": v.nbytes / 2**20,
                "rss_delta_mb": (peak_kb - base_kb) / 1024,
                "tracemalloc_peak_mb": peak / 2**20,
                "estimate_mb": min(block, n_queries) * n * 5 / 2**20,
                "evaluate_s": elapsed,
                "mv5_macro_f1": res.at(5).mv_macro_f1.value,
            }
        )
    )


def bench_memory(n: int, n_queries: int, block: int, n_boot: int) -> dict:
    cmd = [sys.executable, __file__, "--child", str(n), str(n_queries), str(block), str(n_boot)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _print_faiss(r: dict) -> None:
    print(f"(b) exact kernel vs faiss IndexFlatIP, leave-one-group-out, D={D} (target >= 1.0)")
    if "skipped" in r:
        print(f"skipped: {r['skipped']}")
        return
    print(
        f"{'Nc':>8} {'Nq':>6} {'k':>3} {'threads':>7} {'kernel s':>9} {'faiss s':>8} "
        f"{'kernel cpu s':>12} {'faiss cpu s':>11} {'refetched':>9} {'ratio':>6} "
        f"{'top-k agree':>11}"
    )
    print(
        f"{r['n_cand']:>8} {r['n_queries']:>6} {r['k']:>3} {r['threads']:>7} "
        f"{r['kernel_s']:>9.2f} {r['faiss_s']:>8.2f} {r['kernel_cpu_s']:>12.2f} "
        f"{r['faiss_cpu_s']:>11.2f} {r['refetched']:>9} {r['ratio']:>6.2f} "
        f"{r['topk_sets_agree']:>11.4f}"
    )
    print(
        f"best of {r['repeats']} interleaved runs; same top-{r['k']} sets for every query "
        f"except {r['topk_sets_differ_by_ties']} that differ only by ties (asserted)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, a few seconds")
    parser.add_argument("--child", nargs=4, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--faiss-only", action="store_true", help="only (b), the faiss row")
    args = parser.parse_args()
    if args.child:
        _memory_child(*args.child)
        return
    fa = bench_faiss(20_000, 2048, 1024, 5, 3) if args.quick else bench_faiss(50_000, 4096, 1024, 5)
    _print_faiss(fa)
    if args.faiss_only:
        return

    if args.quick:
        eff = [bench_efficiency(20_000, 2048, 1024, 5)]
        mem = [bench_memory(20_000, 500, 1024, 200)]
    else:
        eff = [bench_efficiency(50_000, 4096, 1024, 5), bench_efficiency(50_000, 4096, 256, 10)]
        mem = [bench_memory(50_000, 2000, 1024, 1000), bench_memory(200_000, 2000, 1024, 1000)]

    print(f"(a) kernel efficiency, D={D}, groups of 50 (target ratio >= 0.6)")
    print(
        f"{'Nc':>8} {'Nq':>6} {'block':>6} {'k':>3} {'matmul GF/s':>12} "
        f"{'kernel GF/s':>12} {'kernel s':>9} {'ratio':>6}"
    )
    for r in eff:
        print(
            f"{r['n_cand']:>8} {r['n_queries']:>6} {r['block']:>6} {r['k']:>3} "
            f"{r['matmul_gflops']:>12.1f} {r['kernel_gflops']:>12.1f} "
            f"{r['kernel_s']:>9.2f} {r['ratio']:>6.2f}"
        )
    _print_faiss(fa)
    print(f"\n(c) evaluate() peak memory beyond the vectors, D={D}, query sample, groups of 100")
    print(
        f"{'N':>8} {'Nq':>6} {'block':>6} {'boot':>5} {'vectors MB':>11} {'RSS delta MB':>13} "
        f"{'tracemalloc MB':>15} {'~block*N*5 MB':>14} {'time s':>7}"
    )
    for r in mem:
        print(
            f"{r['n']:>8} {r['n_queries']:>6} {r['block']:>6} {r['bootstrap']:>5} "
            f"{r['vectors_mb']:>11.0f} {r['rss_delta_mb']:>13.0f} "
            f"{r['tracemalloc_peak_mb']:>15.0f} {r['estimate_mb']:>14.0f} "
            f"{r['evaluate_s']:>7.1f}"
        )


if __name__ == "__main__":
    main()
