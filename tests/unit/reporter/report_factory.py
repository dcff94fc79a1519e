"""Reports for renderer and schema tests: real metrics (``evaluate`` / ``compare``) on synthetic
vectors, with every v3 section (decision, learning curves, trend, leakage, cost projection)
filled in by hand, and labels / names that may be hostile."""

from __future__ import annotations

from itertools import combinations

import numpy as np

from kiban.models.card import ModelCard, Preprocessing
from kiban.progress import ChunkFailure
from kiban_reporter.ann_check import AnnCheck
from kiban_reporter.cost import CostSummary
from kiban_reporter.decision_schema import (
    CostProjection,
    CurvePoint,
    Decision,
    LeakageCheck,
    LearningCurve,
    LearningCurves,
    ModelTrend,
    NonInferiority,
    ParetoPoint,
    Trend,
    TrendPoint,
)
from kiban_reporter.metrics import compare, evaluate
from kiban_reporter.report import BatchSummary, ModelSection, Protocol, Report

HOSTILE = [
    "<script>alert(1)</script>",
    "a|b",
    "[/]",
    "$x^2$",
    "&amp;",
    '"quotes"',
    "x" * 300,
    "日本語-ünïcødé-🙂",
    "ctl\x01\x7f-char",
]


def card(dim: int = 512) -> ModelCard:
    """A minimal model card for the cost arithmetic: only ``embedding_dim`` varies."""
    return ModelCard(
        name="m",
        family="domain",
        source="x",
        architecture="x",
        weights="none",
        pretrained=False,
        input_size=224,
        preprocessing=Preprocessing(resize_shorter=224, crop=224, mean=[0.5] * 3, std=[0.5] * 3),
        embedding_dim=dim,
        params=10,
        file_size=100,
        sha256="0" * 64,
        opset=17,
        exported_at="2026-11-28T00:00:00Z",
    )


def build_report(
    labels: list[str] | None = None,
    model_names: list[str] | None = None,
    per_class: int = 6,
    costs: list[float] | None = None,
    bootstrap: int = 50,
    batch_id: str = "nightly-2026-01-03",
    v3: bool = True,
) -> Report:
    """A scored report of ``len(model_names)`` models on ``len(labels)`` classes."""
    labels = labels or ["crazing", "inclusion", "patches"]
    names = model_names or ["small-cnn", "big-clip"]
    costs = costs or [0.01 * 10**i for i in range(len(names))]  # a decade apart: log-x
    rng = np.random.default_rng(0)
    n = len(labels) * per_class
    y = [labels[i % len(labels)] for i in range(n)]
    groups = [f"g{i % (2 * len(labels))}" for i in range(n)]
    centres = rng.standard_normal((len(labels), 16))
    sections, results = [], {}
    for j, name in enumerate(names):
        v = centres[[i % len(labels) for i in range(n)]] + (0.6 + j) * rng.standard_normal((n, 16))
        v = (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)
        res = evaluate(v, y, groups, bootstrap=bootstrap, seed=1, name=name)
        results[name] = res
        cost = CostSummary(
            images=n,
            provider="CPUExecutionProvider",
            threads=2,
            batch_size=32,
            device="cpu",
            encode_images_per_second=100.0 / (j + 1),
            inference_images_per_second=150.0 / (j + 1),
            seconds_per_1k=10.0 * (j + 1),
            price_per_hour=0.5,
            currency="USD",
            cost_per_1k=costs[j],
            bytes_per_vector=64,
            params=1_000_000 * (j + 1),
            macs_per_image=2_000_000_000,
            model_file_bytes=4_000_000,
            device_seconds_per_1k=20.0 * (j + 1),
            storage_bytes_per_million=80_000_000,
            projection=(
                CostProjection(
                    volume_images_per_night=250_000,
                    hours_per_night=0.7 * (j + 1),
                    device_hours_per_night=1.4 * (j + 1),
                    price_per_night=costs[j] * 250,
                    price_per_month=costs[j] * 250 * 30,
                    currency="USD",
                )
                if v3
                else None
            ),
        )
        sections.append(
            ModelSection(
                name=name,
                family="domain" if j == 0 else "foundation",
                source="test",
                architecture="densenet121",
                weights="imagenet",
                pretrained=True,
                embedding_dim=16,
                params=1_000_000 * (j + 1),
                model_sha256="0" * 64,
                parity_min_cosine=0.999999,
                images_encoded=n,
                encode_failures=[(labels[0] + "/bad.jpg", "decode failed: " + labels[0])],
                retrieval=res,
                cost=cost,
                ann_check=AnnCheck(
                    status="ok", k=5, n_queries=10, seed=0, recall_at_k=1.0, index={"index": "flat"}
                ),
            )
        )
    pairs = [compare(results[a], results[b]) for a, b in combinations(names, 2)]
    verdicts = [
        next(d.verdict for d in p.differences if d.key == "mv_macro_f1" and d.k == 5) for p in pairs
    ]
    report = Report(
        version="0002",
        request_id="req-1",
        batch_id=batch_id,
        created_at="2026-01-03T00:00:00+00:00",
        batch=BatchSummary(
            source="file:///data/" + labels[0],
            manifest=None,
            label_source="folders",
            n_listed=n + 1,
            n_accepted=n,
            n_quarantined=1,
            n_duplicates=0,
            labelled=True,
            classes=sorted(labels),
            quarantine_reasons={"truncated: " + labels[0]: 1},
            quarantine=[{"key": labels[0] + "/q.jpg", "reason": "truncated " + labels[0]}],
        ),
        protocol=Protocol(
            name="leave-one-group-out",
            requested="auto",
            exclusion="same group",
            ks=[1, 3, 5],
            headline_k=5,
            bootstrap_resamples=bootstrap,
            seed=1,
            confidence=0.95,
            n_images=n,
            n_queries=n,
            n_candidates=n,
        ),
        models=sections,
        comparisons=pairs,
        verdicts=verdicts,
        failed_chunks=[ChunkFailure(model=names[0], chunk=3, task="encode", reason=labels[0])],
        warnings=[f"{names[0]}: something about {labels[0]}"],
    )
    if not v3:
        return report
    return report.model_copy(
        update={
            "decision": _decision(names, costs),
            "learning_curves": _curves(names),
            "trend": _trend(names, batch_id),
            "leakage": [
                LeakageCheck(
                    model=names[0], training_images=500, overlap_queries=2, overlap_candidates=7
                )
            ],
        }
    )


