"""Deterministic point IDs, batch IDs, and the cost arithmetic."""

from __future__ import annotations

import uuid

import pytest
from report_factory import card

from kiban.pipeline import default_batch_id
from kiban.shards import ShardMeta
from kiban.vectors import point_id
from kiban_reporter.cost import summarise_cost


def test_point_id_is_deterministic_per_image_and_model() -> None:
    sha = "ab" * 32
    assert point_id(sha, "m1") == point_id(sha, "m1")
    assert point_id(sha, "m1") != point_id(sha, "m2")
    assert point_id(sha, "m1") != point_id("cd" * 32, "m1")
    uuid.UUID(point_id(sha, "m1"))  # a valid Qdrant point id


def test_default_batch_id_depends_on_source_and_manifest_only() -> None:
    a = default_batch_id("s3://bucket/night/2026-11-28/", None)
    assert a == default_batch_id("s3://bucket/night/2026-11-28/", None)
    assert a.startswith("2026-11-28-")
    assert a != default_batch_id("s3://bucket/night/2026-11-28/", "s3://bucket/m.csv")


def _meta(**timing: float | int | str) -> ShardMeta:
    return ShardMeta(
        model="m",
        model_sha256="0" * 64,
        batch_id="b",
        chunk=0,
        failures=[],
        embedding_dim=512,
        **timing,  # type: ignore[arg-type]
    )


def test_cost_per_thousand_images() -> None:
    timings = [
        _meta(
            n_images=300,
            wall_seconds=10.0,
            inference_seconds=8.0,
            provider="CPUExecutionProvider",
            threads=2,
            batch_size=32,
        ),
        _meta(
            n_images=100,
            wall_seconds=10.0,
            inference_seconds=2.0,
            provider="CPUExecutionProvider",
            threads=2,
            batch_size=32,
        ),
    ]
    cost = summarise_cost(timings, card(512), price_per_hour=3.6, currency="EUR")
    assert cost.images == 400
    assert cost.encode_images_per_second == pytest.approx(20.0)
    assert cost.inference_images_per_second == pytest.approx(40.0)
    assert cost.seconds_per_1k == pytest.approx(50.0)
    assert cost.cost_per_1k == pytest.approx(3.6 * 50 / 3600)
    assert cost.bytes_per_vector == 2048
    # shards written before the device was recorded: said so, never the reporter's own label
    assert cost.device == "unknown (shard written before kiban recorded the device)"


def test_cost_without_price_or_images_is_none_not_nan() -> None:
    cost = summarise_cost([], card(), price_per_hour=None, currency="USD")
    assert cost.encode_images_per_second is None and cost.cost_per_1k is None
