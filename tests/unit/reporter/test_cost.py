"""Cost measured and projected: latency, device-seconds, storage, projection, devices."""

from __future__ import annotations

import json

import pytest
from report_factory import card

from kiban.records import ImageRecord
from kiban.shards import ShardMeta
from kiban_cli.report_view import project
from kiban_encoder import encode
from kiban_reporter.cost import (
    HNSW_LINK_BYTES,
    UNKNOWN_DEVICE,
    cost_comparable,
    cost_warnings,
    payload_bytes,
    project_cost,
    storage_per_million,
    summarise_cost,
)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


def _meta(
    n: int = 100,
    wall: float = 10.0,
    provider: str = CPU,
    cores: int | None = 4,
    device: str | None = "cpu (AMD EPYC)",
    calls: list[float] | None = None,
) -> ShardMeta:
    return ShardMeta(
        model="m",
        model_sha256="0" * 64,
        batch_id="b",
        chunk=0,
        n_images=n,
        failures=[],
        embedding_dim=512,
        provider=provider,
        threads=0,
        batch_size=32,
        wall_seconds=wall,
        inference_seconds=wall / 2,
        batch_seconds=calls or [],
        cores=cores,
        device=device,
    )


def test_p50_batch_latency_is_the_median_over_every_call_of_every_shard() -> None:
    cost = summarise_cost([_meta(calls=[0.1, 0.3, 0.2]), _meta(calls=[0.5])], card(), None, "USD")
    assert cost.p50_batch_seconds == pytest.approx(0.25)
    assert summarise_cost([_meta()], card(), None, "USD").p50_batch_seconds is None


def test_device_seconds_are_core_seconds_on_cpu_and_gpu_seconds_on_gpu() -> None:
    cpu = summarise_cost(
        [_meta(n=300, wall=10, cores=4), _meta(n=100, wall=10, cores=4)], card(), None, "USD"
    )
    assert cpu.seconds_per_1k == pytest.approx(50.0)
    assert cpu.device_seconds_per_1k == pytest.approx(200.0)  # 20 s × 4 cores / 400 images
    assert cpu.device_seconds_unit == "core-seconds" and cpu.cores == 4
    gpu = summarise_cost([_meta(n=400, wall=2, provider=CUDA, cores=16)], card(), None, "USD")
    assert gpu.device_seconds_per_1k == pytest.approx(5.0)  # wall only
    assert gpu.device_seconds_unit == "gpu-seconds"


def test_device_seconds_unknown_for_old_shards_and_mixed_units() -> None:
    old = summarise_cost([_meta(cores=None)], card(), None, "USD")
    assert old.device_seconds_per_1k is None and old.cores is None
    both = summarise_cost([_meta(), _meta(provider=CUDA, device="gpu (H200)")], card(), None, "")
    assert both.device_seconds_per_1k is None
    assert both.mixed_devices


def test_storage_per_million_formula() -> None:
    # Qdrant default m=16: layer 0 holds 32 links, upper layers 16/15 links on average
    assert abs(HNSW_LINK_BYTES - 4 * (32 + 16 / 15)) < 1e-9
    assert storage_per_million(512, 200.0) == round(1e6 * (2048 + 4 * (32 + 16 / 15) + 200))
    records = [
        ImageRecord(key="a/1.jpg", sha256="a" * 64, label="a", group="g1", width=1, height=1),
        ImageRecord(key="b/22.jpg", sha256="b" * 64, label="bb", width=1, height=1),
    ]
    sizes = [
        len(
            json.dumps(
                {
                    "key": r.key,
                    "sha256": r.sha256,
                    "label": r.label,
                    "group": r.group,
                    "split": r.split,
                    "batch": "night-1",
                    "source": "s3://x/y",
                },
                separators=(",", ":"),
            )
        )
        for r in records
    ]
    payload = payload_bytes(records, "night-1", "s3://x/y")
    assert payload == pytest.approx(sum(sizes) / 2)
    assert payload_bytes([], "b", "s") is None
    cost = summarise_cost([_meta()], card(256), None, "USD", payload=payload)
    assert cost.storage_bytes_per_million == storage_per_million(256, sum(sizes) / 2)
    assert summarise_cost([_meta()], card(), None, "USD").storage_bytes_per_million is None


