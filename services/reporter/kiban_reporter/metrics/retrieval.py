"""Per-query retrieval outcomes from the ranked neighbour lists.

Everything here is a per-query vector (hit@k, MV@k prediction, AP@k) so that point estimates,
bootstrap resamples and paired comparisons are all cheap reductions of the same arrays.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray


def relevant_counts(
    label_codes: NDArray[np.int64],
    group_codes: NDArray[np.int64],
    query_rows: NDArray[np.int64],
    candidate_rows: NDArray[np.int64],
) -> NDArray[np.int64]:
    """R per query: candidates with the query's label, minus those in the query's group.

    Leave-one-out is the case group == row, so "minus the same group" removes the query itself
    when it is a candidate. Computed from (group, label) pair counts, never from similarities.
    """
    ql = label_codes[query_rows]
    if candidate_rows.size == 0 or query_rows.size == 0:
        return np.zeros(query_rows.size, dtype=np.int64)
    n_labels = int(label_codes.max()) + 1
    cl = label_codes[candidate_rows]
    per_label = np.bincount(cl, minlength=n_labels)
    pairs = group_codes[candidate_rows] * n_labels + cl
    uniq, cnt = np.unique(pairs, return_counts=True)
    qpairs = group_codes[query_rows] * n_labels + ql
    pos = np.minimum(np.searchsorted(uniq, qpairs), uniq.size - 1)
    same_group = np.where(uniq[pos] == qpairs, cnt[pos], 0)
    return (per_label[ql] - same_group).astype(np.int64)


def neighbour_labels(label_codes: NDArray[np.int64], indices: NDArray[np.int64]) -> NDArray:
    """Label codes of the ranked neighbours; ``-1`` where there is no neighbour."""
    return np.where(indices >= 0, label_codes[np.where(indices >= 0, indices, 0)], -1)


def hits_at(nbr: NDArray[np.int64], true: NDArray[np.int64], k: int) -> NDArray[np.bool_]:
    """acc@k correctness: at least one of the top-k neighbours has the query's label."""
    return np.any(nbr[:, :k] == true[:, None], axis=1)


def majority_vote(nbr: NDArray[np.int64], k: int) -> NDArray[np.int64]:
    """MV@k prediction per query; ``-1`` if the query has no neighbour at all.

    Each position j gets the count of its label among the top k; ``argmax`` returns the first
    position with the highest count, i.e. the tied label that appears first in the ranking —
    exactly the tie rule. Padding (-1) gets count -1 so it never wins.
    """
    top = nbr[:, :k]
    counts = np.empty(top.shape, dtype=np.int64)
    for j in range(top.shape[1]):
        counts[:, j] = np.count_nonzero(top == top[:, j : j + 1], axis=1)
    counts[top < 0] = -1
    if top.shape[1] == 0:
        return np.full(top.shape[0], -1, dtype=np.int64)
    best = np.argmax(counts, axis=1)
    return top[np.arange(top.shape[0]), best]


def average_precision_at(
    nbr: NDArray[np.int64], true: NDArray[np.int64], n_relevant: NDArray[np.int64], k: int
) -> NDArray[np.float64]:
    """AP@k = (1/min(k, R)) * sum_{i<=k} P@i * rel_i; 0 where R == 0 (caller excludes those)."""
    rel = nbr[:, :k] == true[:, None]
    hits_so_far = np.cumsum(rel, axis=1)
    ranks = np.arange(1, rel.shape[1] + 1)
    summed = np.sum(np.where(rel, hits_so_far / ranks, 0.0), axis=1)
    denom = np.minimum(k, n_relevant)
    return np.where(denom > 0, summed / np.maximum(denom, 1), 0.0)
