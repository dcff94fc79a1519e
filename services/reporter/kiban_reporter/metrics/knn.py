"""Exact blocked k-nearest-neighbour search with exclusions and a deterministic tie rule.

Why blocked: all-vs-all similarities are ``N x N`` (160 GB at N = 200,000). We take a block
of queries at a time, ``sims = Q_block @ C.T`` (one float32 BLAS matmul, the only O(N*D) work
per query), blank out the excluded candidates with ``-inf`` and keep the top K. Peak memory is
about ``block_size x n_candidates x 5`` bytes (the float32 block, a boolean mask) plus the
candidate matrix.

Exclusions: a query never sees itself and, with groups, never a row of its own group. Leave-one-
out is the special case "every row is its own group", so one rule covers both. Candidates are
pre-sorted by group, so a query's excluded columns are one contiguous slice of that order; the
block's excluded (row, column) pairs are built with vectorised index arithmetic in
O(block x group size) instead of comparing group codes over the whole ``block x N`` matrix (that
dense comparison is the fallback when groups are huge).

Top K without a full sort, exactly: for each row we find a lower bound ``L`` of the K-th largest
similarity — the K-th largest of the maxima of ``S`` disjoint column subsets (a K-th largest of
K values that all exist in the row can only be below the row's own K-th largest). Every
element ``>= L`` is gathered (typically ~K per row), sorted by (-similarity, row index) and the
first K kept. Because *all* elements tied at the boundary are gathered, the tie rule "smaller key
first" holds exactly, where ``np.argpartition`` would cut ties arbitrarily. If heavy ties make the
gathered set large, an exact-threshold path (``np.partition`` + first-by-index among ties) keeps
memory bounded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

_FLT_LOWEST = np.float32(np.finfo(np.float32).min)
_MAX_FOLD = 64  # columns per subset when computing the lower bound
_SUBSETS_PER_K = 16  # at least 16*K subsets: the bound then lets ~K elements per row through


@dataclass(frozen=True)
class KnnResult:
    """Top-K neighbours of each query, ranked by (similarity desc, row index asc).

    ``indices`` are global row indices (``-1`` where a query has fewer than K candidates),
    ``sims`` the float32 similarities (``-inf`` padding), ``n_candidates`` the number of
    candidates each query was ranked against (after exclusions).
    """

    query_rows: NDArray[np.int64]
    indices: NDArray[np.int64]
    sims: NDArray[np.float32]
    n_candidates: NDArray[np.int64]


def _nonzero_2d(mask: NDArray[np.bool_]) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """``np.nonzero`` for a sparse C-contiguous boolean matrix, 8 bytes at a time.

    Scanning uint64 words first is ~8x less work than ``np.nonzero`` on a mask where only ~K of
    ``n_candidates`` entries per row are set. Output is in row-major order like ``np.nonzero``.
    """
    ncols = mask.shape[1]
    flat = np.ascontiguousarray(mask).reshape(-1)
    n8 = flat.size // 8
    parts = []
    if n8:
        words = np.flatnonzero(flat[: n8 * 8].view(np.uint64))
        if words.size:
            pos = (words[:, None] * 8 + np.arange(8)).reshape(-1)
            parts.append(pos[flat[pos]])
    tail = np.flatnonzero(flat[n8 * 8 :])
    if tail.size:
        parts.append(tail + n8 * 8)
    pos = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
    return np.divmod(pos.astype(np.int64), ncols)


def _lower_bound(sims: NDArray[np.float32], k: int) -> NDArray[np.float32]:
    """Per row, a value <= the k-th largest element (exact when the row is short)."""
    nb, nc = sims.shape
    if k >= nc:
        return np.full(nb, _FLT_LOWEST, dtype=np.float32)
    fold = max(1, min(_MAX_FOLD, nc // (_SUBSETS_PER_K * k)))
    n_sub = nc // fold
    if fold == 1:
        maxima = sims
    else:  # maxima of the strided subsets {j, j + n_sub, j + 2 n_sub, ...}: views, no copy
        maxima = sims[:, :n_sub].copy()
        for j in range(1, fold):
            np.maximum(maxima, sims[:, j * n_sub : (j + 1) * n_sub], out=maxima)
    bound = np.partition(maxima, n_sub - k, axis=1)[:, n_sub - k]
    # -inf means "fewer than k usable columns": then every finite column qualifies.
    return np.maximum(bound, _FLT_LOWEST)


def _exact_selection(sims: NDArray[np.float32], k: int) -> NDArray[np.bool_]:
    """Exactly the top-k set per row (ties at the boundary resolved by column index)."""
    nc = sims.shape[1]
    if k >= nc:
        return sims >= _FLT_LOWEST
    kth = np.partition(sims, nc - k, axis=1)[:, nc - k]
    kth = np.maximum(kth, _FLT_LOWEST)[:, None]
    greater = sims > kth
    need = k - np.count_nonzero(greater, axis=1)
    equal = sims == kth
    first_equal = equal & (np.cumsum(equal, axis=1, dtype=np.int32) <= need[:, None])
    return greater | first_equal


def topk_block(sims: NDArray[np.float32], k: int) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
    """Top-k columns of each row by (value desc, column asc); ``-1`` / ``-inf`` padded.

    ``-inf`` entries are treated as excluded and never returned.
    """
    nb = sims.shape[0]
    out_cols = np.full((nb, k), -1, dtype=np.int64)
    out_vals = np.full((nb, k), -np.inf, dtype=np.float32)
    if nb == 0 or k == 0 or sims.shape[1] == 0:
        return out_cols, out_vals
    mask = sims >= _lower_bound(sims, k)[:, None]
    if np.count_nonzero(mask) > 4 * nb * k + 256:  # massive ties: bound is too loose
        mask = _exact_selection(sims, k)
    rows, cols = _nonzero_2d(mask)
    vals = sims[rows, cols]
    order = np.lexsort((cols, -vals, rows))
    rows, cols, vals = rows[order], cols[order], vals[order]
    counts = np.bincount(rows, minlength=nb)
    starts = np.cumsum(counts) - counts
    rank = np.arange(rows.size) - starts[rows]
    keep = rank < k
    out_cols[rows[keep], rank[keep]] = cols[keep]
    out_vals[rows[keep], rank[keep]] = vals[keep]
    return out_cols, out_vals


class _GroupIndex:
    """Candidates sorted by group so that "same group as q" is a contiguous slice."""

    def __init__(self, cand_groups: NDArray[np.int64], dense_fraction: float = 0.125) -> None:
        self.order = np.argsort(cand_groups, kind="stable")
        self.sorted_groups = cand_groups[self.order]
        self.cand_groups = cand_groups
        self.dense_fraction = dense_fraction

    def sizes(self, query_groups: NDArray[np.int64]) -> tuple[NDArray, NDArray]:
        lo = np.searchsorted(self.sorted_groups, query_groups, side="left")
        hi = np.searchsorted(self.sorted_groups, query_groups, side="right")
        return lo, hi - lo

    def exclude(self, sims: NDArray[np.float32], query_groups: NDArray[np.int64]) -> None:
        """Set every same-group candidate of each block row to ``-inf`` (in place)."""
        lo, lens = self.sizes(query_groups)
        total = int(lens.sum())
        if total == 0:
            return
        nb, nc = sims.shape
        if total > self.dense_fraction * nb * nc:
            mask = self.cand_groups[None, :] == query_groups[:, None]
            sims[mask] = -np.inf
            return
        rows = np.repeat(np.arange(nb), lens)
        seg_start = np.cumsum(lens) - lens
        offsets = np.arange(total) - np.repeat(seg_start, lens)
        cols = self.order[np.repeat(lo, lens) + offsets]
        sims[rows, cols] = -np.inf


def exact_knn(
    vectors: ArrayLike,
    k: int,
    query_rows: ArrayLike | None = None,
    candidate_rows: ArrayLike | None = None,
    group_codes: ArrayLike | None = None,
    block_size: int = 1024,
) -> KnnResult:
    """Exact top-``k`` neighbours of ``query_rows`` among ``candidate_rows``.

    Args:
        vectors: ``[N, D]`` float32 (converted once if not).
        k: neighbours to keep per query.
        query_rows / candidate_rows: ascending row indices; default all rows.
        group_codes: integer group per row (``N``); ``None`` = leave-one-out (self excluded).
        block_size: queries per matmul block; bounds memory to ``block_size x n_candidates``.
    """
    vec = np.ascontiguousarray(vectors, dtype=np.float32)
    n = vec.shape[0]
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    qrows = np.arange(n) if query_rows is None else np.asarray(query_rows, dtype=np.int64)
    crows = np.arange(n) if candidate_rows is None else np.asarray(candidate_rows, dtype=np.int64)
    if crows.size > 1 and np.any(np.diff(crows) <= 0):
        raise ValueError("candidate_rows must be strictly ascending (key order is the tie rule)")
    groups = np.arange(n) if group_codes is None else np.asarray(group_codes, dtype=np.int64)
    if groups.shape != (n,):
        raise ValueError(f"group_codes must have shape ({n},), got {groups.shape}")

    all_candidates = crows.size == n
    cand = vec if all_candidates else vec[crows]
    index = _GroupIndex(groups[crows])
    qgroups = groups[qrows]
    _, excluded = index.sizes(qgroups)
    n_candidates = (crows.size - excluded).astype(np.int64)

    nq = qrows.size
    indices = np.full((nq, k), -1, dtype=np.int64)
    sims_out = np.full((nq, k), -np.inf, dtype=np.float32)
    if nq == 0 or crows.size == 0:
        return KnnResult(qrows, indices, sims_out, n_candidates)
    buffer = np.empty((min(block_size, nq), crows.size), dtype=np.float32)
    for start in range(0, nq, block_size):
        stop = min(start + block_size, nq)
        sims = buffer[: stop - start]
        np.matmul(vec[qrows[start:stop]], cand.T, out=sims)
        index.exclude(sims, qgroups[start:stop])
        cols, vals = topk_block(sims, k)
        valid = cols >= 0
        block_idx = np.where(valid, crows[np.where(valid, cols, 0)], -1)
        indices[start:stop] = block_idx
        sims_out[start:stop] = vals
    return KnnResult(qrows, indices, sims_out, n_candidates)
