"""``evaluate``: vectors + labels (+ groups, masks) -> ``RetrievalResult``.

Orchestration only: encode inputs, run the exact blocked search once for K = max(ks), derive
per-query outcomes for every k, then point estimates, classification reports and bootstrap
intervals. The definitions are in the package docstring (``kiban_reporter.metrics``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from numpy.typing import ArrayLike

from kiban_reporter.metrics import diagnostics
from kiban_reporter.metrics.bootstrap import (
    bootstrap_distributions,
    metrics_from_sums,
    percentile_interval,
    unit_sums,
)
from kiban_reporter.metrics.classification import classification_report
from kiban_reporter.metrics.inputs import EncodedInputs, encode_inputs
from kiban_reporter.metrics.knn import KnnResult, exact_knn
from kiban_reporter.metrics.results import Estimate, KMetrics, PerQuery, RetrievalResult
from kiban_reporter.metrics.retrieval import (
    average_precision_at,
    hits_at,
    majority_vote,
    neighbour_labels,
    relevant_counts,
)


def _check_ks(ks: Iterable[int]) -> tuple[int, ...]:
    out = tuple(sorted({int(k) for k in ks}))
    if not out or out[0] < 1:
        raise ValueError(f"ks must be positive integers, got {tuple(ks)}")
    return out


def _finite_or_none(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def evaluate(
    vectors: ArrayLike,
    labels: ArrayLike | Sequence[object],
    groups: ArrayLike | Sequence[object] | None = None,
    ks: Iterable[int] = (1, 3, 5),
    query_mask: ArrayLike | None = None,
    candidate_mask: ArrayLike | None = None,
    bootstrap: int = 1000,
    seed: int = 0,
    block_size: int = 1024,
    confidence: float = 0.95,
    name: str | None = None,
) -> RetrievalResult:
    """Exact retrieval evaluation of one embedding set (see the package docstring).

    Args:
        vectors: ``[N, D]`` L2-normalised float32, rows in key order.
        labels: ``N`` labels; missing ones (None, "", NaN) are left out and counted.
        groups: ``N`` group ids for leave-one-group-out; ``None`` = leave-one-out.
        ks: neighbourhood sizes for acc@k, MV@k, mAP@k.
        query_mask / candidate_mask: boolean ``[N]``; default all rows.
        bootstrap: resamples for the percentile intervals (0 = no intervals).
        seed: seeds the bootstrap Generator; same seed -> identical intervals.
        block_size: queries per matmul block (memory ~ block_size x n_candidates x 5 bytes).
        confidence: interval level.
        name: model name carried into the result and comparisons.
    """
    ks_t = _check_ks(ks)
    if bootstrap < 0:
        raise ValueError(f"bootstrap must be >= 0, got {bootstrap}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    enc = encode_inputs(vectors, labels, groups, query_mask, candidate_mask)
    knn = None
    if enc.query_rows.size:
        knn = exact_knn(
            enc.vectors, ks_t[-1], enc.query_rows, enc.candidate_rows, enc.group_codes, block_size
        )
    return score_neighbours(enc, knn, ks_t, bootstrap, seed, confidence, name)


def score_neighbours(
    enc: EncodedInputs,
    knn: KnnResult | None,
    ks: Iterable[int],
    bootstrap: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    name: str | None = None,
) -> RetrievalResult:
    """Metrics, classification reports and intervals from the queries' exact top-``max(ks)``.

    Split from ``evaluate`` so that the streamed evaluation (``kiban_reporter.streamed``),
    which finds the neighbours shard by shard without the vectors in memory, is scored by the
    very same code. ``knn`` is ``None`` when there is no query; of ``enc.vectors`` only the
    row count is read (the streamed path passes an ``[N, 0]`` array).
    """
    ks_t = _check_ks(ks)
    warnings = list(enc.warnings)
    protocol = "leave-one-group-out" if enc.grouped else "leave-one-out"
    unit = "group" if enc.grouped else "query"

    def empty_result(n_without_candidates: int) -> RetrievalResult:
        none = Estimate(value=None, n=0)
        metrics = [
            KMetrics(
                k=k,
                acc_at_k=none,
                mv_accuracy=none,
                mv_macro_f1=none,
                mv_weighted_f1=None,
                map_at_k=none,
                n_queries_short=0,
                classification=None,
            )
            for k in ks_t
        ]
        return RetrievalResult(
            name=name,
            protocol=protocol,
            ks=list(ks_t),
            classes=enc.classes,
            n_rows=int(enc.vectors.shape[0]),
            n_queries=0,
            n_candidates=int(enc.candidate_rows.size),
            n_unlabelled=enc.n_unlabelled,
            n_queries_without_candidates=n_without_candidates,
            n_queries_without_relevant=0,
            n_groups=0 if enc.grouped else None,
            bootstrap_unit=unit,
            bootstrap_resamples=bootstrap,
            seed=seed,
            confidence=confidence,
            metrics=metrics,
            warnings=warnings,
        )

    if knn is None or enc.query_rows.size == 0:
        warnings += diagnostics.no_queries(int(enc.vectors.shape[0]), enc.n_unlabelled)
        return empty_result(0)

    keep = knn.n_candidates > 0
    n_without = int(np.count_nonzero(~keep))
    warnings += diagnostics.without_candidates(n_without)
    if not keep.any():
        warnings += diagnostics.no_queries(int(enc.vectors.shape[0]), enc.n_unlabelled)
        return empty_result(n_without)

    qrows = knn.query_rows[keep]
    indices = knn.indices[keep]
    n_cand = knn.n_candidates[keep]
    true = enc.label_codes[qrows]
    nbr = neighbour_labels(enc.label_codes, indices)
    n_rel = relevant_counts(enc.label_codes, enc.group_codes, qrows, enc.candidate_rows)
    has_rel = n_rel > 0
    if enc.grouped:
        _, units = np.unique(enc.group_codes[qrows], return_inverse=True)
        units = units.reshape(-1).astype(np.int64)
    else:
        units = np.arange(qrows.size, dtype=np.int64)
    n_units = int(units.max()) + 1

    hits = np.stack([hits_at(nbr, true, k) for k in ks_t])
    mv_pred = np.stack([majority_vote(nbr, k) for k in ks_t])
    ap = np.stack([average_precision_at(nbr, true, n_rel, k) for k in ks_t])
    pq = PerQuery(
        ks=ks_t,
        classes=tuple(enc.classes),
        query_rows=qrows,
        true=true,
        units=units,
        indices=indices,
        sims=knn.sims[keep],
        n_candidates=n_cand,
        n_relevant=n_rel,
        has_relevant=has_rel,
        hits=hits,
        mv_pred=mv_pred,
        mv_correct=mv_pred == true[None, :],
        ap=ap,
    )

    present = [enc.classes[c] for c in np.unique(true)]
    warnings += diagnostics.single_class(present)
    if enc.grouped:
        rows = np.union1d(qrows, enc.candidate_rows)
        warnings += diagnostics.classes_with_one_group(
            enc.label_codes, enc.group_codes, rows, enc.classes
        )
    n_without_rel = int(np.count_nonzero(~has_rel))
    warnings += diagnostics.without_relevant(n_without_rel, int(qrows.size))
    warnings += diagnostics.few_units(n_units, unit, bootstrap)

    sums, layout = unit_sums(pq)
    point = metrics_from_sums(sums.sum(axis=0, keepdims=True), layout)
    dist = None
    if bootstrap > 0 and n_units >= 2:
        dist = bootstrap_distributions([sums], layout, bootstrap, seed)[0]

    def estimate(key: str, j: int, n: int) -> Estimate:
        value = _finite_or_none(point[f"{key}@{j}"][0])
        lo = hi = None
        if dist is not None and value is not None:
            lo, hi = percentile_interval(dist[f"{key}@{j}"], confidence)
        return Estimate(value=value, ci_low=lo, ci_high=hi, n=n)

    nq = int(qrows.size)
    metrics = []
    for j, k in enumerate(ks_t):
        n_short = int(np.count_nonzero(n_cand < k))
        warnings += diagnostics.short_queries(k, n_short, nq)
        report = classification_report(true, mv_pred[j], enc.classes)
        metrics.append(
            KMetrics(
                k=k,
                acc_at_k=estimate("acc_at_k", j, nq),
                mv_accuracy=estimate("mv_accuracy", j, nq),
                mv_macro_f1=estimate("mv_macro_f1", j, nq),
                mv_weighted_f1=report.weighted_f1,
                map_at_k=estimate("map_at_k", j, int(np.count_nonzero(has_rel))),
                n_queries_short=n_short,
                classification=report,
            )
        )

    return RetrievalResult(
        name=name,
        protocol=protocol,
        ks=list(ks_t),
        classes=enc.classes,
        n_rows=int(enc.vectors.shape[0]),
        n_queries=nq,
        n_candidates=int(enc.candidate_rows.size),
        n_unlabelled=enc.n_unlabelled,
        n_queries_without_candidates=n_without,
        n_queries_without_relevant=n_without_rel,
        n_groups=n_units if enc.grouped else None,
        bootstrap_unit=unit,
        bootstrap_resamples=bootstrap,
        seed=seed,
        confidence=confidence,
        metrics=metrics,
        warnings=warnings,
        per_query=pq,
    )
