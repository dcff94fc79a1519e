"""The report's decision sections as typed records: cost projection, Pareto front,
non-inferiority, learning curves, trend and the leakage check.

Kept apart from the code that computes them (``cost``, ``decision``, ``learning_curve``,
``trend``, ``leakage``) so the HTML and Markdown renderers and the published JSON schema
depend only on the shapes, never on how they are computed.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class CostProjection(BaseModel):
    """What a stated nightly volume costs with one model, from its measured throughput."""

    volume_images_per_night: int
    hours_per_night: float | None = Field(
        description="Wall hours of one worker like the one that ran."
    )
    device_hours_per_night: float | None = Field(
        description="Core-hours (CPU) or GPU-hours (GPU) per night."
    )
    price_per_night: float | None
    price_per_month: float | None = Field(description="30 nights.")
    currency: str


class ParetoPoint(BaseModel):
    """One model on the quality-vs-cost plane."""

    model: str
    quality: float | None = Field(description="Headline metric (MV@k macro-F1) point estimate.")
    quality_ci_low: float | None = None
    quality_ci_high: float | None = None
    cost: float | None = Field(description="Per 1k images, in ``Decision.cost_basis`` units.")
    on_front: bool = Field(description="No other model is at least as good and as cheap.")
    dominated_by: list[str] = Field(default_factory=list)


class NonInferiority(BaseModel):
    """Is the cheaper model of a pair good enough? The paired CI against the margin δ."""

    cheaper: str
    reference: str
    metric: str
    margin: float
    difference: float | None = Field(description="cheaper − reference (point estimate).")
    ci_low: float | None
    ci_high: float | None
    cost_ratio: float | None = Field(
        description="cheaper's cost per 1k ÷ reference's (1/N); null when not comparable."
    )
    cost_comparable: bool = Field(
        description="Both costs were measured on the same device and provider."
    )
    outcome: Literal["better", "non-inferior", "worse", "inconclusive"]
    statement: str


class Decision(BaseModel):
    """Which model to run, in one line an operations lead reads, and the evidence for it."""

    line: str = Field(description="The report's first line.")
    recommended: str | None
    metric: str = Field(description='e.g. "MV@5 macro-F1"')
    margin: float = Field(description="δ (KIBAN_NONINFERIORITY_MARGIN).")
    cost_basis: Literal["price per 1k images", "seconds per 1k images"]
    currency: str | None = None
    pareto: list[ParetoPoint]
    non_inferiority: list[NonInferiority]
    notes: list[str] = Field(default_factory=list)


class CurvePoint(BaseModel):
    """The headline metric with at most ``per_class`` labelled images per class in the index."""

    per_class: int | None = Field(description="null = every labelled image (the full index).")
    candidates: float = Field(description="Mean labelled images in the index over the repeats.")
    value: float | None = Field(description="Mean over the repeats of the headline metric.")
    ci_low: float | None
    ci_high: float | None
    repeats: int
    queries: float | None = Field(
        None,
        description="Mean queries scored over the repeats (those with at least one candidate "
        "in the subset; a query whose own group holds every subset image has none).",
    )


class LearningCurve(BaseModel):
    model: str
    points: list[CurvePoint]
    gain: float | None = Field(
        None, description="Full index minus the largest size (the last step); null if none."
    )
    gain_ci_low: float | None = Field(
        None, description="Paired interval of ``gain`` (same draws for both points)."
    )
    gain_ci_high: float | None = None
    flattened: bool | None = Field(
        description="true: the last step (largest size → all) gained less than δ. false: it "
        "gained at least δ and its interval excludes 0 (still improving). null: it gained at "
        "least δ within the noise (interval includes 0), or there is no smaller point."
    )


class LearningCurves(BaseModel):
    """Is the labelled set big enough? Per model, quality against labelled images per class."""

    metric: str
    sizes: list[int] = Field(description="Per-class sizes drawn (below the largest class).")
    dropped_sizes: list[int] = Field(
        default_factory=list,
        description="Sizes asked for but not below the largest class: they equal the full index.",
    )
    largest_class: int | None = Field(None, description="Labelled images of the largest class.")
    n_queries: int | None = Field(None, description="Queries scored at the full index.")
    repeats: int
    seed: int
    margin: float | None = Field(None, description="δ used for ``flattened`` and the verdict.")
    interval: str = Field(description="How the CIs are formed.")
    curves: list[LearningCurve]
    verdict_may_change: bool | None = Field(
        description="Between the last two points the models' order changed, or the gap between "
        "the best two moved by more than δ; null with fewer than two models or points."
    )
    statement: str
    seconds: float


class TrendPoint(BaseModel):
    """One batch of the series: the model's headline metric and throughput in its report."""

    batch_id: str
    report_version: str
    created_at: str = Field(description="The report's created_at.")
    value: float | None
    ci_low: float | None
    ci_high: float | None
    images_per_second: float | None = Field(description="cost.encode_images_per_second.")


class ModelTrend(BaseModel):
    model: str
    points: list[TrendPoint] = Field(description="Oldest first; the last is this report.")
    baseline: float | None = Field(description="Mean of the earlier points' values.")
    baseline_n: int
    regression: bool
    statement: str


class Trend(BaseModel):
    """The headline metric over the last nights of the same schedule (series)."""

    series: str = Field(description="Batches whose id shares this prefix, e.g. 'nightly-'.")
    metric: str
    window: int
    rule: str = Field(description="When the regression flag is raised.")
    models: list[ModelTrend]
    regressions: list[str] = Field(default_factory=list, description="Models flagged tonight.")
    earlier_batches: list[str] = Field(
        default_factory=list,
        description="The series' earlier batches in the window (read or left out), oldest first.",
    )
    notes: list[str] = Field(
        default_factory=list,
        description="Earlier reports left out (unreadable, another protocol or headline k) "
        "and why.",
    )


class LeakageCheck(BaseModel):
    """A trained model's training images against this evaluation (by sha256)."""

    model: str
    training_images: int
    overlap_queries: int = Field(description="Queries it was trained on (excluded).")
    overlap_candidates: int = Field(description="Index images it was trained on (allowed).")