def _decision(names: list[str], costs: list[float]) -> Decision:
    pareto = [
        ParetoPoint(
            model=name,
            quality=0.8 - 0.1 * j,
            quality_ci_low=0.75 - 0.1 * j,
            quality_ci_high=0.85 - 0.1 * j,
            cost=costs[j],
            on_front=j == 0,
            dominated_by=[] if j == 0 else [names[0]],
        )
        for j, name in enumerate(names)
    ]
    ni = [
        NonInferiority(
            cheaper=names[0],
            reference=other,
            metric="MV@5 macro-F1",
            margin=0.02,
            difference=0.1,
            ci_low=0.05,
            ci_high=0.15,
            cost_ratio=0.1,
            cost_comparable=True,
            outcome="better",
            statement=f"{names[0]} is better than {other} at a tenth of the cost",
        )
        for other in names[1:]
    ]
    return Decision(
        line=f"Run {names[0]}: as good as {names[-1]} at 1/10 of the cost.",
        recommended=names[0],
        metric="MV@5 macro-F1",
        margin=0.02,
        cost_basis="price per 1k images",
        currency="USD",
        pareto=pareto,
        non_inferiority=ni,
        notes=[f"note about {names[-1]}"],
    )


def _curves(names: list[str]) -> LearningCurves:
    sizes = [2, 5, 10]
    curves = []
    for j, name in enumerate(names):
        pts = [
            CurvePoint(
                per_class=s,
                candidates=float(s * 3),
                value=0.5 + 0.03 * s - 0.05 * j,
                ci_low=0.45 + 0.03 * s - 0.05 * j,
                ci_high=0.55 + 0.03 * s - 0.05 * j,
                repeats=5,
            )
            for s in sizes
        ]
        pts.append(
            CurvePoint(
                per_class=None, candidates=40.0, value=0.85, ci_low=None, ci_high=None, repeats=1
            )
        )
        curves.append(LearningCurve(model=name, points=pts, flattened=j == 0))
    return LearningCurves(
        metric="MV@5 macro-F1",
        sizes=sizes,
        repeats=5,
        seed=0,
        interval="percentile over repeats",
        curves=curves,
        verdict_may_change=False,
        statement="The curves flatten: more labels would not change the winner.",
        seconds=1.5,
    )


def _trend(names: list[str], batch_id: str) -> Trend:
    nights = [f"nightly-2026-01-0{d}" for d in (1, 2)] + [batch_id]
    models = []
    for j, name in enumerate(names):
        pts = [
            TrendPoint(
                batch_id=b,
                report_version="0001",
                created_at=f"2026-01-0{i + 1}T00:00:00+00:00",
                value=0.8 - 0.05 * j - (0.2 if (j == 1 and i == 2) else 0.0),
                ci_low=0.75 - 0.05 * j,
                ci_high=0.85 - 0.05 * j,
                images_per_second=100.0,
            )
            for i, b in enumerate(nights)
        ]
        models.append(
            ModelTrend(
                model=name,
                points=pts,
                baseline=0.8 - 0.05 * j,
                baseline_n=2,
                regression=j == 1,
                statement=f"{name}: {'dropped' if j == 1 else 'steady'}",
            )
        )
    return Trend(
        series="nightly-",
        metric="MV@5 macro-F1",
        window=7,
        rule="tonight below the baseline CI",
        models=models,
        regressions=[names[1]] if len(names) > 1 else [],
    )
