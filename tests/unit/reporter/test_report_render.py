"""The Markdown report is rendered from a Report object alone, every section, numbers from JSON."""

from __future__ import annotations

import json

import numpy as np

from kiban.messages import EvaluationProtocol
from kiban_reporter.ann_check import AnnCheck
from kiban_reporter.cost import CostSummary, project_cost
from kiban_reporter.decision import decide
from kiban_reporter.decision_schema import LeakageCheck
from kiban_reporter.markdown import render_markdown
from kiban_reporter.metrics import compare, evaluate
from kiban_reporter.protocols import EvalRow, plan_protocol
from kiban_reporter.report import (
    REPORT_SCHEMA_VERSION,
    BatchSummary,
    ModelSection,
    Protocol,
    Report,
)


def _report() -> Report:
    rng = np.random.default_rng(0)
    n = 60
    labels = [f"c{i % 3}" for i in range(n)]
    rows = [EvalRow("b", f"k{i:03d}", f"s{i:03d}", labels[i], f"g{i % 12}") for i in range(n)]
    plan = plan_protocol(EvaluationProtocol(name="split", query_sample=10, seed=1), rows, "b")
    centres = rng.standard_normal((3, 16))
    sections, results = [], {}
    for name, noise, s1k in (("small", 0.5, 8.1), ("big", 3.0, 81.0)):
        v = centres[[i % 3 for i in range(n)]] + noise * rng.standard_normal((n, 16))
        v = (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)
        res = evaluate(
            v,
            labels,
            plan.groups,
            query_mask=plan.query_mask,
            candidate_mask=plan.candidate_mask,
            bootstrap=100,
            name=name,
        )
        results[name] = res
        sections.append(
            ModelSection(
                name=name,
                family="domain" if name == "small" else "foundation",
                source="test",
                architecture="x",
                weights="w",
                pretrained=True,
                embedding_dim=16,
                params=1_234_567,
                model_sha256="0" * 64,
                parity_min_cosine=0.999999,
                images_encoded=n,
                encode_failures=[],
                retrieval=res,
                cost=CostSummary(
                    images=n,
                    provider="CPUExecutionProvider",
                    threads=2,
                    batch_size=32,
                    device="cpu (Test CPU)",
                    encode_images_per_second=1000 / s1k,
                    inference_images_per_second=200.0,
                    seconds_per_1k=s1k,
                    price_per_hour=None,
                    currency="USD",
                    cost_per_1k=None,
                    bytes_per_vector=64,
                    params=1_234_567,
                    model_file_bytes=10,
                    p50_batch_seconds=0.4321,
                    cores=2,
                    device_seconds_per_1k=2 * s1k,
                    devices=["cpu (Test CPU)"],
                    storage_bytes_per_million=2_345_678_000,
                    projection=project_cost(1_000_000, s1k, 2 * s1k, None, "USD"),
                ),
                ann_check=AnnCheck(
                    status="ok",
                    k=5,
                    n_queries=10,
                    seed=0,
                    recall_at_k=0.9876,
                    recall_min=0.8,
                    n_queries_full_recall=9,
                    latency_ms_p50=1.234,
                    latency_ms_p95=4.567,
                    latency_ms_mean=2.0,
                    qdrant_calls_per_query=1.0,
                    scope="payload batch in ['b']",
                    n_candidates_not_indexed=0,
                    index={
                        "index": "hnsw",
                        "hnsw_m": 16,
                        "hnsw_ef_construct": 100,
                        "points_count": 60,
                        "mode": "server",
                    },
                ),
            )
        )
    pair = compare(results["small"], results["big"])
    verdict = next(d.verdict for d in pair.differences if d.key == "mv_macro_f1" and d.k == 5)
    decision = decide(sections, [pair], 5, 0.01)
    return Report(
        version="0003",
        request_id="r",
        batch_id="b",
        created_at="2026-01-01T00:00:00+00:00",
        batch=BatchSummary(
            source="file:///x",
            manifest=None,
            label_source="manifest",
            n_listed=61,
            n_accepted=60,
            n_quarantined=1,
            n_duplicates=0,
            labelled=True,
            classes=["c0", "c1", "c2"],
            quarantine_reasons={"truncated": 1},
            quarantine=[{"key": "bad.jpg", "reason": "truncated: x", "sha256": None}],
        ),
        protocol=Protocol(
            name=plan.name,
            requested=plan.requested,
            exclusion=plan.exclusion,
            ks=[1, 3, 5],
            headline_k=5,
            bootstrap_resamples=100,
            seed=1,
            confidence=0.95,
            n_images=n,
            n_queries=plan.n_queries,
            n_candidates=plan.n_candidates,
            query_split="test",
            split=plan.split,
            query_sample=plan.sample,
            ann_check_queries=10,
        ),
        models=sections,
        comparisons=[pair],
        verdicts=[verdict],
        decision=decision,
        leakage=[
            LeakageCheck(
                model="small", training_images=500, overlap_queries=7, overlap_candidates=31
            )
        ],
        warnings=["something to know"],
    )


