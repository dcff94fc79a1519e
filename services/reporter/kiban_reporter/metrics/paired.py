"""Paired comparison of two models evaluated on the same queries.

Why paired: both models answer the same queries, so most of the sampling noise is shared.
Resampling the same units for both (paired bootstrap) and testing the discordant MV@k outcomes
(exact McNemar) uses that pairing; two independent intervals would be far wider and could
"overlap" when the models clearly differ.

The verdict is decided by the paired interval of the difference: it excludes 0 -> one model is
better; it includes 0 -> "cannot tell apart". The McNemar p-value is reported alongside for the
MV@k metrics.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import binomtest

from kiban_reporter.metrics.bootstrap import (
    bootstrap_distributions,
    metrics_from_sums,
    percentile_interval,
    unit_sums,
)
from kiban_reporter.metrics.results import (
    HEADLINE_METRICS,
    MetricDifference,
    PairComparison,
    PerQuery,
    RetrievalResult,
)


def mcnemar_exact(correct_a: np.ndarray, correct_b: np.ndarray) -> tuple[int, int, float]:
    """Exact McNemar test: (b, c, two-sided p) with b = A right & B wrong, c = the reverse.

    Under H0 the discordant pairs split 50/50: p = binomtest(b, b + c, 0.5); p = 1 if b + c = 0.
    """
    a = np.asarray(correct_a, dtype=bool)
    b_ = np.asarray(correct_b, dtype=bool)
    if a.shape != b_.shape:
        raise ValueError(f"correctness vectors differ in shape: {a.shape} vs {b_.shape}")
    b = int(np.count_nonzero(a & ~b_))
    c = int(np.count_nonzero(~a & b_))
    if b + c == 0:
        return b, c, 1.0
    return b, c, float(binomtest(b, b + c, 0.5, alternative="two-sided").pvalue)


def _check_paired(a: RetrievalResult, b: RetrievalResult) -> tuple[PerQuery, PerQuery]:
    if a.per_query is None or b.per_query is None:
        raise ValueError("both results need per-query data (evaluated with at least one query)")
    pa, pb = a.per_query, b.per_query
    if pa.ks != pb.ks:
        raise ValueError(f"results were evaluated at different ks: {pa.ks} vs {pb.ks}")
    if a.bootstrap_unit != b.bootstrap_unit:
        raise ValueError("one result is grouped, the other is not: protocols differ")
    same = (
        np.array_equal(pa.query_rows, pb.query_rows)
        and pa.classes == pb.classes
        and np.array_equal(pa.true, pb.true)
        and np.array_equal(pa.units, pb.units)
    )
    if not same:
        raise ValueError(
            "results are not on the same queries (rows, labels or groups differ): cannot pair"
        )
    return pa, pb


def _fmt(x: float) -> str:
    return f"{x:+.3f}"


def _format_p(p: float) -> str:
    return f"{p:.3g}" if p >= 0.001 else f"{p:.1e}"


def verdict_line(
    name_a: str,
    name_b: str,
    metric: str,
    diff: float | None,
    lo: float | None,
    hi: float | None,
    confidence: float,
    p: float | None = None,
) -> str:
    """One human line: who is better on ``metric``, by how much, how sure.

    The difference is shown as winner − loser (positive), whichever order the pair is in.
    """
    if diff is None:
        return f"cannot compare {name_a} and {name_b} on {metric}: undefined for these queries"
    if lo is not None and hi is not None and hi < 0:
        # B is better: say it as B − A, so the sign reads with the sentence.
        return verdict_line(name_b, name_a, metric, -diff, -hi, -lo, confidence, p)
    level = f"{round(confidence * 100):d}%"
    detail = _fmt(diff)
    if lo is not None and hi is not None:
        detail += f", {level} CI {_fmt(lo)}…{_fmt(hi)}"
    else:
        detail += ", no CI"
    if p is not None:
        detail += f"; McNemar p={_format_p(p)}"
    if lo is not None and hi is not None and lo > 0:
        return f"{name_a} better than {name_b} on {metric} ({detail})"
    return f"cannot tell {name_a} and {name_b} apart on {metric} ({detail})"


def compare(
    result_a: RetrievalResult,
    result_b: RetrievalResult,
    name_a: str | None = None,
    name_b: str | None = None,
    bootstrap: int | None = None,
    seed: int | None = None,
    confidence: float | None = None,
) -> PairComparison:
    """A minus B on every headline metric, paired bootstrap CI, McNemar on MV@k.

    Defaults (resamples, seed, confidence) come from ``result_a``.
    """
    pa, pb = _check_paired(result_a, result_b)
    na = name_a or result_a.name or "A"
    nb = name_b or result_b.name or "B"
    if na == nb:
        na, nb = f"{na} (A)", f"{nb} (B)"
    n_res = result_a.bootstrap_resamples if bootstrap is None else bootstrap
    seed_ = result_a.seed if seed is None else seed
    conf = result_a.confidence if confidence is None else confidence

    sums_a, layout = unit_sums(pa)
    sums_b, _ = unit_sums(pb)
    point_a = metrics_from_sums(sums_a.sum(axis=0, keepdims=True), layout)
    point_b = metrics_from_sums(sums_b.sum(axis=0, keepdims=True), layout)
    warnings: list[str] = []
    n_units = sums_a.shape[0]
    dist_a = dist_b = None
    if n_res > 0 and n_units >= 2:
        dist_a, dist_b = bootstrap_distributions([sums_a, sums_b], layout, n_res, seed_)
    elif n_res > 0:
        warnings.append(f"paired bootstrap needs at least 2 units, got {n_units}; no CIs")

    differences = []
    for j, k in enumerate(pa.ks):
        b, c, p = mcnemar_exact(pa.mv_correct[j], pb.mv_correct[j])
        for key, template in HEADLINE_METRICS.items():
            name = template.format(k=k)
            va, vb = point_a[f"{key}@{j}"][0], point_b[f"{key}@{j}"][0]
            value_a = float(va) if np.isfinite(va) else None
            value_b = float(vb) if np.isfinite(vb) else None
            diff = None if value_a is None or value_b is None else value_a - value_b
            lo = hi = None
            if diff is not None and dist_a is not None and dist_b is not None:
                lo, hi = percentile_interval(dist_a[f"{key}@{j}"] - dist_b[f"{key}@{j}"], conf)
            is_mv = key.startswith("mv_")
            differences.append(
                MetricDifference(
                    metric=name,
                    key=key,
                    k=k,
                    value_a=value_a,
                    value_b=value_b,
                    difference=diff,
                    ci_low=lo,
                    ci_high=hi,
                    mcnemar_b=b if is_mv else None,
                    mcnemar_c=c if is_mv else None,
                    mcnemar_p=p if is_mv else None,
                    verdict=verdict_line(na, nb, name, diff, lo, hi, conf, p if is_mv else None),
                )
            )
    return PairComparison(
        name_a=na,
        name_b=nb,
        n_queries=int(pa.query_rows.size),
        bootstrap_unit=result_a.bootstrap_unit,
        bootstrap_resamples=n_res,
        seed=seed_,
        confidence=conf,
        differences=differences,
        verdicts=[d.verdict for d in differences],
        warnings=warnings,
    )
