"""The nights in a row: each model's headline metric over the earlier batches of the same
series, a regression flag, and the Prometheus gauges of the latest evaluation.

**Series.** A batch id ending in a date (``nightly-2026-11-28``) or a number (``lot-0042``,
``steel-20261128``) belongs to the series named by the rest (``nightly-``, ``lot-``,
``steel-``); a batch belongs only with ids of the same suffix form (date or number), ordered
by that suffix (the date, or the number's value). An id without such a suffix has no series
and no trend. The order comes from the ids, not from when reports were written, so
re-evaluating an old night compares it with the nights before it.

**Window.** The ``window`` most recent batches of the series older than this one; of each, the
latest report version. Keys under ``reports/`` are listed once and at most ``window`` reports
are read. A report that cannot be read or parsed, or was made with another protocol or
headline k, is left out with a note (no older batch is read instead).

**Rule.** With at least two earlier values of a model's headline metric (MV@k macro-F1 at
``protocol.headline_k``), the model is flagged when tonight's interval upper bound is below
the baseline, the mean of the earlier values: tonight falls below the baseline by more than
its own uncertainty.

Earlier reports are read through a small view of the fields used here (any schema version
that has them), so a later change of the report schema does not cut the history.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from datetime import datetime
from statistics import fmean

from prometheus_client import Gauge
from pydantic import BaseModel, Field, ValidationError

from kiban.records import report_prefix
from kiban.store import ObjectStore
from kiban.telemetry import (
    LAST_EVALUATION,
    QUALITY,
    QUALITY_BASELINE,
    QUALITY_CI_HIGH,
    QUALITY_CI_LOW,
    QUALITY_REGRESSION,
    redact,
)
from kiban_reporter.decision_schema import ModelTrend, Trend, TrendPoint
from kiban_reporter.metrics.results import HEADLINE_METRICS, Estimate, KMetrics
from kiban_reporter.report import REPORT_SCHEMA, ModelSection, Report

log = logging.getLogger(__name__)

_DATE_SUFFIX = re.compile(r"^(?P<series>.*\D)(?P<suffix>\d{4}-\d{2}-\d{2})$")
_NUMBER_SUFFIX = re.compile(r"^(?P<series>.*\D)(?P<suffix>\d+)$")
NO_SERIES = "none"
MIN_BASELINE = 2


@dataclass(frozen=True)
class SeriesId:
    """Where a batch id sits in its series: name, suffix form and sort key."""

    series: str
    form: str  # "date" | "number"
    order: tuple[int, str]

    def same_series(self, other: SeriesId) -> bool:
        return (self.series, self.form) == (other.series, other.form)


def parse_series(batch_id: str) -> SeriesId | None:
    """``nightly-2026-11-28`` → ``nightly-`` (date), ``lot-0042`` → ``lot-`` (number 42);
    None when the id has no trailing date or number, or nothing with a letter before it."""
    match = _DATE_SUFFIX.match(batch_id)
    if match:
        form, order = "date", (0, match["suffix"])
    else:
        match = _NUMBER_SUFFIX.match(batch_id)
        if not match:
            return None
        form, order = "number", (int(match["suffix"]), "")
    series = match["series"]
    if not re.search(r"[A-Za-z]", series):
        return None
    return SeriesId(series, form, order)


def headline_metric_name(k: int) -> str:
    return HEADLINE_METRICS["mv_macro_f1"].format(k=k)


# -- earlier reports: a view of the fields the trend reads ---------------------------------


class _StoredEstimate(BaseModel):
    value: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None


class _StoredK(BaseModel):
    k: int
    mv_macro_f1: _StoredEstimate


class _StoredRetrieval(BaseModel):
    metrics: list[_StoredK]


class _StoredCost(BaseModel):
    encode_images_per_second: float | None = None


class _StoredModel(BaseModel):
    name: str
    retrieval: _StoredRetrieval | None = None
    cost: _StoredCost | None = None


class _StoredProtocol(BaseModel):
    name: str
    headline_k: int


class _StoredReport(BaseModel):
    schema_name: str = Field(alias="schema")
    schema_version: int
    version: str
    batch_id: str
    created_at: str
    protocol: _StoredProtocol
    models: list[_StoredModel]


def _version_key(version: str) -> tuple[int, str]:
    return (len(version), version)


def _series_batches(store: ObjectStore, tonight: str, sid: SeriesId) -> list[tuple[str, str]]:
    """(batch, latest report version) of every earlier batch of the series, oldest first,
    from one listing of ``reports/``."""
    latest: dict[str, str] = {}
    order: dict[str, tuple[int, str]] = {}
    for info in store.list("reports"):
        parts = info.key.split("/")
        if len(parts) != 4 or parts[0] != "reports" or parts[3] != "report.json":
            continue
        batch, version = parts[1], parts[2]
        if batch == tonight:
            continue
        other = parse_series(batch)
        if other is None or not other.same_series(sid) or not other.order < sid.order:
            continue
        order[batch] = other.order
        if batch not in latest or _version_key(version) > _version_key(latest[batch]):
            latest[batch] = version
    return [(b, latest[b]) for b in sorted(latest, key=lambda b: (order[b], b))]


def _why(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        if first["type"] == "json_invalid":
            return f"not JSON: {first['msg']}"
        where = ".".join(str(part) for part in first["loc"]) or "(top level)"
        return f"{exc.error_count()} schema error(s), first at {where}: {first['msg']}"
    return redact(f"{type(exc).__name__}: {exc}")[:300]


def _read(store: ObjectStore, batch: str, version: str) -> _StoredReport:
    report = _StoredReport.model_validate_json(
        store.get(f"{report_prefix(batch)}/{version}/report.json")
    )
    if report.schema_name != REPORT_SCHEMA:
        raise ValueError(f"schema {report.schema_name!r} is not {REPORT_SCHEMA!r}")
    if report.batch_id != batch:
        raise ValueError(f"it names batch {report.batch_id!r}")
    return report


def _stored_point(report: _StoredReport, model: str, k: int) -> TrendPoint | None:
    for section in report.models:
        if section.name != model or section.retrieval is None:
            continue
        for m in section.retrieval.metrics:
            if m.k == k:
                est = m.mv_macro_f1
                return TrendPoint(
                    batch_id=report.batch_id,
                    report_version=report.version,
                    created_at=report.created_at,
                    value=est.value,
                    ci_low=est.ci_low,
                    ci_high=est.ci_high,
                    images_per_second=section.cost.encode_images_per_second
                    if section.cost
                    else None,
                )
    return None


def _tonight_point(report: Report, section: ModelSection, k: int) -> TrendPoint:
    km = _k_metrics(section, k)
    est = km.mv_macro_f1 if km is not None else Estimate(value=None, n=0)
    return TrendPoint(
        batch_id=report.batch_id,
        report_version=report.version,
        created_at=report.created_at,
        value=est.value,
        ci_low=est.ci_low,
        ci_high=est.ci_high,
        images_per_second=section.cost.encode_images_per_second,
    )


# -- the trend ------------------------------------------------------------------------------


def _f(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _model_trend(
    model: str, earlier: list[TrendPoint], tonight: TrendPoint, metric: str, confidence: float
) -> ModelTrend:
    values = [p.value for p in earlier if p.value is not None]
    baseline = fmean(values) if values else None
    n = len(values)
    now = tonight.value
    regression = (
        n >= MIN_BASELINE
        and baseline is not None
        and tonight.ci_high is not None
        and tonight.ci_high < baseline
    )
    level = f"{confidence:.0%}"
    tonight_text = f"{metric} {_f(now)} [{_f(tonight.ci_low)}, {_f(tonight.ci_high)}] tonight"
    over = f"the mean of the last {n} batch{'es' if n != 1 else ''}"
    if now is None:
        statement = f"{model}: no {metric} tonight (not scored or undefined); nothing to compare."
    elif n == 0:
        statement = f"{model}: {tonight_text}; no earlier batch of the series to compare with."
    elif n < MIN_BASELINE or baseline is None:
        statement = (
            f"{model}: {tonight_text}; only 1 earlier batch ({_f(baseline)}), a baseline needs "
            f"{MIN_BASELINE}: not flagged."
        )
    elif tonight.ci_high is None:
        statement = (
            f"{model}: {metric} {_f(now)} tonight has no confidence interval, so it cannot be "
            f"flagged (baseline {_f(baseline)}, {over})."
        )
    elif regression:
        statement = (
            f"{model}: REGRESSION — {tonight_text} is below the baseline {_f(baseline)} "
            f"({over}) by more than its {level} interval."
        )
    elif tonight.ci_low is not None and tonight.ci_low > baseline:
        statement = (
            f"{model}: {tonight_text} is above the baseline {_f(baseline)} ({over}) by more "
            f"than its {level} interval: better than usual."
        )
    else:
        statement = (
            f"{model}: {tonight_text}; baseline {_f(baseline)} ({over}) lies within its "
            f"{level} interval: no regression."
        )
    speeds = [p.images_per_second for p in earlier if p.images_per_second is not None]
    if now is not None and tonight.images_per_second is not None and speeds:
        statement += (
            f" Throughput {tonight.images_per_second:.1f} images/s "
            f"(earlier mean {fmean(speeds):.1f})."
        )
    return ModelTrend(
        model=model,
        points=[*earlier, tonight],
        baseline=baseline,
        baseline_n=n,
        regression=regression,
        statement=statement,
    )


def build_trend(store: ObjectStore, report: Report, window: int) -> Trend | None:
    """The headline metric of each model of ``report`` over the earlier batches of its series.

    None when the batch id has no series or no model was scored. Never raises for an earlier
    report: one that cannot be read or compared is left out with a note in ``Trend.notes``.
    """
    sid = parse_series(report.batch_id)
    if sid is None or not any(s.retrieval is not None for s in report.models):
        return None
    k = report.protocol.headline_k
    metric = headline_metric_name(k)
    notes: list[str] = []
    try:
        found = _series_batches(store, report.batch_id, sid)
    except Exception as exc:  # the trend must never fail the evaluation
        log.warning("trend of %s: cannot list earlier reports: %s", report.batch_id, _why(exc))
        notes.append(f"earlier reports could not be listed ({_why(exc)}): no baseline tonight")
        found = []
    chosen = found[-window:] if window > 0 else []
    if len(found) > len(chosen):
        notes.append(
            f"{len(found) - len(chosen)} older batch(es) of the series lie outside the "
            f"window of {window} and were not read"
        )
    readable: list[_StoredReport] = []
    for batch, version in chosen:
        try:
            stored = _read(store, batch, version)
        except Exception as exc:
            why = _why(exc)
            log.warning("trend of %s: %s/%s left out: %s", report.batch_id, batch, version, why)
            notes.append(f"{batch}/{version} left out: unreadable ({why})")
            continue
        if (stored.protocol.name, stored.protocol.headline_k) != (report.protocol.name, k):
            notes.append(
                f"{batch}/{version} left out: protocol {stored.protocol.name} with "
                f"{headline_metric_name(stored.protocol.headline_k)}, not comparable with "
                f"tonight's {report.protocol.name} with {metric}"
            )
            continue
        readable.append(stored)
    models = []
    for section in report.models:
        earlier = [
            p for p in (_stored_point(r, section.name, k) for r in readable) if p is not None
        ]
        models.append(
            _model_trend(
                section.name,
                earlier,
                _tonight_point(report, section, k),
                metric,
                report.protocol.confidence,
            )
        )
    rule = (
        f"A model is flagged when tonight's {metric} {report.protocol.confidence:.0%} interval "
        f"upper bound is below its baseline: the mean {metric} of the same model in the "
        f"latest reports of at most {window} earlier batches of the series '{sid.series}' "
        f"(ordered by the {sid.form} ending the batch id; same protocol and headline k only), "
        f"and only with at least {MIN_BASELINE} such values."
    )
    return Trend(
        series=sid.series,
        metric=metric,
        window=window,
        rule=rule,
        models=models,
        regressions=[m.model for m in models if m.regression],
        earlier_batches=[batch for batch, _ in chosen],
        notes=notes,
    )


# -- Prometheus -----------------------------------------------------------------------------


def metric_label(field: str, k: int) -> str:
    """A KMetrics field at k as a bounded label: acc_at_k → acc5, mv_macro_f1 → mv5_macro_f1."""
    if field.endswith("_at_k"):
        return f"{field[: -len('_at_k')]}{k}"
    if field.startswith("mv_"):
        return f"mv{k}_{field[len('mv_') :]}"
    return f"{field}{k}"


def gauge_series(report: Report) -> str:
    """The ``series`` label: the trend's series once it has earlier batches, else "none".

    A one-off id that happens to end in digits (a uuid, a hash) never gets a label of its
    own, so the label set stays bounded by the real series.
    """
    trend = report.trend
    return trend.series if trend is not None and trend.earlier_batches else NO_SERIES


def _set(gauge: Gauge, labels: tuple[str, ...], value: float | None) -> None:
    if value is None:
        gauge.remove(*labels)
    else:
        gauge.labels(*labels).set(value)


def _k_metrics(section: ModelSection, k: int) -> KMetrics | None:
    if section.retrieval is None:
        return None
    return next((m for m in section.retrieval.metrics if m.k == k), None)


def _export(report: Report) -> None:
    series = gauge_series(report)
    k = report.protocol.headline_k
    fields = [
        name
        for name, info in KMetrics.model_fields.items()
        if info.annotation is Estimate or name.startswith("mv_")
    ]
    for section in report.models:
        km = _k_metrics(section, k)
        for field in fields:
            labels = (series, section.name, metric_label(field, k))
            value = getattr(km, field) if km is not None else None
            est = value if isinstance(value, Estimate) else None
            point = est.value if est is not None else value
            _set(QUALITY, labels, point if isinstance(point, float | int) else None)
            _set(QUALITY_CI_LOW, labels, est.ci_low if est else None)
            _set(QUALITY_CI_HIGH, labels, est.ci_high if est else None)
    if report.trend is not None and series != NO_SERIES:
        headline = metric_label("mv_macro_f1", k)
        for mt in report.trend.models:
            _set(QUALITY_BASELINE, (series, mt.model, headline), mt.baseline)
            QUALITY_REGRESSION.labels(series, mt.model).set(1 if mt.regression else 0)
    try:
        stamp = datetime.fromisoformat(report.created_at).timestamp()
    except ValueError:
        stamp = time.time()
    LAST_EVALUATION.labels(series).set(stamp)


def export_gauges(report: Report) -> None:
    """Set the quality gauges from a written report (and its trend, when it has one).

    Labels: the series (never the batch id), the model and the metric at the headline k.
    An undefined value removes its sample rather than leaving the previous night's. Never
    raises: the report is already written.
    """
    try:
        _export(report)
    except Exception:
        log.exception("quality gauges of %s/%s not exported", report.batch_id, report.version)
