"""Warning messages for data that makes some metric undefined or suspect.

Kept in one place so the wording is consistent and the report can list them verbatim. Each
function returns a (possibly empty) list of human-readable strings.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray


def no_queries(n_rows: int, n_unlabelled: int) -> list[str]:
    return [
        f"no labelled queries (rows: {n_rows}, unlabelled: {n_unlabelled}); all metrics are None"
    ]


def without_candidates(n: int) -> list[str]:
    if not n:
        return []
    return [f"{n} queries have no candidate after exclusions; they are excluded from all metrics"]


def single_class(classes_present: list[str]) -> list[str]:
    if len(classes_present) != 1:
        return []
    return [
        f"only one class among the queries ({classes_present[0]!r}): accuracy and F1 are "
        "trivial and do not tell models apart"
    ]


def classes_with_one_group(
    label_codes: NDArray[np.int64], group_codes: NDArray[np.int64], rows: NDArray, classes: list
) -> list[str]:
    """Leave-one-group-out: a class found in a single group has no relevant candidate."""
    if rows.size == 0:
        return []
    pairs = np.unique(np.stack([label_codes[rows], group_codes[rows]], axis=1), axis=0)
    n_groups = np.bincount(pairs[:, 0], minlength=len(classes))
    lonely = [classes[c] for c in np.flatnonzero(n_groups == 1)]
    if not lonely:
        return []
    shown = ", ".join(repr(c) for c in lonely[:10]) + (" ..." if len(lonely) > 10 else "")
    return [
        f"{len(lonely)} classes occur in fewer than 2 groups ({shown}): with leave-one-group-out "
        "their queries have no relevant candidate and can never be right"
    ]


def short_queries(k: int, n_short: int, n_queries: int) -> list[str]:
    if not n_short:
        return []
    return [
        f"{n_short} of {n_queries} queries have fewer than k={k} candidates; "
        f"MV@{k}, acc@{k} and mAP@{k} use the candidates there are"
    ]


def without_relevant(n: int, n_queries: int) -> list[str]:
    if not n:
        return []
    return [f"{n} of {n_queries} queries have no relevant candidate (R=0); excluded from mAP"]


def few_units(n_units: int, unit: str, n_resamples: int) -> list[str]:
    if n_resamples == 0 or n_units >= 2:
        return []
    return [f"bootstrap needs at least 2 {unit}s, got {n_units}; no confidence intervals"]