def test_projection_arithmetic() -> None:
    cost = summarise_cost([_meta(n=400, wall=20, cores=4)], card(), 3.6, "EUR", volume=1_000_000)
    pr = cost.projection
    assert pr is not None and pr.volume_images_per_night == 1_000_000
    assert pr.hours_per_night == pytest.approx(1_000_000 * 50 / 1000 / 3600)  # 13.9 h
    assert pr.device_hours_per_night == pytest.approx(4 * pr.hours_per_night)
    assert pr.price_per_night == pytest.approx(pr.hours_per_night * 3.6)  # 50 EUR
    assert pr.price_per_month == pytest.approx(30 * pr.price_per_night)
    assert pr.currency == "EUR"
    free = project_cost(10, 50.0, None, None, "USD")
    assert free.price_per_night is None and free.price_per_month is None
    assert free.device_hours_per_night is None
    assert summarise_cost([_meta()], card(), None, "USD").projection is None


def test_cli_recomputes_the_same_projection_from_the_stored_json() -> None:
    cost = summarise_cost([_meta(n=400, wall=20)], card(), 2.0, "USD", volume=5000)
    stored = json.loads(cost.model_dump_json())
    assert project(stored, 5000) == stored["projection"]
    again = project(stored, 10_000)
    assert again["hours_per_night"] == pytest.approx(2 * stored["projection"]["hours_per_night"])


def test_device_comes_from_the_shards_and_a_mix_is_flagged() -> None:
    one = summarise_cost(
        [_meta(device="gpu-box (EPYC)"), _meta(device="gpu-box (EPYC)")], card(), None, ""
    )
    assert one.device == "gpu-box (EPYC)" and one.devices == ["gpu-box (EPYC)"]
    assert not one.mixed_devices and cost_warnings("m", one) == []
    mixed = summarise_cost([_meta(device="a (X)"), _meta(device="b (Y)")], card(), None, "")
    assert mixed.mixed_devices and mixed.devices == ["a (X)", "b (Y)"]
    (warning,) = cost_warnings("m", mixed)
    assert "a (X)" in warning and "b (Y)" in warning and warning.startswith("m:")
    providers = summarise_cost([_meta(), _meta(provider=CUDA)], card(), None, "")
    assert providers.mixed_devices  # same device label, different provider
    assert not cost_comparable(one, mixed)
    assert cost_comparable(one, summarise_cost([_meta(device="gpu-box (EPYC)")], card(), None, ""))
    other = summarise_cost([_meta(device="c (Z)")], card(), None, "")
    assert not cost_comparable(one, other)
    unknown = summarise_cost([_meta(device=None)], card(), None, "")
    assert unknown.devices == [UNKNOWN_DEVICE] and not cost_comparable(unknown, unknown)


def test_old_shard_meta_without_the_new_fields_loads() -> None:
    old = {
        "model": "m",
        "model_sha256": "0" * 64,
        "batch_id": "b",
        "chunk": 3,
        "n_images": 10,
        "failures": [],
        "embedding_dim": 8,
        "provider": CPU,
        "threads": 2,
        "batch_size": 32,
        "wall_seconds": 1.0,
        "inference_seconds": 0.5,
    }
    meta = ShardMeta.model_validate_json(json.dumps(old))
    assert meta.batch_seconds == [] and meta.cores is None and meta.device is None
    cost = summarise_cost([meta], card(8), None, "USD")
    assert cost.seconds_per_1k == pytest.approx(100.0) and cost.device_seconds_per_1k is None


def test_encoder_device_and_cores_never_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    assert encode.usable_cores(1) == 1
    assert encode.usable_cores(0) >= 1
    assert encode.usable_cores(10_000) == encode.usable_cores(0)
    encode.describe_device.cache_clear()
    monkeypatch.setattr(encode, "_cpu_model", lambda: "Test CPU 9000")
    assert encode.describe_device("rack-7", CPU) == "rack-7 (Test CPU 9000)"

    def broken() -> str:
        raise RuntimeError("no /proc")

    encode.describe_device.cache_clear()
    monkeypatch.setattr(encode, "_cpu_model", broken)
    monkeypatch.setattr(encode, "_gpu_model", lambda: "NVIDIA H200")
    assert encode.describe_device("rack-7", CPU) == "rack-7"
    assert encode.describe_device("cpu", CUDA) == "gpu (NVIDIA H200)"
    encode.describe_device.cache_clear()
