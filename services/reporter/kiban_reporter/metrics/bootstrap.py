"""Seeded percentile bootstrap of the headline metrics, vectorised.

Why this shape: every headline metric is a ratio of *sums over queries* — hits, correct votes,
AP values, and per-class support / predicted / true-positive counts for macro-F1. So we sum
those columns once per resampling unit (group, or query) into a ``[n_units, m]`` matrix ``A``.
A resample is a vector of how often each unit was drawn, ``w``; its sums are ``w @ A`` — one
matmul for a whole chunk of resamples — and the metrics follow from the sums with the same
formulas as the point estimate. No per-resample Python loop, no ``n_resamples x n_queries``
matrix.

Resampling: ``numpy.random.default_rng(seed).integers(0, n_units, size=(chunk, n_units))``
chunk by chunk (chunk size depends only on ``n_units``), so the same seed and units give the
same draws — re-runs give identical numbers and two models compared with the same seed see the
same resamples. Intervals are percentile intervals (``np.percentile``, linear interpolation)
over the resamples where the metric is defined.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from kiban_reporter.metrics.classification import macro_f1_from_counts
from kiban_reporter.metrics.results import PerQuery

MAX_WEIGHT_CELLS = 1 << 22  # resamples x units per chunk (32 MB of float64 weights)


def resampled_units(n_units: int, n_resamples: int, seed: int) -> Iterator[NDArray[np.int64]]:
    """Yield ``[chunk, n_units]`` arrays of drawn unit ids; the protocol every caller shares."""
    rng = np.random.default_rng(seed)
    chunk = max(1, MAX_WEIGHT_CELLS // max(n_units, 1))
    done = 0
    while done < n_resamples:
        b = min(chunk, n_resamples - done)
        yield rng.integers(0, n_units, size=(b, n_units))
        done += b


def unit_weights(draws: NDArray[np.int64], n_units: int) -> NDArray[np.float64]:
    """How often each unit was drawn, per resample: ``[chunk, n_units]``."""
    b = draws.shape[0]
    flat = (draws + (np.arange(b) * n_units)[:, None]).reshape(-1)
    return np.bincount(flat, minlength=b * n_units).reshape(b, n_units).astype(np.float64)


@dataclass(frozen=True)
class SumLayout:
    """Column positions in the per-unit sum matrix."""

    n_classes: int
    n_ks: int

    @property
    def width(self) -> int:
        return 2 + self.n_classes + self.n_ks * (3 + 2 * self.n_classes)

    # columns: [n, n_relevant_queries, support(C), then per k: hit, mv_correct, ap, tp(C), pred(C)]
    def k_base(self, j: int) -> int:
        return 2 + self.n_classes + j * (3 + 2 * self.n_classes)


def unit_sums(pq: PerQuery) -> tuple[NDArray[np.float64], SumLayout]:
    """Per-unit sums ``[n_units, width]`` of everything the headline metrics need."""
    n_classes = len(pq.classes)
    layout = SumLayout(n_classes=n_classes, n_ks=len(pq.ks))
    n_units = int(pq.units.max()) + 1 if pq.units.size else 0
    out = np.zeros((n_units, layout.width), dtype=np.float64)
    u = pq.units

    def add(col: int, weights: NDArray | None) -> None:
        out[:, col] = np.bincount(u, weights=weights, minlength=n_units)

    def add_onehot(col: int, codes: NDArray[np.int64], weights: NDArray | None) -> None:
        keep = codes >= 0
        idx = u[keep] * n_classes + codes[keep]
        w = None if weights is None else weights[keep]
        counts = np.bincount(idx, weights=w, minlength=n_units * n_classes)
        out[:, col : col + n_classes] = counts.reshape(n_units, n_classes)

    add(0, None)
    add(1, pq.has_relevant.astype(np.float64))
    add_onehot(2, pq.true, None)
    for j in range(len(pq.ks)):
        base = layout.k_base(j)
        add(base, pq.hits[j].astype(np.float64))
        add(base + 1, pq.mv_correct[j].astype(np.float64))
        add(base + 2, np.where(pq.has_relevant, pq.ap[j], 0.0))
        add_onehot(base + 3, pq.true, pq.mv_correct[j].astype(np.float64))
        add_onehot(base + 3 + n_classes, pq.mv_pred[j], None)
    return out, layout


def _ratio(num: NDArray, den: NDArray) -> NDArray[np.float64]:
    return np.divide(num, den, out=np.full(np.shape(num), np.nan), where=den > 0)


def metrics_from_sums(sums: NDArray[np.float64], layout: SumLayout) -> dict[str, NDArray]:
    """Headline metrics ``{"<key>@<j>": [b]}`` from sums ``[b, width]``; NaN = undefined."""
    c = layout.n_classes
    n = sums[:, 0]
    n_rel = sums[:, 1]
    support = sums[:, 2 : 2 + c]
    out: dict[str, NDArray] = {}
    for j in range(layout.n_ks):
        base = layout.k_base(j)
        out[f"acc_at_k@{j}"] = _ratio(sums[:, base], n)
        out[f"mv_accuracy@{j}"] = _ratio(sums[:, base + 1], n)
        out[f"map_at_k@{j}"] = _ratio(sums[:, base + 2], n_rel)
        tp = sums[:, base + 3 : base + 3 + c]
        pred = sums[:, base + 3 + c : base + 3 + 2 * c]
        out[f"mv_macro_f1@{j}"] = macro_f1_from_counts(support, pred, tp)
    return out


def bootstrap_distributions(
    sums_list: list[NDArray[np.float64]], layout: SumLayout, n_resamples: int, seed: int
) -> list[dict[str, NDArray[np.float64]]]:
    """Per-resample headline metrics for each of several sum matrices over the SAME units.

    Passing two models' sums gives a paired bootstrap: both see identical resamples.
    """
    n_units = sums_list[0].shape[0]
    collected: list[dict[str, list[NDArray]]] = [{} for _ in sums_list]
    for draws in resampled_units(n_units, n_resamples, seed):
        w = unit_weights(draws, n_units)
        for store, sums in zip(collected, sums_list, strict=True):
            # (sumsᵀ wᵀ)ᵀ is w @ sums; BLAS runs this orientation ~5x faster for a short, wide
            # w (measured: 41 x 100k by 100k x 81, 0.32 s vs 0.065 s, AMD EPYC 2 cores).
            resampled = (sums.T @ w.T).T
            for key, values in metrics_from_sums(resampled, layout).items():
                store.setdefault(key, []).append(values)
    return [{k: np.concatenate(v) for k, v in store.items()} for store in collected]


def percentile_interval(
    values: NDArray[np.float64], confidence: float
) -> tuple[float | None, float | None]:
    """Percentile interval over the finite resample values; ``(None, None)`` if there are none."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return None, None
    tail = 100.0 * (1.0 - confidence) / 2.0
    lo, hi = np.percentile(finite, [tail, 100.0 - tail])
    return float(lo), float(hi)
