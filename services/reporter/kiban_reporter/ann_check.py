"""The served index, checked: Qdrant's top-k against the exact top-k of the evaluation.

The evaluation is exact (``kiban_reporter.metrics``); production search goes through Qdrant,
which on a server is an approximate HNSW index. For a seeded sample of the evaluated queries
we ask Qdrant for the top k among the *same candidates* the exact search ranked and report
recall@k and the query latency, next to the collection's index settings.

Same candidates: the query is sent with a payload filter on the batches in scope (this batch,
or the history batches for cross-batch) and Qdrant is asked for more than k results; hits that
are not candidates of this query (the query itself, its group, the other side of a split, an
image that is not a candidate) are dropped, and the limit doubles until k candidates remain or
the scope is exhausted. When a candidate image's point carries another batch in its payload
(the same image indexed again by a later batch: one point per image), the batch filter is
dropped and the over-fetch covers the whole collection.

recall@k of one query = (served hits that are exact top-k, or whose exact similarity is within
``TIE_TOLERANCE`` of the k-th exact similarity) / min(k, number of candidates). Ties and float
rounding at the k-th place therefore do not count as misses. Latency is the wall time of the
Qdrant calls of one query (the over-fetch included), in milliseconds.

Nothing here can fail the evaluation: any error becomes ``status="failed"`` with its reason.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, Field

from kiban_reporter.metrics import RetrievalResult
from kiban_reporter.protocols import EvalRow, ProtocolPlan

TIE_TOLERANCE = 1e-5
MATCH_RULE = (
    "a served hit counts when it is in the exact top-k or its exact cosine similarity is within "
    f"{TIE_TOLERANCE:g} of the k-th exact similarity; recall@k = counted hits / min(k, candidates)"
)


class AnnCheck(BaseModel):
    """Qdrant vs exact top-k for one model (report schema v2, ``models[i].ann_check``)."""

    status: Literal["ok", "skipped", "failed"]
    reason: str | None = None
    k: int
    n_queries: int = Field(0, description="sampled queries compared")
    seed: int
    recall_at_k: float | None = Field(None, description="mean over the sampled queries")
    recall_min: float | None = None
    n_queries_full_recall: int = 0
    latency_ms_p50: float | None = None
    latency_ms_p95: float | None = None
    latency_ms_mean: float | None = None
    qdrant_calls_per_query: float | None = None
    scope: str | None = Field(None, description="what the Qdrant query was restricted to")
    n_candidates_not_indexed: int | None = Field(
        None, description="candidate images without a point in the collection"
    )
    match_rule: str = MATCH_RULE
    index: dict[str, Any] | None = Field(
        None, description="collection settings: mode, index (hnsw m / ef_construct), points"
    )


def _sample(n_total: int, n: int, seed: int) -> NDArray[np.int64]:
    if n >= n_total:
        return np.arange(n_total, dtype=np.int64)
    rng = np.random.default_rng([seed, 0xA11])
    return np.sort(rng.choice(n_total, size=n, replace=False)).astype(np.int64)


def ann_check(
    open_index: Callable[[], Any],
    model: str,
    rows: Sequence[EvalRow],
    vectors: NDArray[np.float32],
    result: RetrievalResult,
    plan: ProtocolPlan,
    scope_batches: Sequence[str],
    k: int,
    n_queries: int,
    seed: int,
) -> AnnCheck:
    """Compare Qdrant with the exact top-``k`` on a seeded sample of ``n_queries`` queries.

    ``open_index`` returns a ``kiban.vectors.VectorIndex`` (called here, so that an unreachable
    Qdrant is a reported failure, not a crash).
    """
    base: dict[str, Any] = {"k": k, "seed": seed}
    if n_queries == 0:
        return AnnCheck(status="skipped", reason="ann_check_queries = 0", **base)
    pq = result.per_query
    if pq is None or pq.query_rows.size == 0:
        return AnnCheck(status="skipped", reason="no evaluated queries", **base)
    if k not in pq.ks:
        return AnnCheck(status="skipped", reason=f"k={k} was not evaluated", **base)
    try:
        return _check(
            open_index, model, rows, vectors, result, plan, scope_batches, k, n_queries, seed
        )
    except Exception as exc:  # Qdrant down, collection missing, ...: reported, never raised
        return AnnCheck(status="failed", reason=f"{type(exc).__name__}: {exc}"[:500], **base)


def _check(
    open_index: Callable[[], Any],
    model: str,
    rows: Sequence[EvalRow],
    vectors: NDArray[np.float32],
    result: RetrievalResult,
    plan: ProtocolPlan,
    scope_batches: Sequence[str],
    k: int,
    n_queries: int,
    seed: int,
) -> AnnCheck:
    pq = result.per_query
    assert pq is not None
    index = open_index()
    settings = index.collection_settings(model)
    if settings is None:
        return AnnCheck(
            status="skipped",
            reason=f"collection for {model} does not exist (batch not indexed?)",
            k=k,
            seed=seed,
        )
    labelled = np.fromiter((r.labelled for r in rows), dtype=bool, count=len(rows))
    cand_rows = np.flatnonzero(plan.candidate_mask & labelled)
    sha_to_row = {rows[int(i)].sha256: int(i) for i in cand_rows}
    payload = index.payload_batches(model, list(sha_to_row))
    not_indexed = len(sha_to_row) - len(payload)
    scope = set(scope_batches)
    elsewhere = sum(1 for b in payload.values() if b not in scope)
    if elsewhere:
        batches: list[str] | None = None
        n_scope = int(settings.get("points_count") or 0)
        scope_text = (
            f"whole collection ({elsewhere} candidate images carry a later batch in their "
            "payload), over-fetch and filter to the candidates"
        )
    else:
        batches = sorted(scope)
        n_scope = sum(index.count(model, b) for b in batches)
        scope_text = f"payload batch in {batches}, over-fetch and filter to the candidates"
    n_scope = max(n_scope, len(sha_to_row), 1)
    allowed_share = max(len(sha_to_row) / n_scope, 1e-9)

    codes = plan.group_codes()
    picked = _sample(pq.query_rows.size, n_queries, seed)
    recalls: list[float] = []
    latencies: list[float] = []
    calls = 0
    for j in picked:
        q = int(pq.query_rows[j])
        n_allowed = int(pq.n_candidates[j])
        need = min(k, n_allowed)
        if need == 0:
            continue
        exact = [int(r) for r in pq.indices[j][:need] if r >= 0]
        kth = float(pq.sims[j][need - 1])
        excluded = len(sha_to_row) - n_allowed
        limit = min(n_scope, math.ceil((need + excluded) / allowed_share) + 8)
        spent = 0.0
        while True:
            t0 = time.perf_counter()
            hits = index.search_filtered(model, vectors[q], limit, batches)
            spent += time.perf_counter() - t0
            calls += 1
            served = []
            for sha, _score in hits:
                r = sha_to_row.get(sha)
                if r is None or r == q or codes[r] == codes[q]:
                    continue
                served.append(r)
                if len(served) == need:
                    break
            if len(served) >= need or len(hits) < limit or limit >= n_scope:
                break
            limit = min(n_scope, limit * 2)
        exact_set = set(exact)
        qv = vectors[q]
        good = sum(
            1 for r in served if r in exact_set or float(qv @ vectors[r]) >= kth - TIE_TOLERANCE
        )
        recalls.append(good / need)
        latencies.append(spent * 1000.0)
    if not recalls:
        return AnnCheck(status="skipped", reason="no sampled query has a candidate", k=k, seed=seed)
    rec = np.asarray(recalls)
    lat = np.asarray(latencies)
    return AnnCheck(
        status="ok",
        k=k,
        n_queries=int(rec.size),
        seed=seed,
        recall_at_k=float(rec.mean()),
        recall_min=float(rec.min()),
        n_queries_full_recall=int(np.count_nonzero(rec >= 1.0)),
        latency_ms_p50=float(np.percentile(lat, 50)),
        latency_ms_p95=float(np.percentile(lat, 95)),
        latency_ms_mean=float(lat.mean()),
        qdrant_calls_per_query=calls / rec.size,
        scope=scope_text,
        n_candidates_not_indexed=not_indexed,
        index=settings,
    )
