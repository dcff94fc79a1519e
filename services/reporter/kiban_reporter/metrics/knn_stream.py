"""Exact top-k of a fixed set of queries against an index read one shard at a time.

Why: at a million vectors x 512 dims a batch is 2 GB per model; holding it to run
``exact_knn`` all-vs-all does not fit a reporter worker. A sample of queries, though, can be
ranked against *every* candidate by streaming the candidates: for each shard, ``exact_knn``
ranks the queries against that shard's rows (same exclusions: the query's own row, its own
group), and the running top-k is merged with the shard's top-k.

Exactness: the global top-k by (similarity desc, global row asc) is contained in the union
of the per-shard top-k lists (an element beaten by k others inside its shard is beaten by
them globally), so merging per-shard lists by that same order gives exactly ``exact_knn`` on
the full matrix — indices, similarities and candidate counts — whatever the shard order.
Memory: the queries ``[Q, D]``, one shard, ``block_size x shard rows`` similarities, and
``Q x k`` running results; never the whole index.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

from kiban_reporter.metrics.knn import KnnResult, exact_knn

_NO_ROW = np.iinfo(np.int64).max  # sorts padding after every real row


def merge_topk(
    idx_a: NDArray[np.int64],
    sims_a: NDArray[np.float32],
    idx_b: NDArray[np.int64],
    sims_b: NDArray[np.float32],
    k: int,
) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
    """Per row, the first ``k`` of two ranked lists by (similarity desc, row asc).

    ``-1`` / ``-inf`` padding stays last. The lists must not share a row (each candidate is
    in one shard).
    """
    idx = np.concatenate([idx_a, idx_b], axis=1)
    sims = np.concatenate([sims_a, sims_b], axis=1)
    row_key = np.where(idx < 0, _NO_ROW, idx)
    order = np.lexsort((row_key, -sims), axis=1)[:, :k]
    return np.take_along_axis(idx, order, axis=1), np.take_along_axis(sims, order, axis=1)


class StreamedKnn:
    """Running exact top-``k`` of fixed queries, fed one shard of candidates at a time.

    Args:
        query_rows: the queries' global rows (their identity in the merged result).
        query_vectors: ``[Q, D]`` float32, aligned with ``query_rows``.
        query_groups: the queries' exclusion codes (the global row in leave-one-out, the
            group code otherwise) — same codes as the candidates' in ``add``.
        k: neighbours kept per query.
        block_size: queries per matmul block inside ``exact_knn``.
    """

    def __init__(
        self,
        query_rows: ArrayLike,
        query_vectors: ArrayLike,
        query_groups: ArrayLike,
        k: int,
        block_size: int = 1024,
    ) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.query_rows = np.asarray(query_rows, dtype=np.int64)
        self.query_vectors = np.ascontiguousarray(query_vectors, dtype=np.float32)
        self.query_groups = np.asarray(query_groups, dtype=np.int64)
        nq = self.query_rows.size
        if self.query_vectors.shape[0] != nq or self.query_groups.shape != (nq,):
            raise ValueError("query_rows, query_vectors and query_groups must be aligned")
        self.k = k
        self.block_size = block_size
        self.indices = np.full((nq, k), -1, dtype=np.int64)
        self.sims = np.full((nq, k), -np.inf, dtype=np.float32)
        self.n_candidates = np.zeros(nq, dtype=np.int64)
        self._last_row = -1

    def add(
        self, rows: ArrayLike, vectors: ArrayLike, groups: ArrayLike, candidate: ArrayLike
    ) -> None:
        """Rank the queries against one shard's candidate rows and merge.

        Args:
            rows: the shard's global rows, strictly ascending and above every earlier shard's
                (row order is the tie rule, so shards are fed in row order).
            vectors: ``[n, D]`` aligned with ``rows``.
            groups: the rows' exclusion codes.
            candidate: boolean ``[n]``: which rows are searchable.
        """
        rows = np.asarray(rows, dtype=np.int64)
        n = rows.size
        cand = np.asarray(candidate, dtype=bool)
        if n and (np.any(np.diff(rows) <= 0) or rows[0] <= self._last_row):
            raise ValueError("shards must be fed in ascending, non-overlapping row order")
        if n:
            self._last_row = int(rows[-1])
        nq = self.query_rows.size
        if nq == 0 or not cand.any():
            return
        shard = np.ascontiguousarray(vectors, dtype=np.float32)
        if shard.shape[0] != n or cand.shape != (n,):
            raise ValueError("rows, vectors and candidate must be aligned")
        # One matrix: the queries first, then the shard; only shard rows are candidates, so a
        # query never finds its own copy at the top, and its own row (same code) is excluded.
        combined = np.concatenate([self.query_vectors, shard])
        codes = np.concatenate([self.query_groups, np.asarray(groups, dtype=np.int64)])
        local = exact_knn(
            combined,
            self.k,
            query_rows=np.arange(nq),
            candidate_rows=nq + np.flatnonzero(cand),
            group_codes=codes,
            block_size=self.block_size,
        )
        found = local.indices >= 0
        shard_idx = np.where(found, rows[np.where(found, local.indices - nq, 0)], -1)
        self.indices, self.sims = merge_topk(self.indices, self.sims, shard_idx, local.sims, self.k)
        self.n_candidates += local.n_candidates

    def result(self) -> KnnResult:
        """The merged top-k, as ``exact_knn`` would return it on the whole matrix."""
        return KnnResult(self.query_rows, self.indices, self.sims, self.n_candidates)
