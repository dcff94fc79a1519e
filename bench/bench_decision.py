"""Benchmark of the report's decision sections: learning curves and the verdict.

(a) Learning curves (``kiban_reporter.learning_curve.learning_curves``) for 2 models (dim 512
    and 1,280), 10 classes, the default sizes (5, 10, 20, 50, 100 per class + all), 5 repeats,
    1,000 query-bootstrap draws, leave-one-out:
    - 10k vectors, every image a query (10k × 10k);
    - 100k vectors with a class-stratified sample of 2,000 queries against all 100k candidates
      (how the evaluation scores such sizes: ``query_sample``).
    Two ways: standalone (it computes the full index itself) and as wired in the report, given
    the report's ``evaluate`` results (only the subsets' columns are computed). Beside them, the
    report's own ``evaluate`` of the same models (1,000 resamples, k = 1, 3, 5), so the ratio
    "learning curves / evaluation" is measured in the same run. Peak memory is the tracemalloc
    peak of the call (numpy allocations included), above the input vectors.
(b) The verdict: ``metrics.compare`` of the two models (paired bootstrap, 1,000 resamples) and
    ``decision.decide`` on the resulting synthetic report sections, for 10k and 100k queries.

Run: ``python bench/bench_decision.py`` (``--quick``: 2k and 20k vectors). Numbers are machine-
dependent; they are reported (with the CPU model and core count), never asserted.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np

DIMS = {"small-512": 512, "large-1280": 1280}
CLASSES = 10
SIZES = [5, 10, 20, 50, 100]
REPEATS = 5
BOOTSTRAP = 1000
MARGIN = 0.01


def machine() -> str:
    """CPU model and usable cores, printed beside every absolute figure."""
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model}, {cores} cores"


def _vectors(labels: np.ndarray, dim: int, seed: int, noise: float) -> np.ndarray:
    """Normalised float32 class clusters, built in chunks (no full-size float64 temporaries)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((CLASSES, dim), dtype=np.float32)
    v = np.empty((labels.size, dim), dtype=np.float32)
    for s in range(0, labels.size, 8192):
        e = min(labels.size, s + 8192)
        chunk = rng.standard_normal((e - s, dim), dtype=np.float32) * noise + centres[labels[s:e]]
        chunk /= np.linalg.norm(chunk, axis=1, keepdims=True)
        v[s:e] = chunk
    return v


def _timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """(result, seconds, tracemalloc peak in MiB above the start)."""
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    t = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t
    peak = (tracemalloc.get_traced_memory()[1] - base) / 2**20
    tracemalloc.stop()
    return out, seconds, peak


