"""`kiban run` against a real S3 server (SeaweedFS) for source and store, and on the real
NEU surface-defect images: the same task functions as the embedded default."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kiban.pipeline import run_batch
from kiban.records import read_batch_info
from kiban.settings import Settings
from kiban.store import open_store
from kiban.tasks import vector_index
from kiban_cli.synthetic import generate_texture_dataset, problem_files

pytestmark = pytest.mark.integration


def test_run_with_s3_source_and_s3_store(
    s3_server, s3_bucket: str, publish_models, tmp_path: Path
) -> None:
    images = tmp_path / "images"
    generate_texture_dataset(images, n_classes=4, per_class=10, size=96, groups_per_class=5)
    for problem in problem_files():
        if problem.expect in ("truncated or corrupt image data", "empty file (0 bytes)"):
            (images / f"bad-{problem.name}").write_bytes(problem.data)
    s3_server.upload_folder(images, s3_bucket, "night/2026-11-28")

    settings = Settings(
        home=tmp_path / "home",
        store_uri=f"s3://{s3_bucket}/kiban",
        s3_endpoint_url=s3_server.endpoint_url,
        chunk_size=16,
    )
    store = open_store(settings.resolved_store_uri, s3_server.endpoint_url, create=True)
    models = publish_models(store)
    source = f"s3://{s3_bucket}/night/2026-11-28"
    report = run_batch(
        settings, source, models, manifest=f"{source}/manifest.csv", batch_id="night-1"
    )

    assert report["protocol"]["name"] == "leave-one-group-out"
    assert report["batch"]["n_accepted"] == 40
    assert report["batch"]["n_quarantined"] == 2
    assert {m["name"] for m in report["models"]} == set(models)
    # everything landed in the bucket, nothing on local disk but caches and Qdrant
    keys = {o["Key"] for o in s3_server.client().list_objects_v2(Bucket=s3_bucket)["Contents"]}
    assert "kiban/batches/night-1/records.jsonl" in keys
    assert "kiban/reports/night-1/0001/report.json" in keys
    assert any(k.startswith("kiban/embeddings/effnet-lite0/night-1/chunk-00002") for k in keys)
    assert not (tmp_path / "home" / "store").exists()
    assert vector_index(settings).count("effnet-lite0", "night-1") == 40

    # idempotent: the same trigger again adds no point and reuses the report
    again = run_batch(
        settings, source, models, manifest=f"{source}/manifest.csv", batch_id="night-1"
    )
    assert again["version"] == report["version"]
    for model in models:
        assert vector_index(settings).count(model, "night-1") == 40


def test_neu_surface_defects(neu_dir: Path, publish_models, tmp_path: Path) -> None:
    """All 1,800 NEU images through the pretrained CNN: a real domain image set."""
    settings = Settings(home=tmp_path / "home", chunk_size=512)
    store = open_store(settings.resolved_store_uri, create=True)
    publish_models(store)
    report = run_batch(settings, neu_dir.as_uri(), ["effnet-lite0"], batch_id="neu")
    info = read_batch_info(store, "neu")
    assert info.classes == [
        "crazing",
        "inclusion",
        "patches",
        "pitted_surface",
        "rolled-in_scale",
        "scratches",
    ]
    assert info.n_accepted + info.n_duplicates + info.n_quarantined == info.n_listed == 1800
    (model,) = report["models"]
    at1 = next(m for m in model["retrieval"]["metrics"] if m["k"] == 1)
    # ImageNet features retrieve steel-defect classes well above chance (1/6)
    assert at1["mv_accuracy"]["value"] > 0.8
    assert report["protocol"]["name"] == "leave-one-out"
    json.dumps(report)
