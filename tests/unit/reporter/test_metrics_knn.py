"""The top-k kernel against a plain stable sort, on tie-heavy matrices with exclusions."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from kiban_reporter.metrics.knn import exact_knn, topk_block


def _expected(sims: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    nb = sims.shape[0]
    cols = np.full((nb, k), -1)
    vals = np.full((nb, k), -np.inf, dtype=np.float32)
    for i, row in enumerate(sims):
        order = [c for c in np.lexsort((np.arange(row.size), -row)) if np.isfinite(row[c])][:k]
        cols[i, : len(order)] = order
        vals[i, : len(order)] = row[order]
    return cols, vals


@pytest.mark.parametrize("levels", [2, 5, 1000])
@pytest.mark.parametrize(("nb", "nc", "k"), [(9, 3000, 5), (4, 37, 10), (3, 6, 8), (5, 1, 1)])
def test_topk_block_matches_stable_sort(levels: int, nb: int, nc: int, k: int) -> None:
    rng = np.random.default_rng(levels * 1000 + nc)
    sims = (rng.integers(0, levels, size=(nb, nc)) / levels).astype(np.float32)
    sims[rng.random((nb, nc)) < 0.2] = -np.inf
    sims[0] = -np.inf  # a row with no candidate at all
    cols, vals = topk_block(sims.copy(), k)
    want_cols, want_vals = _expected(sims, k)
    assert cols.tolist() == want_cols.tolist()
    assert vals.tolist() == want_vals.tolist()


def test_exact_knn_rejects_bad_arguments() -> None:
    v = np.eye(3, dtype=np.float32)
    with pytest.raises(ValueError, match="k must be"):
        exact_knn(v, 0)
    with pytest.raises(ValueError, match="ascending"):
        exact_knn(v, 1, candidate_rows=[2, 0])


def test_block_size_does_not_change_results() -> None:
    rng = np.random.default_rng(0)
    v = (rng.integers(-1, 2, size=(301, 5)) * 0.5).astype(np.float32)
    groups = rng.integers(0, 30, size=301)
    ref = exact_knn(v, 7, group_codes=groups, block_size=301)
    for bs in (1, 8, 100, 1000):
        got = exact_knn(v, 7, group_codes=groups, block_size=bs)
        assert np.array_equal(got.indices, ref.indices)
        assert np.array_equal(got.sims, ref.sims)


def _brute_force(
    v: np.ndarray, k: int, qrows: np.ndarray, crows: np.ndarray, groups: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Reference: full similarity rows, same-group columns dropped, stable sort per row."""
    sims = (v[qrows] @ v[crows].T).astype(np.float32)
    sims[groups[qrows][:, None] == groups[crows][None, :]] = -np.inf
    cols, vals = _expected(sims, k)
    return np.where(cols >= 0, crows[np.maximum(cols, 0)], -1), vals


