"""The top-k kernel against a plain stable sort, on tie-heavy matrices with exclusions."""

from __future__ import annotations

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
