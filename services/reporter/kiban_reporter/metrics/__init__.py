"""Exact retrieval evaluation of image encoders (pure numpy/scipy, no I/O).

This package answers "does model A retrieve our images better than model B?" with the
image-search protocol of Alfasly et al. (leave-one-out / leave-one-group-out nearest-neighbour
retrieval, majority vote of the top-k as the prediction). Arrays in, typed results out.

Definitions
-----------
Inputs
    ``vectors``: L2-normalised float32 ``[N, D]``; rows sorted by image key ascending, so row
    index order == key order. ``labels``: ``N`` strings; a missing label (``None``, ``""``,
    NaN) makes the row neither a query nor a candidate (counted, warned). ``groups``: optional
    ``N`` strings (slide, patient, batch ...); ``None`` means leave-one-out.
    ``query_mask`` / ``candidate_mask``: optional boolean ``[N]`` selecting the queries and the
    searchable candidates (split and cross-batch protocols); default all-vs-all.
Candidates of query q
    Every candidate row except q itself and, when groups are given, except every row of q's
    group (leave-one-group-out). Queries with no candidate at all are excluded (counted).
Ranking
    Cosine similarity (dot product of the float32 vectors) descending; ties broken by key
    ascending, i.e. smaller row index first. Fully deterministic, exact (no ANN).
acc@k (hit rate)
    Share of queries with at least one of the top-k neighbours carrying the query's label.
MV@k
    The prediction is the most frequent label among the top-k neighbours; a tie between labels
    goes to the tied label appearing first in the ranking. A query with fewer than k candidates
    votes with what there is (counted, warned).
Classification scores of MV@k
    accuracy; per-class precision / recall / F1 / support; macro-F1 = mean per-class F1 over the
    classes present among the queries' true labels (sklearn ``f1_score(average="macro",
    labels=<classes in y_true>, zero_division=0)``); weighted-F1 (support-weighted); confusion
    matrix with rows = true label, columns = predicted label, over the sorted union of both.
mAP@k
    AP@k = (1 / min(k, R)) * sum_{i<=k} P@i * rel_i, with R the number of relevant candidates
    (same label, after the exclusions above). Queries with R = 0 are excluded (counted).
Bootstrap
    Percentile 95 % intervals from ``bootstrap`` resamples (default 1,000, seeded numpy
    Generator: identical numbers on re-runs). With groups the resampling unit is the group
    (cluster bootstrap: draw group ids with replacement, take all their queries), otherwise the
    query. Given for acc@k, MV@k accuracy, MV@k macro-F1 and mAP@k.
Paired comparison
    Two models on the same queries: difference of each headline metric with a paired bootstrap
    interval (the same resampled units for both) and an exact McNemar test on MV@k correctness
    (two-sided binomial test on the discordant pairs; p = 1 when there are none).
Undefined quantities
    Never NaN and never a crash: a warning string in ``RetrievalResult.warnings`` and ``None``
    in the value.

Scale: the search is exact and blocked — ``block_size x n_candidates`` similarities live at a
time, never ``N x N``. All-vs-all at 200,000 x 1,024 is 8e13 FLOP (about half an hour on two
cores); at that size evaluate a query sample (e.g. 2,000 queries against all 200,000
candidates) through ``query_mask``.
"""

from kiban_reporter.metrics.evaluate import evaluate
from kiban_reporter.metrics.knn import KnnResult, exact_knn
from kiban_reporter.metrics.paired import compare, mcnemar_exact, verdict_line
from kiban_reporter.metrics.results import (
    ClassificationReport,
    ClassMetrics,
    ConfusionMatrix,
    Estimate,
    KMetrics,
    MetricDifference,
    PairComparison,
    PerQuery,
    RetrievalResult,
)

__all__ = [
    "ClassMetrics",
    "ClassificationReport",
    "ConfusionMatrix",
    "Estimate",
    "KMetrics",
    "KnnResult",
    "MetricDifference",
    "PairComparison",
    "PerQuery",
    "RetrievalResult",
    "compare",
    "evaluate",
    "exact_knn",
    "mcnemar_exact",
    "verdict_line",
]