def test_markdown_renders_every_section_from_the_report() -> None:
    report = _report()
    assert report.schema_version == REPORT_SCHEMA_VERSION == 3
    md = render_markdown(report)
    for heading in (
        "# kiban report — batch `b` (version 0003)",
        "## Protocol",
        "## Comparison",
        "## Verdicts",
        "## Paired differences (A − B)",
        "## Served index (Qdrant) vs exact search",
        "## Models",
        "### small",
        "### big",
        "Per class, MV@5",
        "Confusion matrix, MV@5",
        "## Quarantine",
        "## Warnings",
        "## Decision",
        "## Cost",
        "## Leakage check",
    ):
        assert heading in md, heading
    # the decision is the report's first line after the title
    assert report.decision is not None
    assert md.splitlines()[2] == f"**Decision:** {report.decision.line}"
    assert report.decision.line.startswith("Run small")  # better and 10× cheaper
    for statement in report.decision.non_inferiority:
        assert statement.statement in md
    assert "| small | cpu (Test CPU) | CPUExecutionProvider | 2 | 32 | 0.432 |" in md
    assert "| 16.2 core-seconds |" in md and "2.35 GB" in md
    assert "Projection for 1,000,000 images a night" in md
    assert "| small | 2.25 | 4.50 | – | – |" in md  # 1e6 × 8.1 s / 1k / 3600 = 2.25 h
    assert "| small | 500 | 7 | 31 |" in md
    assert "query sample: 10 of" in md and "split `test`" in md
    assert "0.988 @5" in md and "HNSW m=16, ef_construct=100" in md and "4.57" in md
    assert report.verdicts[0] in md
    small = report.models[0].retrieval
    assert small is not None
    est = small.at(5).mv_macro_f1
    assert est.value is not None and est.ci_low is not None and est.ci_high is not None
    assert f"{est.value:.3f} [{est.ci_low:.3f}, {est.ci_high:.3f}]" in md
    classification = small.at(5).classification
    assert classification is not None
    for pc in classification.per_class:
        assert f"| {pc.label} | {pc.precision:.3f} | {pc.recall:.3f}" in md
    for d in report.comparisons[0].differences:
        assert f"| small | big | {d.metric} | {d.value_a:.3f} | {d.value_b:.3f} |" in md


def test_report_round_trips_through_json_and_renders_the_same() -> None:
    report = _report()
    data = json.loads(report.to_json())
    assert data["schema"] == "kiban.report" and data["schema_version"] == 3
    assert data["protocol"]["split"]["source"] == "hash"
    assert data["protocol"]["query_sample"]["size"] == 10
    assert data["models"][0]["ann_check"]["recall_at_k"] == 0.9876
    again = Report.model_validate(data)
    assert render_markdown(again) == render_markdown(report)
    assert json.loads(again.to_json()) == data


def test_typed_sections_write_the_metrics_engine_json() -> None:
    """retrieval / comparisons are typed, but the JSON is the engine's summary() dicts."""
    report = _report()
    data = json.loads(report.to_json())
    for section, written in zip(report.models, data["models"], strict=True):
        assert section.retrieval is not None
        assert written["retrieval"] == section.retrieval.summary()
        assert "per_query" not in written["retrieval"]
    assert data["comparisons"] == [pair.summary() for pair in report.comparisons]
    unscored = report.models[0].model_copy(update={"retrieval": None})
    assert json.loads(unscored.model_dump_json())["retrieval"] is None
    schema = Report.model_json_schema()  # the per-query arrays are not part of the schema
    assert "per_query" not in schema["$defs"]["RetrievalResult"]["properties"]


def test_unscored_and_failed_ann_check_render() -> None:
    report = _report()
    failed = AnnCheck(status="failed", reason="ConnectionError: refused", k=5, seed=0)
    models = [
        report.models[0].model_copy(update={"retrieval": None, "ann_check": failed}),
    ]
    md = render_markdown(
        report.model_copy(update={"models": models, "comparisons": [], "verdicts": []})
    )
    assert "_not scored_" in md and "ConnectionError: refused" in md
    unscored = report.model_copy(
        update={"models": models, "comparisons": [], "verdicts": [], "decision": None}
    )
    assert render_markdown(unscored).splitlines()[2].startswith("**Decision:** none")
    assert "| small | failed | 0 | – |" in md