@pytest.fixture(scope="module")
def tie_heavy() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Vectors whose dot products are exact in float32 (multiples of 0.25 over 6 dims): rows
    tie all the time; groups of very different sizes, one of them huge (the dense exclusion
    path), and query/candidate subsets."""
    rng = np.random.default_rng(7)
    n = 2000
    v = (rng.integers(-2, 3, size=(n, 6)) * 0.5).astype(np.float32)
    groups = rng.integers(0, 300, size=n)
    groups[rng.random(n) < 0.3] = 999  # a group holding ~30 % of the rows
    qrows = np.flatnonzero(rng.random(n) < 0.6)
    crows = np.flatnonzero(rng.random(n) < 0.8)
    return v, groups, qrows, crows


_REFERENCE: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def tie_heavy_reference(
    data: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
) -> tuple[np.ndarray, np.ndarray]:
    """The brute-force top-9 of the tie-heavy case, computed once."""
    if id(data) not in _REFERENCE:
        v, groups, qrows, crows = data
        _REFERENCE[id(data)] = _brute_force(v, 9, qrows, crows, groups)
    return _REFERENCE[id(data)]


@pytest.mark.parametrize("block_size", [1, 7, 64, 1000, 5000])
@pytest.mark.parametrize("min_chunk", [97, 10**6])  # candidates cut into chunks / queries split
def test_threaded_path_equals_single_thread_bit_for_bit(
    monkeypatch: pytest.MonkeyPatch,
    tie_heavy: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    block_size: int,
    min_chunk: int,
) -> None:
    from kiban_reporter.metrics import knn

    v, groups, qrows, crows = tie_heavy
    monkeypatch.setattr(knn, "_MIN_THREADED_WORK", 0)  # thread even this small problem
    monkeypatch.setattr(knn, "_MIN_CHUNK", min_chunk)
    monkeypatch.setattr(knn, "usable_threads", lambda: 1)
    single = exact_knn(v, 9, qrows, crows, groups, block_size)

    worker_threads: set[str] = set()
    real_topk = knn.topk_block

    def recording_topk(sims: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        worker_threads.add(threading.current_thread().name)
        return real_topk(sims, k)

    monkeypatch.setattr(knn, "topk_block", recording_topk)
    monkeypatch.setattr(knn, "usable_threads", lambda: 3)
    threaded = exact_knn(v, 9, qrows, crows, groups, block_size)

    assert worker_threads and all(name.startswith("knn") for name in worker_threads)
    assert threaded.indices.tobytes() == single.indices.tobytes()
    assert threaded.sims.tobytes() == single.sims.tobytes()
    assert np.array_equal(threaded.n_candidates, single.n_candidates)
    assert np.array_equal(threaded.query_rows, single.query_rows)
    want_idx, want_sims = tie_heavy_reference(tie_heavy)
    assert threaded.indices.tolist() == want_idx.tolist()
    assert threaded.sims.tolist() == want_sims.tolist()


def test_threaded_path_restores_blas_threads(
    monkeypatch: pytest.MonkeyPatch,
    tie_heavy: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
) -> None:
    from threadpoolctl import threadpool_info

    from kiban_reporter.metrics import knn

    v, groups, qrows, crows = tie_heavy
    monkeypatch.setattr(knn, "_MIN_THREADED_WORK", 0)
    monkeypatch.setattr(knn, "usable_threads", lambda: 2)
    before = [lib["num_threads"] for lib in threadpool_info()]
    exact_knn(v, 3, qrows, crows, groups, 100)
    assert [lib["num_threads"] for lib in threadpool_info()] == before


@pytest.mark.parametrize(
    ("nq", "nc", "block_size", "threads"),
    [(4096, 50_000, 1024, 2), (10, 1_000_000, 1024, 8), (5000, 300, 64, 3), (3, 5, 1, 4)],
)
def test_tiles_keep_memory_within_block_size(
    nq: int, nc: int, block_size: int, threads: int
) -> None:
    from kiban_reporter.metrics.knn import _tiles

    q_unit, c_unit = _tiles(nq, nc, block_size, threads)
    assert 1 <= q_unit <= block_size and 1 <= c_unit <= nc
    # all workers' buffers together: block_size x n_candidates (+ one column each, rounding;
    # at least one query row per worker)
    assert threads * q_unit * c_unit <= max(block_size, threads) * (nc + threads)
    n_tiles = -(-nq // q_unit) * -(-nc // c_unit)
    assert n_tiles >= min(threads, nq)  # every worker has work


def test_topk_block_accepts_non_contiguous_views() -> None:
    rng = np.random.default_rng(3)
    full = (rng.integers(0, 50, size=(6, 8000)) / 50).astype(np.float32)
    view = full[::2, ::3]  # strided both ways: the subset gather needs a contiguous copy
    cols, vals = topk_block(view, 5)
    want_cols, want_vals = _expected(np.ascontiguousarray(view), 5)
    assert cols.tolist() == want_cols.tolist()
    assert vals.tolist() == want_vals.tolist()
