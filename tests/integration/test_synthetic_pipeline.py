"""A synthetic:// source through the real pipeline, embedded and distributed: ingest validates
every generated image, the pretrained EfficientNet-Lite0 (ONNX Runtime) encodes them, Qdrant
local mode indexes them and the evaluation reports. The bytes of a key never change, so an
independent ingest of the same URI — in another home, or by a Celery ingest worker in
another process — writes the same records byte for byte, and the metrics agree."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kiban.context import Context
from kiban.messages import IngestBatch
from kiban.models.registry import publish
from kiban.pipeline import run_batch
from kiban.records import batch_prefix, read_batch_info, read_records
from kiban.settings import Settings, use_settings
from kiban.store import open_store
from kiban.tasks import close_vector_indexes
from kiban_cli.stack import LocalStack
from kiban_ingest.ingest import ingest_batch
from tests.integration.stack_fixtures import running_stack, stack_settings

pytestmark = pytest.mark.integration

SOURCE = "synthetic://textures?n=60&classes=3&size=32"
RECORDS = f"{batch_prefix('synthetic')}/records.jsonl"


def _metrics(report: dict[str, Any]) -> list[tuple[int, float, float]]:
    (section,) = report["models"]
    return [
        (m["k"], m["mv_accuracy"]["value"], m["map_at_k"]["value"])
        for m in section["retrieval"]["metrics"]
    ]


@pytest.fixture(scope="module")
def embedded(
    effnet_lite0: tuple[Any, Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[dict[str, Any], bytes]:
    """The embedded run: its report and its records.jsonl."""
    home = tmp_path_factory.mktemp("embedded")
    settings = Settings(
        home=home,
        mode="embedded",
        chunk_size=16,
        store_uri=(home / "store").as_uri(),
        s3_endpoint_url=None,
        qdrant_path=home / "qdrant",
    )
    store = open_store(settings.resolved_store_uri, create=True)
    publish(store, *effnet_lite0)
    try:
        report = run_batch(settings, SOURCE, ["effnet-lite0"], batch_id="synthetic")
    finally:
        close_vector_indexes()
        use_settings(None)
    info = read_batch_info(store, "synthetic")
    assert info.classes == ["c000", "c001", "c002"] and info.label_source == "folders"
    assert info.source == "synthetic://textures?n=60&classes=3&size=32&format=jpeg&seed=0"
    records = read_records(store, "synthetic")
    assert [r.key for r in records][:3] == [f"c000/0000000{i}.jpg" for i in range(3)]
    assert len({r.sha256 for r in records}) == 60
    return report, store.get(RECORDS)


def test_run_batch_embedded_on_a_synthetic_source(
    embedded: tuple[dict[str, Any], bytes], tmp_path: Path
) -> None:
    report, records = embedded
    batch = report["batch"]
    assert (batch["n_accepted"], batch["n_quarantined"], batch["n_duplicates"]) == (60, 0, 0)
    (section,) = report["models"]
    assert section["images_encoded"] == 60
    # textures of three families: a pretrained CNN tells them apart far above chance (1/3)
    first = section["retrieval"]["metrics"][0]
    assert first["k"] == 1
    assert first["mv_accuracy"]["value"] > 0.6, json.dumps(first["classification"])

    # an independent ingest of the same URI in another home: identical records, byte for byte
    other = Settings(home=tmp_path / "other", mode="embedded")
    use_settings(other)
    try:
        ctx = Context.from_settings(other)
        msg = IngestBatch(batch_id="synthetic", source=SOURCE, chunk_size=16)
        assert ingest_batch(msg, ctx).n_accepted == 60
        assert ctx.store.get(RECORDS) == records
    finally:
        use_settings(None)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    with running_stack(
        tmp_path_factory.mktemp("stack"),
        [("ingest", "ingest"), ("encoder", "encoder"), ("indexer", "indexer")],
        extra_env={"KIBAN_CHUNK_SIZE": "16", "KIBAN_THREADS": "1"},
    ) as stack:
        yield stack


def test_run_batch_distributed_on_a_synthetic_source(
    stack: LocalStack,
    embedded: tuple[dict[str, Any], bytes],
    effnet_lite0: tuple[Any, Path],
    tmp_path: Path,
) -> None:
    """Celery workers in their own processes (allowed by default: it reads nothing)."""
    settings = stack_settings(stack, tmp_path / "client")
    assert settings.mode == "distributed" and settings.allow_synthetic_sources
    store = open_store(settings.resolved_store_uri, settings.s3_endpoint_url, create=True)
    publish(store, *effnet_lite0)
    report = run_batch(settings, SOURCE, ["effnet-lite0"], batch_id="synthetic", timeout=300)
    assert report["batch"]["n_accepted"] == 60 and report["batch"]["n_quarantined"] == 0
    assert store.get(RECORDS) == embedded[1]
    assert _metrics(report) == _metrics(embedded[0])
