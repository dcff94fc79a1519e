"""Exact blocked k-nearest-neighbour search with exclusions and a deterministic tie rule.

Why blocked: all-vs-all similarities are ``N x N`` (160 GB at N = 200,000). We take a block
of queries at a time, ``sims = Q_block @ C.T`` (one float32 BLAS matmul, the only O(N*D) work
per query), blank out the excluded candidates with ``-inf`` and keep the top K. Peak memory is
at most about ``block_size x n_candidates x 5`` bytes (the float32 block; a boolean mask only
on the heavy-ties path) plus the candidate matrix.

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
memory bounded. The gather reads only the subsets whose maximum reaches ``L`` (typically K of
them per row, plus the few tail columns no subset covers), so after the matmul the block is
read once (for the maxima), not three times (maxima, ``>= L`` mask, mask scan).

Threads: the matmul is ~95 % of the CPU time (1,024 dims, 50,000 candidates, k = 5), the
selection the rest, and numpy's selection runs on one core. So the work is cut into tiles
(a query block x a chunk of candidates, see ``_tiles``) that form a work queue for one worker
per usable core (``os.sched_getaffinity``); each runs a one-thread BLAS matmul and its own
selection in its own buffer (numpy releases the GIL in both), so the cores stay busy through
the selection, and a core taken by another process only slows its own worker (a
multi-threaded BLAS waits for its slowest thread at every step). A chunk's top-k by (value
desc, column asc) contains every element of the row's top-k that lies in the chunk, so merging
the chunks' lists by that order is exact, and every query row depends only on its own
similarities: results are identical to the one-thread path bit for bit. While the workers
run, BLAS is held at one thread process-wide (threadpoolctl), then restored; two concurrent
calls may then restore it early (slower, never wrong). Small problems run on the caller's
thread.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

_FLT_LOWEST = np.float32(np.finfo(np.float32).min)
_MAX_FOLD = 64  # columns per subset when computing the lower bound
_SUBSETS_PER_K = 16  # at least 16*K subsets: the bound then lets ~K elements per row through
_FOLD_CHUNK_BYTES = 256 * 1024  # rows of maxima folded at a time: stay in the core's L2 cache
_MIN_CHUNK = 8192  # candidates per tile at least, where memory allows (matmul efficiency)
_MIN_THREADED_WORK = 64 * 2**20  # multiply-adds (queries x candidates x dim) worth a thread pool


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


def _fold(nc: int, k: int) -> int:
    """Columns per subset for the lower bound (1 = no folding: the row is short)."""
    return max(1, min(_MAX_FOLD, nc // (_SUBSETS_PER_K * k)))


def _fold_maxima(sims: NDArray[np.float32], fold: int) -> NDArray[np.float32]:
    """Per row, maxima of the strided subsets ``{j, j + n_sub, j + 2 n_sub, ...}``.

    Row chunks small enough that the chunk of maxima stays in L2 while ``fold`` slices are
    folded into it: one streaming read of the block, no copy of it.
    """
    nb, nc = sims.shape
    n_sub = nc // fold
    maxima = np.empty((nb, n_sub), dtype=np.float32)
    step = max(1, _FOLD_CHUNK_BYTES // (4 * n_sub))
    for r0 in range(0, nb, step):
        r1 = min(nb, r0 + step)
        m = maxima[r0:r1]
        np.copyto(m, sims[r0:r1, :n_sub])
        for j in range(1, fold):
            np.maximum(m, sims[r0:r1, j * n_sub : (j + 1) * n_sub], out=m)
    return maxima


def _kth_largest(values: NDArray[np.float32], k: int) -> NDArray[np.float32]:
    """Per row, the k-th largest value, raised to the lowest finite float32.

    ``-inf`` would mean "fewer than k usable columns": then every finite column qualifies,
    and excluded (``-inf``) columns never do.
    """
    n = values.shape[1]
    return np.maximum(np.partition(values, n - k, axis=1)[:, n - k], _FLT_LOWEST)


def _lower_bound(sims: NDArray[np.float32], k: int) -> NDArray[np.float32]:
    """Per row, a value <= the k-th largest element (exact when the row is short)."""
    nb, nc = sims.shape
    if k >= nc:
        return np.full(nb, _FLT_LOWEST, dtype=np.float32)
    fold = _fold(nc, k)
    return _kth_largest(sims if fold == 1 else _fold_maxima(sims, fold), k)


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


def _gather_by_mask(
    sims: NDArray[np.float32], k: int, bound: NDArray[np.float32]
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """(row, column) of every element ``>= bound`` of its row, or of the exact top-k set."""
    nb = sims.shape[0]
    mask = sims >= bound[:, None]
    if np.count_nonzero(mask) > 4 * nb * k + 256:  # massive ties: bound is too loose
        mask = _exact_selection(sims, k)
    return _nonzero_2d(mask)


def _gather_by_subsets(
    sims: NDArray[np.float32],
    k: int,
    fold: int,
    maxima: NDArray[np.float32],
    bound: NDArray[np.float32],
) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.float32]] | None:
    """(row, column, value) of every element ``>= bound`` (the fold lower bound), reading only
    the subsets whose maximum reaches it and the tail columns; ``None`` when too many subsets
    qualify (heavy ties). ``sims`` must be C-contiguous (gathered through flat positions).

    Exactly the set the full ``sims >= bound`` mask gives: an element ``>= bound`` lies either
    in a subset whose maximum is ``>= bound`` or in the tail no subset covers.
    """
    nb, nc = sims.shape
    n_sub = maxima.shape[1]
    sub_rows, sub_cols = _nonzero_2d(maxima >= bound[:, None])
    if sub_rows.size > 4 * nb * k + 256:
        return None
    steps = n_sub * np.arange(fold, dtype=np.int64)
    pos = ((sub_rows * nc + sub_cols)[:, None] + steps).reshape(-1)
    pos_bound = np.repeat(bound[sub_rows], fold)
    tail = nc - fold * n_sub
    if tail:
        row_starts = np.arange(nb, dtype=np.int64)[:, None] * nc
        tail_pos = (row_starts + np.arange(fold * n_sub, nc, dtype=np.int64)).reshape(-1)
        pos = np.concatenate([pos, tail_pos])
        pos_bound = np.concatenate([pos_bound, np.repeat(bound, tail)])
    vals = sims.reshape(-1)[pos]
    keep = vals >= pos_bound
    rows, cols = np.divmod(pos[keep], nc)
    return rows, cols, vals[keep]


def topk_block(sims: NDArray[np.float32], k: int) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
    """Top-k columns of each row by (value desc, column asc); ``-1`` / ``-inf`` padded.

    ``-inf`` entries are treated as excluded and never returned.
    """
    nb = sims.shape[0]
    out_cols = np.full((nb, k), -1, dtype=np.int64)
    out_vals = np.full((nb, k), -np.inf, dtype=np.float32)
    if nb == 0 or k == 0 or sims.shape[1] == 0:
        return out_cols, out_vals
    # Whichever way the candidates are gathered, the set contains every element of the exact
    # top-k (ties at the boundary included), so the sort below gives the same answer.
    nc = sims.shape[1]
    fold = _fold(nc, k) if k < nc else 1
    found = None
    if fold > 1:
        sims = np.ascontiguousarray(sims)  # a no-op for exact_knn's blocks
        maxima = _fold_maxima(sims, fold)
        bound = _kth_largest(maxima, k)
        found = _gather_by_subsets(sims, k, fold, maxima, bound)
    else:
        bound = _lower_bound(sims, k)
    if found is None:
        rows, cols = _gather_by_mask(sims, k, bound)
        vals = sims[rows, cols]
    else:
        rows, cols, vals = found
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

    def exclude(
        self, sims: NDArray[np.float32], query_groups: NDArray[np.int64], col_start: int = 0
    ) -> None:
        """Set every same-group candidate of each block row to ``-inf`` (in place).

        ``sims`` holds the candidate columns ``[col_start, col_start + sims.shape[1])``.
        """
        lo, lens = self.sizes(query_groups)
        total = int(lens.sum())
        if total == 0:
            return
        nb, width = sims.shape
        col_stop = col_start + width
        if total > self.dense_fraction * nb * self.cand_groups.size:
            tile_groups = self.cand_groups[None, col_start:col_stop]
            sims[tile_groups == query_groups[:, None]] = -np.inf
            return
        rows = np.repeat(np.arange(nb), lens)
        seg_start = np.cumsum(lens) - lens
        offsets = np.arange(total) - np.repeat(seg_start, lens)
        cols = self.order[np.repeat(lo, lens) + offsets]
        if col_start or col_stop < self.cand_groups.size:
            inside = (cols >= col_start) & (cols < col_stop)
            rows, cols = rows[inside], cols[inside] - col_start
        sims[rows, cols] = -np.inf


def usable_threads() -> int:
    """Cores this process may run on (its CPU affinity, e.g. a container's cpuset)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


_blas_lock = threading.Lock()
_blas_controller: Any = None  # threadpoolctl.ThreadpoolController, made on first use


def _one_blas_thread() -> AbstractContextManager[object]:
    """Hold numpy's BLAS at one thread (process-wide) while the workers run, then restore.

    threadpoolctl finds the BLAS numpy loaded (OpenBLAS, MKL, ...); its library scan is done
    once. Without threadpoolctl the workers still run, each matmul then using BLAS's own
    threads (slower, never wrong).
    """
    global _blas_controller
    with _blas_lock:
        if _blas_controller is None:
            try:
                from threadpoolctl import ThreadpoolController
            except ImportError:
                return nullcontext()
            _blas_controller = ThreadpoolController()
    limiter: AbstractContextManager[object] = _blas_controller.limit(limits=1, user_api="blas")
    return limiter


_NO_COLUMN = np.iinfo(np.int64).max  # sorts padding after every real column


def _merge_parts(
    cols: NDArray[np.int64], vals: NDArray[np.float32], k: int
) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
    """Per row, the first ``k`` of several ranked lists by (value desc, column asc).

    Exact: every element of a row's top-k is in the top-k of its own column chunk.
    """
    key = np.where(cols < 0, _NO_COLUMN, cols)
    order = np.lexsort((key, -vals), axis=1)[:, :k]
    return np.take_along_axis(cols, order, axis=1), np.take_along_axis(vals, order, axis=1)


def _tiles(n_queries: int, n_cand: int, block_size: int, threads: int) -> tuple[int, int]:
    """(queries, candidates) per tile.

    One thread: ``block_size`` queries against every candidate. Several: the buffers of all
    workers together stay within ``block_size x n_candidates`` floats, and there are ~8 tiles
    per worker (a worker slowed by another process then delays only its last, small tile).
    With many candidates a tile keeps ``block_size`` queries and takes a chunk of the
    candidates: a one-thread matmul costs ~10 % more per query at 256 query rows than at
    1,024 (the candidates are repacked on every call), while a chunk of >= ``_MIN_CHUNK``
    candidates costs nothing measurable. With few candidates the queries are split instead.
    """
    q_unit = min(block_size, n_queries)
    if threads <= 1:
        return q_unit, n_cand
    if n_cand < threads * _MIN_CHUNK:
        return max(1, min(block_size // threads, -(-n_queries // threads))), n_cand
    n_blocks = -(-n_queries // q_unit)
    n_chunks = max(-(-8 * threads // n_blocks), threads)  # threads x chunk <= n_cand
    n_chunks = max(threads, min(n_chunks, n_cand // _MIN_CHUNK))
    return q_unit, -(-n_cand // n_chunks)


class _Blocks:
    """Tiles of queries x candidate chunks, a work queue for the workers, and the per-block
    merge of chunk results done by whichever worker finishes a block's last chunk."""

    def __init__(self, n_queries: int, n_cand: int, q_unit: int, c_unit: int, k: int) -> None:
        self.k = k
        self.n_chunks = -(-n_cand // c_unit)
        self.queue = iter(
            [(q0, c) for q0 in range(0, n_queries, q_unit) for c in range(self.n_chunks)]
        )
        self.lock = threading.Lock()
        self.parts: dict[int, tuple[NDArray[np.int64], NDArray[np.float32], list[int]]] = {}

    def next(self) -> tuple[int, int] | None:
        with self.lock:
            return next(self.queue, None)

    def add(
        self, q0: int, chunk: int, cols: NDArray[np.int64], vals: NDArray[np.float32]
    ) -> tuple[NDArray[np.int64], NDArray[np.float32]] | None:
        """Record one chunk's top-k; the block's merged top-k once all its chunks are in."""
        if self.n_chunks == 1:
            return cols, vals
        nb, k = cols.shape
        with self.lock:
            if q0 not in self.parts:
                self.parts[q0] = (
                    np.empty((nb, self.n_chunks * k), dtype=np.int64),
                    np.empty((nb, self.n_chunks * k), dtype=np.float32),
                    [0],
                )
            all_cols, all_vals, done = self.parts[q0]
        all_cols[:, chunk * k : (chunk + 1) * k] = cols
        all_vals[:, chunk * k : (chunk + 1) * k] = vals
        with self.lock:
            done[0] += 1
            if done[0] < self.n_chunks:
                return None
            del self.parts[q0]
        return _merge_parts(all_cols, all_vals, self.k)


def _run_tiles(
    n_queries: int,
    n_cand: int,
    block_size: int,
    threads: int,
    k: int,
    tile: Callable[[int, int, int, int, NDArray[np.float32]], tuple],
    done: Callable[[int, int, NDArray[np.int64], NDArray[np.float32]], None],
) -> None:
    """Run ``tile(q0, q1, c0, c1, buffer) -> (cols, vals)`` over every tile and hand each query
    block's top-k (global candidate positions) to ``done(q0, q1, cols, vals)``.

    With ``threads > 1`` the tiles are a work queue for ``threads`` workers, each with its own
    buffer; all buffers together stay within ``block_size x n_cand`` float32.
    """
    q_unit, c_unit = _tiles(n_queries, n_cand, block_size, threads)
    blocks = _Blocks(n_queries, n_cand, q_unit, c_unit, k)
    n_tiles = -(-n_queries // q_unit) * blocks.n_chunks
    workers = min(threads, n_tiles)
    failed = threading.Event()

    def worker() -> None:
        buffer = np.empty(q_unit * c_unit, dtype=np.float32)
        while not failed.is_set():
            item = blocks.next()
            if item is None:
                return
            q0, chunk = item
            q1 = min(q0 + q_unit, n_queries)
            c0 = chunk * c_unit
            c1 = min(c0 + c_unit, n_cand)
            try:
                sims = buffer[: (q1 - q0) * (c1 - c0)].reshape(q1 - q0, c1 - c0)
                cols, vals = tile(q0, q1, c0, c1, sims)
                merged = blocks.add(q0, chunk, np.where(cols >= 0, cols + c0, -1), vals)
                if merged is not None:
                    done(q0, q1, *merged)
            except BaseException:
                failed.set()
                raise

    if workers <= 1:
        worker()
        return
    with _one_blas_thread(), ThreadPoolExecutor(workers, thread_name_prefix="knn") as pool:
        futures = [pool.submit(worker) for _ in range(workers)]
        for future in futures:
            future.result()


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
        block_size: queries per matmul block; bounds memory to ``block_size x n_candidates``
            floats (with several workers, for all of them together).

    Runs on every core this process may use (see the module docstring, "Threads").
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

    def tile(
        q0: int, q1: int, c0: int, c1: int, sims: NDArray[np.float32]
    ) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
        np.matmul(vec[qrows[q0:q1]], cand[c0:c1].T, out=sims)
        index.exclude(sims, qgroups[q0:q1], c0)
        return topk_block(sims, k)

    def done(q0: int, q1: int, cols: NDArray[np.int64], vals: NDArray[np.float32]) -> None:
        valid = cols >= 0
        indices[q0:q1] = np.where(valid, crows[np.where(valid, cols, 0)], -1)
        sims_out[q0:q1] = vals

    small = nq * crows.size * vec.shape[1] < _MIN_THREADED_WORK
    threads = 1 if small else usable_threads()
    _run_tiles(nq, crows.size, block_size, threads, k, tile, done)
    return KnnResult(qrows, indices, sims_out, n_candidates)