def bench_case(n: int, n_queries: int | None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from kiban_reporter.learning_curve import learning_curves
    from kiban_reporter.metrics import evaluate
    from kiban_reporter.protocols import ProtocolPlan, stratified_sample

    rng = np.random.default_rng(n)
    codes = rng.integers(0, CLASSES, size=n)
    labels = [f"class-{c}" for c in codes]
    vectors = {
        name: _vectors(codes, dim, seed=i, noise=6.0 + 2.0 * i)
        for i, (name, dim) in enumerate(DIMS.items())
    }
    query_mask = np.ones(n, dtype=bool)
    if n_queries is not None and n_queries < n:
        picked, _ = stratified_sample(labels, n_queries, seed=0)
        query_mask = np.zeros(n, dtype=bool)
        query_mask[picked] = True
    plan = ProtocolPlan(
        requested="leave-one-out",
        name="leave-one-out",
        query_mask=query_mask,
        candidate_mask=np.ones(n, dtype=bool),
        groups=None,
        exclusion="the query itself",
    )
    nq = int(query_mask.sum())
    rows: list[dict[str, Any]] = []
    results = {}
    t_eval = 0.0
    peak_eval = 0.0
    for name, v in vectors.items():
        res, sec, peak = _timed(
            functools.partial(
                evaluate,
                v,
                labels,
                None,
                ks=(1, 3, 5),
                query_mask=query_mask,
                bootstrap=BOOTSTRAP,
                seed=0,
                name=name,
            )
        )
        results[name] = res
        t_eval += sec
        peak_eval = max(peak_eval, peak)
    rows.append({"what": "evaluate (the report, 2 models)", "s": t_eval, "peak": peak_eval})

    def curves(with_results: bool) -> Any:
        return learning_curves(
            vectors,
            labels,
            plan,
            5,
            SIZES,
            REPEATS,
            seed=0,
            margin=MARGIN,
            bootstrap=BOOTSTRAP,
            results=results if with_results else None,
        )

    out, sec, peak = _timed(lambda: curves(False))
    rows.append({"what": "learning curves, standalone", "s": sec, "peak": peak})
    wired, sec_w, peak_w = _timed(lambda: curves(True))
    rows.append({"what": "learning curves, given the report's results", "s": sec_w, "peak": peak_w})
    same = out.model_dump(exclude={"seconds"}) == wired.model_dump(exclude={"seconds"})
    for r in rows:
        r.update(n=n, queries=nq, ratio=r["s"] / t_eval)
    info = {"same": same, "statement": wired.statement, "curves": wired.curves}
    return rows, info


def _section(name: str, result: Any, seconds_per_1k: float) -> Any:
    from kiban_reporter.cost import CostSummary
    from kiban_reporter.report import ModelSection

    cost = CostSummary(
        images=result.n_rows,
        provider="CPUExecutionProvider",
        threads=0,
        batch_size=32,
        device="bench",
        encode_images_per_second=1000 / seconds_per_1k,
        inference_images_per_second=None,
        seconds_per_1k=seconds_per_1k,
        price_per_hour=1.0,
        currency="EUR",
        cost_per_1k=seconds_per_1k / 3600,
        bytes_per_vector=4 * 512,
        params=1,
        model_file_bytes=1,
        devices=["bench"],
    )
    return ModelSection(
        name=name,
        family="domain",
        source="bench",
        architecture="bench",
        weights="bench",
        pretrained=True,
        embedding_dim=512,
        params=1,
        model_sha256="0" * 64,
        parity_min_cosine=None,
        images_encoded=result.n_rows,
        encode_failures=[],
        retrieval=result,
        cost=cost,
    )


def bench_verdict(n_queries: int) -> dict[str, Any]:
    """compare + decide for two models on ``n_queries`` queries (1,000 paired resamples).

    The per-query arrays come from a cheap ``evaluate`` (dim 64, 2,000 candidates): the
    verdict's cost depends on the number of queries and resamples, not on how they were ranked.
    """
    from kiban_reporter.decision import decide
    from kiban_reporter.metrics import compare, evaluate

    rng = np.random.default_rng(7)
    n = n_queries + 2000
    codes = rng.integers(0, CLASSES, size=n)
    labels = [f"class-{c}" for c in codes]
    qmask = np.zeros(n, dtype=bool)
    qmask[:n_queries] = True
    results = [
        evaluate(
            _vectors(codes, 64, seed=s, noise=4.0 + s),
            labels,
            None,
            ks=(1, 3, 5),
            query_mask=qmask,
            candidate_mask=~qmask,
            bootstrap=0,
            name=name,
        )
        for s, name in enumerate(["a", "b"])
    ]
    t = time.perf_counter()
    pair = compare(results[0], results[1], bootstrap=BOOTSTRAP, seed=0)
    t_compare = time.perf_counter() - t
    sections = [_section("a", results[0], 2.0), _section("b", results[1], 20.0)]
    t = time.perf_counter()
    decision = decide(sections, [pair], 5, MARGIN)
    t_decide = time.perf_counter() - t
    line = decision.line if decision is not None else ""
    return {"queries": n_queries, "compare": t_compare, "decide": t_decide, "line": line}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2k and 20k vectors")
    args, _ = parser.parse_known_args()
    cases = [(2_000, None), (20_000, 2_000)] if args.quick else [(10_000, None), (100_000, 2_000)]
    where = machine()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    print(f"machine: {where}; numpy {np.__version__}; load average at start: {load}")
    print(
        f"\n## Learning curves: 2 models (dims {', '.join(map(str, DIMS.values()))}), "
        f"{CLASSES} classes, sizes {SIZES} + all, {REPEATS} repeats, {BOOTSTRAP} draws, "
        "MV@5 macro-F1, leave-one-out\n"
    )
    print("| vectors | queries | what | seconds | × evaluate | peak MiB | machine |")
    print("|---:|---:|---|---:|---:|---:|---|")
    notes = []
    for n, nq in cases:
        rows, info = bench_case(n, nq)
        for r in rows:
            sample = " (stratified sample)" if nq is not None else " (all)"
            print(
                f"| {r['n']:,} | {r['queries']:,}{sample} | {r['what']} | {r['s']:.2f} | "
                f"{r['ratio']:.2f} | {r['peak']:.0f} | {where} |",
                flush=True,
            )
        notes.append(
            f"{n:,}: standalone == given results: {info['same']}; {info['statement']} ("
            + "; ".join(
                f"{c.model}: "
                + ", ".join(
                    f"{p.per_class or 'all'}={p.value:.3f}" for p in c.points if p.value is not None
                )
                for c in info["curves"]
            )
            + ")"
        )
    print()
    for line in notes:
        print(f"- {line}")
    print("\n## Verdict: paired comparison (1,000 resamples) + decide, 2 models\n")
    print("| queries | compare s | decide s | machine |")
    print("|---:|---:|---:|---|")
    verdict_sizes = [2_000, 20_000] if args.quick else [10_000, 100_000]
    for nq in verdict_sizes:
        v = bench_verdict(nq)
        print(f"| {nq:,} | {v['compare']:.2f} | {v['decide']:.4f} | {where} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
