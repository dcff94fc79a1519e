"""The trend over the nights of a series, its regression flag and the quality gauges: real
Report objects written as report.json into a real file:// object store."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from kiban.errors import StoreError
from kiban.store import ObjectInfo, ObjectStore, open_store
from kiban_reporter.cost import CostSummary
from kiban_reporter.metrics.results import Estimate, KMetrics, RetrievalResult
from kiban_reporter.report import BatchSummary, ModelSection, Protocol, Report
from kiban_reporter.trend import build_trend, export_gauges, metric_label, parse_series

# -- building reports ---------------------------------------------------------------------


def _est(value: float | None, half: float | None = 0.02) -> Estimate:
    if value is None or half is None:
        return Estimate(value=value, n=60)
    return Estimate(value=value, ci_low=value - half, ci_high=value + half, n=60)


def _section(
    name: str, value: float | None, half: float | None = 0.02, k: int = 5, ips: float = 100.0
) -> ModelSection:
    metrics = [
        KMetrics(
            k=k,
            acc_at_k=_est(0.9),
            mv_accuracy=_est(0.85),
            mv_macro_f1=_est(value, half),
            mv_weighted_f1=0.84,
            map_at_k=_est(0.7),
            n_queries_short=0,
            classification=None,
        )
    ]
    return ModelSection(
        name=name,
        family="domain",
        source="test",
        architecture="x",
        weights="w",
        pretrained=True,
        embedding_dim=16,
        params=1000,
        model_sha256="0" * 64,
        parity_min_cosine=None,
        images_encoded=60,
        encode_failures=[],
        retrieval=RetrievalResult(
            name=name,
            protocol="leave-one-group-out",
            ks=[k],
            classes=["a", "b"],
            n_rows=60,
            n_queries=60,
            n_candidates=60,
            n_unlabelled=0,
            n_queries_without_candidates=0,
            n_queries_without_relevant=0,
            n_groups=12,
            bootstrap_unit="group",
            bootstrap_resamples=100,
            seed=0,
            confidence=0.95,
            metrics=metrics,
            warnings=[],
        ),
        cost=CostSummary(
            images=60,
            provider="CPUExecutionProvider",
            threads=2,
            batch_size=32,
            device="cpu",
            encode_images_per_second=ips,
            inference_images_per_second=None,
            seconds_per_1k=None,
            price_per_hour=None,
            currency="USD",
            cost_per_1k=None,
            bytes_per_vector=64,
            params=1000,
            model_file_bytes=10,
        ),
    )


def _report(
    batch: str,
    models: dict[str, float | None],
    half: float | None = 0.02,
    protocol: str = "leave-one-group-out",
    k: int = 5,
    version: str = "0001",
) -> Report:
    return Report(
        version=version,
        request_id=None,
        batch_id=batch,
        created_at="2026-11-28T03:00:00+00:00",
        batch=BatchSummary(
            source="file:///x",
            manifest=None,
            label_source="folders",
            n_listed=60,
            n_accepted=60,
            n_quarantined=0,
            n_duplicates=0,
            labelled=True,
            classes=["a", "b"],
            quarantine_reasons={},
            quarantine=[],
        ),
        protocol=Protocol(
            name=protocol, ks=[k], headline_k=k, bootstrap_resamples=100, seed=0, confidence=0.95
        ),
        models=[_section(name, value, half, k) for name, value in models.items()],
        comparisons=[],
        verdicts=[],
        warnings=[],
    )


@pytest.fixture
def store(tmp_path: Path) -> ObjectStore:
    return open_store((tmp_path / "store").as_uri(), create=True)


def _write(store: ObjectStore, report: Report) -> None:
    store.put(f"reports/{report.batch_id}/{report.version}/report.json", report.to_json().encode())
    store.put(f"reports/{report.batch_id}/{report.version}/report.md", b"# md")


def _nights(store: ObjectStore, values: list[float], model: str = "m", start: int = 1) -> None:
    for day, value in enumerate(values, start=start):
        _write(store, _report(f"nightly-2026-11-{day:02d}", {model: value}))


class CountingStore:
    """A real store that counts what the trend asks of it."""

    def __init__(self, inner: ObjectStore) -> None:
        self.inner, self.uri = inner, inner.uri
        self.gets: list[str] = []
        self.lists: list[str] = []

    def get(self, key: str) -> bytes:
        self.gets.append(key)
        return self.inner.get(key)

    def put(self, key: str, data: bytes) -> None:
        self.inner.put(key, data)

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        self.lists.append(prefix)
        return self.inner.list(prefix)

    def delete(self, key: str) -> None:
        self.inner.delete(key)


# -- series ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("batch", "series", "form"),
    [
        ("nightly-2026-11-28", "nightly-", "date"),
        ("steel-2026-11-28", "steel-", "date"),
        ("lot-0042", "lot-", "number"),
        ("steel-20261128", "steel-", "number"),
        ("line2_run.7", "line2_run.", "number"),
    ],
)
def test_series_is_the_id_without_its_trailing_date_or_number(
    batch: str, series: str, form: str
) -> None:
    sid = parse_series(batch)
    assert sid is not None and (sid.series, sid.form) == (series, form)


@pytest.mark.parametrize("batch", ["adhoc", "night-3f2a9c0b", "2026-11-28", "12345", "v2-final"])
def test_an_id_without_a_suffix_has_no_series_and_no_trend(store: ObjectStore, batch: str) -> None:
    assert parse_series(batch) is None
    assert build_trend(store, _report(batch, {"m": 0.8}), 7) is None


def test_numbers_order_by_value_and_dates_by_date() -> None:
    nine, ten = parse_series("lot-9"), parse_series("lot-0010")
    assert nine is not None and ten is not None and nine.order < ten.order
    a, b = parse_series("n-2026-01-31"), parse_series("n-2026-12-01")
    assert a is not None and b is not None and a.order < b.order
    number = parse_series("n-20260101")
    assert number is not None and number.series == a.series
    assert not a.same_series(number) and not a.same_series(ten)


# -- window and reading cost ----------------------------------------------------------------


def test_window_takes_the_most_recent_earlier_batches_of_the_series_only(
    store: ObjectStore,
) -> None:
    _nights(store, [0.80, 0.81, 0.82, 0.83, 0.84])  # 11-01 … 11-05
    _write(store, _report("nightly-2026-11-30", {"m": 0.1}))  # later: never part of the trend
    _write(store, _report("steel-2026-11-04", {"m": 0.1}))  # another series
    _write(store, _report("nightly-20261104", {"m": 0.1}))  # another suffix form
    counting = CountingStore(store)
    tonight = _report("nightly-2026-11-06", {"m": 0.85})
    trend = build_trend(counting, tonight, 3)
    assert trend is not None
    assert trend.series == "nightly-" and trend.window == 3 and trend.metric == "MV@5 macro-F1"
    assert trend.earlier_batches == [
        "nightly-2026-11-03",
        "nightly-2026-11-04",
        "nightly-2026-11-05",
    ]
    assert any("2 older batch(es)" in note for note in trend.notes)
    (mt,) = trend.models
    assert [p.batch_id for p in mt.points] == [*trend.earlier_batches, "nightly-2026-11-06"]
    assert [p.value for p in mt.points] == pytest.approx([0.82, 0.83, 0.84, 0.85])
    assert mt.baseline == pytest.approx(0.83) and mt.baseline_n == 3
    assert mt.points[-1].images_per_second == 100.0
    # one listing of reports/, one report read per batch of the window
    assert counting.lists == ["reports"]
    assert len(counting.gets) == 3 and all(k.endswith("/report.json") for k in counting.gets)


def test_numbered_series_orders_by_value(store: ObjectStore) -> None:
    for n, value in ((8, 0.5), (9, 0.6), (10, 0.7), (11, 0.9)):
        _write(store, _report(f"lot-{n:04d}", {"m": value}))
    trend = build_trend(store, _report("lot-0011", {"m": 0.9}, version="0002"), 2)
    assert trend is not None
    assert trend.earlier_batches == ["lot-0009", "lot-0010"]  # not lot-0011's own version 0001


def test_the_latest_report_version_of_an_earlier_batch_is_used(store: ObjectStore) -> None:
    _write(store, _report("n-2026-11-01", {"m": 0.5}, version="0001"))
    _write(store, _report("n-2026-11-01", {"m": 0.9}, version="0002"))
    trend = build_trend(store, _report("n-2026-11-02", {"m": 0.9}), 7)
    assert trend is not None
    first = trend.models[0].points[0]
    assert (first.report_version, first.value) == ("0002", 0.9)


def test_reevaluating_an_old_night_compares_it_with_the_nights_before_it(
    store: ObjectStore,
) -> None:
    _nights(store, [0.8, 0.8, 0.8, 0.2, 0.2])
    trend = build_trend(store, _report("nightly-2026-11-03", {"m": 0.8}, version="0002"), 7)
    assert trend is not None and trend.earlier_batches == [
        "nightly-2026-11-01",
        "nightly-2026-11-02",
    ]


# -- like with like ---------------------------------------------------------------------------


def test_other_protocols_and_headline_k_are_left_out_with_a_note(store: ObjectStore) -> None:
    _nights(store, [0.80, 0.80], start=1)
    _write(store, _report("nightly-2026-11-03", {"m": 0.10}, protocol="split"))
    _write(store, _report("nightly-2026-11-04", {"m": 0.10}, k=3))
    trend = build_trend(store, _report("nightly-2026-11-05", {"m": 0.79}), 7)
    assert trend is not None
    assert len(trend.earlier_batches) == 4
    mt = trend.models[0]
    assert [p.batch_id for p in mt.points][:-1] == ["nightly-2026-11-01", "nightly-2026-11-02"]
    assert mt.baseline == pytest.approx(0.80) and mt.baseline_n == 2
    notes = "\n".join(trend.notes)
    assert "nightly-2026-11-03/0001 left out: protocol split" in notes
    assert "nightly-2026-11-04/0001 left out" in notes and "MV@3 macro-F1" in notes


def test_a_model_new_tonight_has_no_baseline(store: ObjectStore) -> None:
    _nights(store, [0.8, 0.8, 0.8])
    trend = build_trend(store, _report("nightly-2026-11-04", {"m": 0.8, "new": 0.1}), 7)
    assert trend is not None
    new = trend.models[1]
    assert new.model == "new" and new.baseline_n == 0 and not new.regression
    assert "no earlier batch" in new.statement


# -- the regression rule --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tonight", "half", "flagged"),
    [
        (0.70, 0.02, True),  # CI [0.68, 0.72] wholly below 0.80
        (0.77, 0.02, True),  # upper bound 0.79 < 0.80
        (0.78, 0.03, False),  # upper bound 0.81 reaches the baseline
        (0.78, 0.02, False),  # upper bound 0.80 == baseline: not below
        (0.80, 0.02, False),
        (0.90, 0.02, False),  # better
        (0.10, None, False),  # no interval: cannot be flagged
    ],
)
def test_regression_is_flagged_exactly_when_the_ci_upper_bound_is_below_the_baseline(
    store: ObjectStore, tonight: float, half: float | None, flagged: bool
) -> None:
    _nights(store, [0.78, 0.80, 0.82])  # baseline 0.80
    report = _report("nightly-2026-11-04", {"m": tonight}, half=half)
    trend = build_trend(store, report, 7)
    assert trend is not None
    (mt,) = trend.models
    assert mt.baseline == pytest.approx(0.80)
    assert mt.regression is flagged
    assert trend.regressions == (["m"] if flagged else [])
    assert ("REGRESSION" in mt.statement) is flagged
    assert mt.statement.startswith("m: ")
    if half is None:
        assert "no confidence interval" in mt.statement
    if tonight == 0.90:
        assert "better than usual" in mt.statement
    assert "upper bound is below its baseline" in trend.rule and "at least 2" in trend.rule


def test_fewer_than_two_earlier_points_never_flag(store: ObjectStore) -> None:
    _nights(store, [0.95])
    trend = build_trend(store, _report("nightly-2026-11-02", {"m": 0.10}), 7)
    assert trend is not None
    (mt,) = trend.models
    assert mt.baseline_n == 1 and mt.baseline == pytest.approx(0.95)
    assert not mt.regression and trend.regressions == []
    assert "only 1 earlier batch" in mt.statement
    empty = build_trend(store, _report("nightly-2026-11-01", {"m": 0.10}, version="0002"), 7)
    assert empty is not None and empty.earlier_batches == [] and not empty.models[0].regression


def test_an_unscored_model_tonight_is_not_flagged(store: ObjectStore) -> None:
    _nights(store, [0.8, 0.8, 0.8], model="m")
    report = _report("nightly-2026-11-04", {"m": 0.8, "x": 0.8})
    report.models[1].retrieval = None
    trend = build_trend(store, report, 7)
    assert trend is not None and not trend.models[1].regression
    assert "not scored" in trend.models[1].statement
    nothing = _report("nightly-2026-11-04", {"m": 0.8})
    nothing.models[0].retrieval = None
    assert build_trend(store, nothing, 7) is None


# -- robustness -----------------------------------------------------------------------------


def test_corrupt_and_old_schema_reports_are_left_out_with_a_note(store: ObjectStore) -> None:
    _nights(store, [0.80, 0.80])  # 11-01, 11-02
    store.put("reports/nightly-2026-11-03/0001/report.json", b"\x00{not json")
    old = json.loads(_report("nightly-2026-11-04", {"m": 0.1}).to_json())
    del old["protocol"]["headline_k"]
    store.put("reports/nightly-2026-11-04/0001/report.json", json.dumps(old).encode())
    other = json.loads(_report("nightly-2026-11-05", {"m": 0.1}).to_json())
    other["schema"] = "someone.else"
    store.put("reports/nightly-2026-11-05/0001/report.json", json.dumps(other).encode())
    moved = json.loads(_report("nightly-2026-11-06", {"m": 0.1}).to_json())
    moved["batch_id"] = "nightly-2026-10-01"
    store.put("reports/nightly-2026-11-06/0001/report.json", json.dumps(moved).encode())
    trend = build_trend(store, _report("nightly-2026-11-07", {"m": 0.5}), 7)
    assert trend is not None
    (mt,) = trend.models
    assert mt.baseline_n == 2 and mt.regression
    notes = "\n".join(trend.notes)
    for day in ("03", "04", "05", "06"):
        assert f"nightly-2026-11-{day}/0001 left out: unreadable" in notes
    assert "nightly-2026-11-03/0001 left out: unreadable (not JSON" in notes
    assert "protocol.headline_k" in notes and "someone.else" in notes


class BrokenListing(CountingStore):
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        raise StoreError("cannot list s3://user:secret@bucket/reports")


class BrokenReads(CountingStore):
    def get(self, key: str) -> bytes:
        raise StoreError(f"no object {key!r}")


def test_a_store_that_fails_never_fails_the_evaluation(store: ObjectStore) -> None:
    _nights(store, [0.8, 0.8, 0.8])
    tonight = _report("nightly-2026-11-04", {"m": 0.1})
    trend = build_trend(BrokenListing(store), tonight, 7)
    assert trend is not None and trend.earlier_batches == [] and not trend.models[0].regression
    assert "could not be listed" in trend.notes[0] and "secret" not in trend.notes[0]
    trend = build_trend(BrokenReads(store), tonight, 7)
    assert trend is not None and len(trend.notes) == 3 and not trend.models[0].regression


def test_the_trend_round_trips_in_the_report_json(store: ObjectStore) -> None:
    _nights(store, [0.8, 0.8])
    report = _report("nightly-2026-11-03", {"m": 0.5})
    report.trend = build_trend(store, report, 7)
    again = Report.model_validate_json(report.to_json())
    assert again.trend == report.trend and again.trend is not None
    assert again.trend.regressions == ["m"]


# -- Prometheus gauges ----------------------------------------------------------------------


def _value(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def test_metric_labels_come_from_the_headline_k_and_the_kmetrics_fields() -> None:
    assert metric_label("mv_macro_f1", 5) == "mv5_macro_f1"
    assert metric_label("mv_accuracy", 3) == "mv3_accuracy"
    assert metric_label("acc_at_k", 5) == "acc5"
    assert metric_label("map_at_k", 10) == "map10"


def test_gauges_carry_quality_ci_baseline_and_regression(store: ObjectStore) -> None:
    _nights(store, [0.80, 0.80, 0.80], model="gauge-a")
    report = _report("nightly-2026-11-04", {"gauge-a": 0.70, "gauge-b": 0.9})
    report.trend = build_trend(store, report, 7)
    export_gauges(report)
    a = {"series": "nightly-", "model": "gauge-a"}
    assert _value("kiban_quality", **a, metric="mv5_macro_f1") == pytest.approx(0.70)
    assert _value("kiban_quality_ci_low", **a, metric="mv5_macro_f1") == pytest.approx(0.68)
    assert _value("kiban_quality_ci_high", **a, metric="mv5_macro_f1") == pytest.approx(0.72)
    assert _value("kiban_quality", **a, metric="mv5_accuracy") == pytest.approx(0.85)
    assert _value("kiban_quality", **a, metric="acc5") == pytest.approx(0.9)
    assert _value("kiban_quality", **a, metric="map5") == pytest.approx(0.7)
    assert _value("kiban_quality", **a, metric="mv5_weighted_f1") == pytest.approx(0.84)
    assert _value("kiban_quality_ci_low", **a, metric="mv5_weighted_f1") is None
    assert _value("kiban_quality_baseline", **a, metric="mv5_macro_f1") == pytest.approx(0.80)
    assert _value("kiban_quality_regression", **a) == 1.0
    b = {"series": "nightly-", "model": "gauge-b"}
    assert _value("kiban_quality_regression", **b) == 0.0  # no history: not flagged
    assert _value("kiban_quality_baseline", **b, metric="mv5_macro_f1") is None
    stamp = _value("kiban_last_evaluation_timestamp_seconds", series="nightly-")
    assert stamp == pytest.approx(1795834800.0)  # 2026-11-28T03:00:00Z

    # the next night recovers: the flag goes down
    _write(store, report)
    better = _report("nightly-2026-11-05", {"gauge-a": 0.80, "gauge-b": 0.9})
    better.trend = build_trend(store, better, 7)
    export_gauges(better)
    assert _value("kiban_quality_regression", **a) == 0.0


def test_gauge_labels_never_carry_a_batch_id(store: ObjectStore) -> None:
    _nights(store, [0.8, 0.8], model="gauge-c")
    for batch in ("nightly-2026-11-03", "run-550e8400-e29b-41d4-a716-446655440000", "adhoc"):
        report = _report(batch, {"gauge-c": 0.8})
        report.trend = build_trend(store, report, 7)
        export_gauges(report)
    values = {
        value
        for family in REGISTRY.collect()
        if family.name.startswith(("kiban_quality", "kiban_last_evaluation"))
        for sample in family.samples
        for value in sample.labels.values()
    }
    assert "gauge-c" in values and "nightly-" in values and "none" in values
    assert not any("2026" in v or "550e8400" in v or v == "adhoc" for v in values)
    # a one-off id ending in digits is "none", not a series label of its own
    none = {"series": "none", "model": "gauge-c", "metric": "mv5_macro_f1"}
    assert _value("kiban_quality", **none) == pytest.approx(0.8)
    assert _value("kiban_quality_regression", series="none", model="gauge-c") is None


def test_an_undefined_value_removes_the_previous_nights_sample(store: ObjectStore) -> None:
    labels = {"series": "none", "model": "gauge-d", "metric": "mv5_macro_f1"}
    export_gauges(_report("adhoc", {"gauge-d": 0.6}))
    assert _value("kiban_quality", **labels) == pytest.approx(0.6)
    export_gauges(_report("adhoc", {"gauge-d": None}))
    assert _value("kiban_quality", **labels) is None
    assert _value("kiban_quality", **{**labels, "metric": "acc5"}) == pytest.approx(0.9)


def test_export_gauges_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    report = _report("adhoc", {"gauge-e": 0.6})
    report.created_at = "not a date"
    export_gauges(report)  # falls back to now
    assert (_value("kiban_last_evaluation_timestamp_seconds", series="none") or 0) > 0
    broken = report.model_copy(update={"models": None})
    export_gauges(broken)
    assert "quality gauges of adhoc/0001 not exported" in caplog.text
