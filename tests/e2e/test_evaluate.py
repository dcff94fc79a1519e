"""`kiban evaluate` end to end: every protocol re-evaluates stored embeddings into a new report
version (old ones kept), with the ANN check against Qdrant local mode — real ONNX models, real
images, the embedded default."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from kiban.messages import EvaluationProtocol
from kiban.pipeline import evaluate_stored, run_batch
from kiban.records import read_records, report_versions
from kiban.settings import Settings, load_settings
from kiban.store import ObjectStore, open_store
from kiban_cli.main import app
from kiban_cli.synthetic import generate_texture_dataset

NEU_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "datasets" / "neu-det"
KS = [1, 3, 5]


def _dataset(root: Path, seed: int) -> Path:
    return generate_texture_dataset(root, per_class=8, size=64, seed=seed, groups_per_class=4)


def _check_scored(report: dict[str, Any], models: list[str], n_queries: int) -> None:
    assert report["schema"] == "kiban.report" and report["schema_version"] == 3
    assert report["protocol"]["definitions"] == "docs/report.md#definitions"
    assert [m["name"] for m in report["models"]] == models
    for m in report["models"]:
        r = m["retrieval"]
        assert r["n_queries"] == n_queries
        for km in r["metrics"]:
            for key in ("acc_at_k", "mv_accuracy", "mv_macro_f1", "map_at_k"):
                est = km[key]
                assert 0.0 <= est["value"] <= 1.0
                assert est["ci_low"] <= est["value"] <= est["ci_high"]
            assert 0.0 <= km["mv_weighted_f1"] <= 1.0
            cls = km["classification"]
            assert sum(pc["support"] for pc in cls["per_class"]) == n_queries
            assert sum(map(sum, cls["confusion"]["matrix"])) == n_queries
        ann = m["ann_check"]
        assert ann["status"] == "ok", ann
        assert ann["k"] == max(KS) and ann["n_queries"] > 0
        # local mode is exact brute force: the served top-k is the exact top-k
        assert ann["recall_at_k"] == 1.0 and ann["recall_min"] == 1.0
        assert ann["index"]["mode"] == "local"
        assert ann["index"]["index"].startswith("local mode: exact brute force")
        assert 0 < ann["latency_ms_p50"] <= ann["latency_ms_p95"]
    assert len(report["verdicts"]) == 1 and len(report["comparisons"]) == 1


def _numbers(report: dict[str, Any]) -> Any:
    return (
        [m["retrieval"] for m in report["models"]],
        report["comparisons"],
        report["verdicts"],
        [
            {k: v for k, v in m["ann_check"].items() if not k.startswith("latency")}
            | {"latency_ms_p50": None, "latency_ms_p95": None, "latency_ms_mean": None}
            for m in report["models"]
        ],
    )


def _md(store: ObjectStore, batch: str, version: str) -> str:
    return store.get(f"reports/{batch}/{version}/report.md").decode()


@pytest.fixture
def env(tmp_path: Path, publish_models) -> tuple[Settings, ObjectStore, list[str]]:  # type: ignore[no-untyped-def]
    settings = load_settings()
    store = open_store(settings.resolved_store_uri, create=True)
    return settings, store, publish_models(store)


def test_every_protocol_through_kiban_evaluate(
    env: tuple[Settings, ObjectStore, list[str]], tmp_path: Path
) -> None:
    settings, store, models = env
    a_dir = tmp_path / "a"
    manifest_a = _dataset(a_dir, seed=0)
    first = run_batch(settings, a_dir.as_uri(), models, manifest=manifest_a.as_uri(), batch_id="a")
    n = len(read_records(store, "a"))
    assert n == 48
    assert first["protocol"]["name"] == "leave-one-group-out"
    assert first["protocol"]["requested"] == "auto"
    _check_scored(first, models, n)

    def ev(batch: str, **kw: Any) -> dict[str, Any]:
        proto = EvaluationProtocol(bootstrap=200, ann_check_queries=15, **kw)
        return evaluate_stored(settings, batch, models, KS, proto)

    loo = ev("a", name="leave-one-out")
    assert loo["version"] == "0002" and loo["protocol"]["name"] == "leave-one-out"
    assert loo["protocol"]["n_queries"] == loo["protocol"]["n_candidates"] == n
    _check_scored(loo, models, n)
    for m in loo["models"]:
        assert m["retrieval"]["bootstrap_unit"] == "query"
        assert m["retrieval"]["bootstrap_resamples"] == 200

    split = ev("a", name="split", test_fraction=0.3)
    sp = split["protocol"]["split"]
    assert sp["source"] == "hash" and sp["n_groups_across_splits"] == 0
    assert sp["units"]["test"] + sp["units"]["index"] == 24  # 6 classes x 4 lots
    nq, nc = split["protocol"]["n_queries"], split["protocol"]["n_candidates"]
    assert nq + nc == n and nq == sp["images"]["test"] > 0
    _check_scored(split, models, nq)

    sample = ev("a", name="leave-one-group-out", query_sample=12, seed=5)
    qs = sample["protocol"]["query_sample"]
    assert qs["size"] == 12 and qs["population"] == n and qs["seed"] == 5
    assert sum(qs["per_class"].values()) == 12 and len(qs["per_class"]) == 6
    _check_scored(sample, models, 12)

    again = ev("a", name="leave-one-out")
    assert _numbers(again) == _numbers(loo)  # same seed, identical numbers
    assert report_versions(store, "a") == ["0001", "0002", "0003", "0004", "0005"]
    assert json.loads(store.get("reports/a/0002/report.json")) == loo  # old versions kept

    md = _md(store, "a", "0003")
    for heading in ("## Protocol", "## Comparison", "## Verdicts", "## Served index (Qdrant)"):
        assert heading in md
    assert "split `test`" in md and "local mode: exact brute force" in md

    # Tonight's batch (another seed) plus one image already in batch a, against batch a.
    b_dir = tmp_path / "b"
    manifest_b = _dataset(b_dir, seed=1)
    shutil.copy(a_dir / "checker" / "checker-0000.jpg", b_dir / "checker" / "from-a.jpg")
    with manifest_b.open("a") as fh:
        fh.write("checker/from-a.jpg,checker,checker-lot09\n")
    run_batch(settings, b_dir.as_uri(), models, manifest=manifest_b.as_uri(), batch_id="b")
    n_b = len(read_records(store, "b"))
    assert n_b == 49

    result = CliRunner().invoke(
        app,
        [
            "evaluate",
            "--batch",
            "b",
            "--protocol",
            "cross-batch",
            "--ann-check",
            "15",
            "--bootstrap",
            "200",
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    assert "cross-batch" in result.output
    cross = json.loads(store.get("reports/b/0002/report.json"))
    assert cross["protocol"]["name"] == "cross-batch"
    hist = cross["protocol"]["history"]
    assert hist["batches"] == ["a"] and hist["discovered"] is True
    assert hist["n_same_as_query_batch"] == 1 and hist["n_images"] == n - 1
    assert cross["protocol"]["n_queries"] == n_b
    _check_scored(cross, models, n_b)
    for m in cross["models"]:
        assert "payload batch in ['a']" in m["ann_check"]["scope"]

    given = ev("b", name="cross-batch", history_batches=["a", "b", "nope"])
    assert given["protocol"]["history"]["batches"] == ["a"]
    assert any("'nope' does not exist" in w for w in given["warnings"])
    assert any("b is this batch" in w for w in given["warnings"])

    # No earlier batch: a report with a warning, no crash.
    lonely = ev("a", name="cross-batch")
    assert lonely["protocol"]["name"] == "cross-batch"
    assert all(m["retrieval"] is None for m in lonely["models"])
    assert any("no earlier batch" in w for w in lonely["warnings"])


def test_unreachable_qdrant_still_writes_the_report(
    env: tuple[Settings, ObjectStore, list[str]], tmp_path: Path
) -> None:
    settings, store, models = env
    a_dir = tmp_path / "a"
    manifest = _dataset(a_dir, seed=2)
    run_batch(settings, a_dir.as_uri(), models[:1], manifest=manifest.as_uri(), batch_id="q")
    down = settings.model_copy(update={"qdrant_url": "http://127.0.0.1:9"})
    report = evaluate_stored(
        down, "q", models[:1], KS, EvaluationProtocol(name="leave-one-out", bootstrap=50)
    )
    m = report["models"][0]
    assert m["retrieval"]["n_queries"] == 48
    assert m["ann_check"]["status"] == "failed"
    assert any("ANN check failed" in w for w in report["warnings"])


def test_neu_subset_two_models(
    env: tuple[Settings, ObjectStore, list[str]], tmp_path: Path
) -> None:
    if not NEU_DIR.is_dir() or not any(NEU_DIR.glob("*/*.jpg")):
        pytest.skip(f"NEU-DET data set not found at {NEU_DIR} (expected <class>/*.jpg)")
    settings, store, models = env
    subset = tmp_path / "neu"  # 20 images per class, copied to a temp dir (never the repo)
    for cls in sorted(p.name for p in NEU_DIR.iterdir() if p.is_dir()):
        (subset / cls).mkdir(parents=True)
        for path in sorted((NEU_DIR / cls).glob("*.jpg"))[:20]:
            shutil.copy(path, subset / cls / path.name)
    report = run_batch(
        settings,
        subset.as_uri(),
        models,
        batch_id="neu",
        protocol=EvaluationProtocol(bootstrap=200, ann_check_queries=20),
    )
    n = len(read_records(store, "neu"))
    assert n >= 118
    assert report["protocol"]["name"] == "leave-one-out"
    _check_scored(report, models, n)
    split = evaluate_stored(
        settings,
        "neu",
        models,
        KS,
        EvaluationProtocol(name="split", bootstrap=200, ann_check_queries=20),
    )
    assert split["protocol"]["split"]["source"] == "hash"
    _check_scored(split, models, split["protocol"]["n_queries"])
