"""Typed results: JSON-able pydantic summaries plus per-query arrays kept out of dumps.

``RetrievalResult.model_dump(mode="json")`` is what a report writes. The per-query arrays
(``RetrievalResult.per_query``) are excluded from every dump; they exist so that
``compare`` can pair two models query by query.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import SkipJsonSchema

HEADLINE_METRICS: dict[str, str] = {
    "acc_at_k": "acc@{k}",
    "mv_accuracy": "MV@{k} accuracy",
    "mv_macro_f1": "MV@{k} macro-F1",
    "map_at_k": "mAP@{k}",
}


class Estimate(BaseModel):
    """A point estimate with its percentile bootstrap interval (``None`` where undefined)."""

    value: float | None
    ci_low: float | None = None
    ci_high: float | None = None
    n: int = Field(description="queries the value averages over")


class ClassMetrics(BaseModel):
    label: str
    precision: float
    recall: float
    f1: float
    support: int


class ConfusionMatrix(BaseModel):
    """Rows: true label, columns: predicted label, both in ``labels`` order."""

    labels: list[str]
    matrix: list[list[int]]


class ClassificationReport(BaseModel):
    accuracy: float
    macro_f1: float
    weighted_f1: float
    per_class: list[ClassMetrics]
    confusion: ConfusionMatrix


class KMetrics(BaseModel):
    """All metrics at one k."""

    k: int
    acc_at_k: Estimate
    mv_accuracy: Estimate
    mv_macro_f1: Estimate
    mv_weighted_f1: float | None
    map_at_k: Estimate
    n_queries_short: int = Field(description="queries with fewer than k candidates")
    classification: ClassificationReport | None


@dataclass(frozen=True, eq=False)
class PerQuery:
    """Per-query arrays of the evaluated queries (those with at least one candidate).

    Row j of every ``[len(ks), n]`` array belongs to ``ks[j]``. ``units`` is the bootstrap unit
    (group code, or query position without groups), ``has_relevant`` marks R > 0 (the queries
    mAP averages over).
    """

    ks: tuple[int, ...]
    classes: tuple[str, ...]
    query_rows: NDArray[np.int64]
    true: NDArray[np.int64]
    units: NDArray[np.int64]
    indices: NDArray[np.int64]
    sims: NDArray[np.float32]
    n_candidates: NDArray[np.int64]
    n_relevant: NDArray[np.int64]
    has_relevant: NDArray[np.bool_]
    hits: NDArray[np.bool_]
    mv_pred: NDArray[np.int64]
    mv_correct: NDArray[np.bool_]
    ap: NDArray[np.float64]

    def k_index(self, k: int) -> int:
        if k not in self.ks:
            raise KeyError(f"k={k} not evaluated (ks={self.ks})")
        return self.ks.index(k)


class RetrievalResult(BaseModel):
    """Outcome of ``evaluate``. Dump with ``model_dump(mode="json")``; arrays are excluded."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    name: str | None
    protocol: Literal["leave-one-out", "leave-one-group-out"]
    ks: list[int]
    classes: list[str]
    n_rows: int
    n_queries: int = Field(description="queries evaluated (labelled, >= 1 candidate)")
    n_candidates: int = Field(description="labelled rows in the candidate set")
    n_unlabelled: int
    n_queries_without_candidates: int
    n_queries_without_relevant: int = Field(description="R = 0, excluded from mAP")
    n_groups: int | None = Field(description="groups among the evaluated queries")
    bootstrap_unit: Literal["group", "query"]
    bootstrap_resamples: int
    seed: int
    confidence: float
    metrics: list[KMetrics]
    warnings: list[str]
    # Never serialised, so left out of the JSON schema too (numpy arrays have none).
    per_query: SkipJsonSchema[PerQuery | None] = Field(default=None, exclude=True, repr=False)

    def at(self, k: int) -> KMetrics:
        for m in self.metrics:
            if m.k == k:
                return m
        raise KeyError(f"k={k} not evaluated (ks={self.ks})")

    def summary(self) -> dict[str, Any]:
        """JSON-able dict (no per-query arrays)."""
        return self.model_dump(mode="json")


class MetricDifference(BaseModel):
    """A headline metric of A minus B, with a paired bootstrap interval and a verdict line."""

    metric: str = Field(description='display name, e.g. "MV@5 macro-F1"')
    key: str = Field(description="acc_at_k | mv_accuracy | mv_macro_f1 | map_at_k")
    k: int
    value_a: float | None
    value_b: float | None
    difference: float | None
    ci_low: float | None
    ci_high: float | None
    mcnemar_b: int | None = Field(None, description="MV@k: A right, B wrong")
    mcnemar_c: int | None = Field(None, description="MV@k: A wrong, B right")
    mcnemar_p: float | None = None
    verdict: str


class PairComparison(BaseModel):
    name_a: str
    name_b: str
    n_queries: int
    bootstrap_unit: Literal["group", "query"]
    bootstrap_resamples: int
    seed: int
    confidence: float
    differences: list[MetricDifference]
    verdicts: list[str]
    warnings: list[str]

    def summary(self) -> dict[str, Any]:
        return self.model_dump(mode="json")
