"""Cost: what encoding a thousand images takes with each model, measured, and projected.

Throughput is measured by the encoder itself (wall time of each chunk: fetch, decode,
inference, normalisation; and of every inference call) and stored in the shard metadata with
the cores it could use and the device it ran on, so the report shows what really happened on
the hardware that ran — the encoder's, never the reporter's own settings — not a benchmark
from elsewhere. The projection turns that into hours and money for a stated nightly volume.

Formulas (docs/report.md#cost):

- ``seconds_per_1k`` = 1000 × Σ wall / Σ images (end to end, one worker like the one that ran)
- device-seconds of a shard = wall × cores (CPU providers: core-seconds) or wall (CUDA /
  TensorRT: GPU-seconds); ``device_seconds_per_1k`` = 1000 × Σ device-seconds / Σ images
- ``storage_bytes_per_million`` = 10⁶ × (4·D + HNSW links + payload), with HNSW links =
  4 bytes × (m0 + m / (m − 1)) for Qdrant's default m = 16, m0 = 2m = 32 (layer 0 holds m0
  links; a point reaches layer l ≥ 1 with probability m^−l, so it has 1/(m − 1) upper layers
  of m links on average) ≈ 132.3 bytes, and payload = the mean UTF-8 length of the compact JSON
  payload kiban writes for each point (key, sha256, label, group, split, batch, source)
- projection for V images a night: hours = V × seconds_per_1k / 1000 / 3600; device-hours =
  V × device_seconds_per_1k / 1000 / 3600; price per night = hours × price_per_hour; per
  month = 30 nights
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence

from pydantic import BaseModel, Field

from kiban.models.card import ModelCard
from kiban.records import ImageRecord
from kiban.shards import ShardMeta
from kiban_reporter.decision_schema import CostProjection

GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
HNSW_M = 16  # Qdrant's default
HNSW_M0 = 2 * HNSW_M
LINK_BYTES = 4
HNSW_LINK_BYTES = LINK_BYTES * (HNSW_M0 + HNSW_M / (HNSW_M - 1))
NIGHTS_PER_MONTH = 30
UNKNOWN_DEVICE = "unknown (shard written before kiban recorded the device)"


class CostSummary(BaseModel):
    images: int
    provider: str = Field(description="Execution provider that really ran (e.g. CPU, CUDA).")
    threads: int = Field(description="ONNX Runtime intra-op threads (0 = all cores).")
    batch_size: int
    device: str = Field(
        description="Where the encoder ran, from the shards (KIBAN_DEVICE_LABEL of the encoder "
        "plus its CPU or GPU model); several joined with ' + ' when mixed."
    )
    encode_images_per_second: float | None = Field(
        description="End to end: store bytes → decoded → embedded, per second."
    )
    inference_images_per_second: float | None = Field(
        description="ONNX Runtime alone on already-decoded tensors."
    )
    seconds_per_1k: float | None
    price_per_hour: float | None
    currency: str
    cost_per_1k: float | None
    bytes_per_vector: int = Field(description="float32 storage of one embedding.")
    params: int
    macs_per_image: int | None = Field(
        None, description="Multiply-accumulates per image, counted from the ONNX graph."
    )
    model_file_bytes: int
    p50_batch_seconds: float | None = Field(
        None,
        description="Median wall time of one inference call of ``batch_size`` images (the "
        "last call of a chunk may hold fewer), over every call of every shard.",
    )
    cores: int | None = Field(
        None, description="CPU cores the encoder could use (null when shards differ or predate it)."
    )
    device_seconds_per_1k: float | None = Field(
        None,
        description="Core-seconds (CPU providers: wall × cores) or GPU-seconds (CUDA/TensorRT: "
        "wall) per 1k images; null when unknown or when the shards mix both.",
    )
    device_seconds_unit: str = Field("core-seconds", description="core-seconds | gpu-seconds")
    devices: list[str] = Field(
        default_factory=list, description="Device labels the shards were encoded on."
    )
    mixed_devices: bool = Field(
        False, description="Shards came from different devices/providers: throughput is a mix."
    )
    storage_bytes_per_million: int | None = Field(
        None,
        description="Qdrant storage per million images: 10^6 × (4·dim vector bytes + HNSW links "
        "4·(m0 + m/(m−1)) bytes with m=16, m0=32 + mean JSON payload bytes of this batch's "
        "points); null without images.",
    )
    payload_bytes_per_image: float | None = Field(
        None, description="Mean compact-JSON size of the Qdrant payload kiban writes per point."
    )
    projection: CostProjection | None = None


def point_payload_size(r: ImageRecord, batch_id: str, source: str) -> int:
    """Bytes of the Qdrant payload kiban writes for one point (kiban_encoder.index)."""
    payload = {
        "key": r.key,
        "sha256": r.sha256,
        "label": r.label,
        "group": r.group,
        "split": r.split,
        "batch": batch_id,
        "source": source,
    }
    return len(json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode())


def payload_bytes(records: Sequence[ImageRecord], batch_id: str, source: str) -> float | None:
    """Mean size of the Qdrant payload kiban writes for a point."""
    if not records:
        return None
    return sum(point_payload_size(r, batch_id, source) for r in records) / len(records)


def storage_per_million(embedding_dim: int, payload: float) -> int:
    """Bytes Qdrant holds for a million points: vectors, HNSW links, payload."""
    return round(1_000_000 * (4 * embedding_dim + HNSW_LINK_BYTES + payload))


def device_key(provider: str, device: str | None) -> tuple[str, str]:
    return (device or UNKNOWN_DEVICE, provider)


def _device_seconds(timings: Sequence[ShardMeta]) -> tuple[float | None, str]:
    """Σ device-seconds of the shards and the unit; None when unknown or the units mix."""
    gpu = {t.provider in GPU_PROVIDERS for t in timings}
    if len(gpu) != 1:
        return None, "core-seconds"
    if gpu == {True}:
        return sum(t.wall_seconds for t in timings), "gpu-seconds"
    if any(t.cores is None for t in timings):
        return None, "core-seconds"
    return sum(t.wall_seconds * (t.cores or 0) for t in timings), "core-seconds"


def project_cost(
    volume: int,
    seconds_per_1k: float | None,
    device_seconds_per_1k: float | None,
    price_per_hour: float | None,
    currency: str,
) -> CostProjection:
    """Hours, device-hours and price a night (and a 30-night month) for ``volume`` images."""
    hours = volume * seconds_per_1k / 1000 / 3600 if seconds_per_1k is not None else None
    device_hours = (
        volume * device_seconds_per_1k / 1000 / 3600 if device_seconds_per_1k is not None else None
    )
    night = hours * price_per_hour if hours is not None and price_per_hour is not None else None
    return CostProjection(
        volume_images_per_night=volume,
        hours_per_night=hours,
        device_hours_per_night=device_hours,
        price_per_night=night,
        price_per_month=night * NIGHTS_PER_MONTH if night is not None else None,
        currency=currency,
    )


def summarise_cost(
    timings: Sequence[ShardMeta],
    card: ModelCard,
    price_per_hour: float | None,
    currency: str,
    payload: float | None = None,
    volume: int | None = None,
) -> CostSummary:
    """One model's cost from its shards; ``payload`` (bytes a point) and ``volume`` optional."""
    images = sum(t.n_images for t in timings)
    wall = sum(t.wall_seconds for t in timings)
    infer = sum(t.inference_seconds for t in timings)
    throughput = images / wall if wall > 0 and images else None
    seconds_per_1k = 1000.0 / throughput if throughput else None
    providers = sorted({t.provider for t in timings}) or ["unknown"]
    devices = sorted({t.device or UNKNOWN_DEVICE for t in timings})
    mixed = len({device_key(t.provider, t.device) for t in timings}) > 1
    calls = [s for t in timings for s in t.batch_seconds]
    cores = {t.cores for t in timings}
    dev_seconds, unit = _device_seconds(timings)
    device_seconds_per_1k = (
        1000.0 * dev_seconds / images if dev_seconds is not None and images else None
    )
    return CostSummary(
        images=images,
        provider="+".join(providers),
        threads=timings[0].threads if timings else 0,
        batch_size=timings[0].batch_size if timings else 0,
        device=" + ".join(devices) if devices else "unknown",
        encode_images_per_second=throughput,
        inference_images_per_second=images / infer if infer > 0 and images else None,
        seconds_per_1k=seconds_per_1k,
        price_per_hour=price_per_hour,
        currency=currency,
        cost_per_1k=(
            price_per_hour * seconds_per_1k / 3600.0
            if seconds_per_1k and price_per_hour is not None
            else None
        ),
        bytes_per_vector=4 * card.embedding_dim,
        params=card.params,
        macs_per_image=card.macs_per_image,
        model_file_bytes=card.file_size,
        p50_batch_seconds=statistics.median(calls) if calls else None,
        cores=cores.pop() if len(cores) == 1 else None,
        device_seconds_per_1k=device_seconds_per_1k,
        device_seconds_unit=unit,
        devices=devices,
        mixed_devices=mixed,
        storage_bytes_per_million=(
            storage_per_million(card.embedding_dim, payload) if payload is not None else None
        ),
        payload_bytes_per_image=payload,
        projection=(
            project_cost(volume, seconds_per_1k, device_seconds_per_1k, price_per_hour, currency)
            if volume is not None
            else None
        ),
    )


def cost_warnings(model: str, cost: CostSummary) -> list[str]:
    """A mix of devices or providers makes throughput an average of unlike machines."""
    if not cost.mixed_devices:
        return []
    return [
        f"{model}: shards were encoded on different devices/providers ({cost.device}; "
        f"{cost.provider}): its throughput and cost are a mix of them"
    ]


def cost_comparable(a: CostSummary, b: CostSummary) -> bool:
    """Both costs were measured on one known device and the same provider."""
    return (
        not a.mixed_devices
        and not b.mixed_devices
        and bool(a.devices)
        and a.devices == b.devices
        and UNKNOWN_DEVICE not in a.devices
        and a.provider == b.provider
    )
