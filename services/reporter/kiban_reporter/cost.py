"""Cost v1: what encoding a thousand images takes with each model, from measured shards.

Throughput is measured by the encoder itself (wall time of each chunk: fetch, decode,
inference, normalisation) and stored in the shard metadata, so the report shows what
really happened on the hardware that ran, not a benchmark from elsewhere.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, Field

from kiban.models.card import ModelCard
from kiban.shards import ShardMeta
from kiban_reporter.decision_schema import CostProjection


class CostSummary(BaseModel):
    images: int
    provider: str = Field(description="Execution provider that really ran (e.g. CPU, CUDA).")
    threads: int = Field(description="ONNX Runtime intra-op threads (0 = all cores).")
    batch_size: int
    device: str
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
        None, description="Median wall time of one inference call of ``batch_size`` images."
    )
    cores: int | None = Field(None, description="CPU cores the encoder could use.")
    device_seconds_per_1k: float | None = Field(
        None, description="Core-seconds (CPU) or GPU-seconds (GPU) per 1k images."
    )
    device_seconds_unit: str = Field("core-seconds", description="core-seconds | gpu-seconds")
    devices: list[str] = Field(
        default_factory=list, description="Device labels the shards were encoded on."
    )
    mixed_devices: bool = Field(
        False, description="Shards came from different devices/providers: throughput is a mix."
    )
    storage_bytes_per_million: int | None = Field(
        None, description="Qdrant storage per million images (vectors + HNSW links + payload)."
    )
    projection: CostProjection | None = None


def summarise_cost(
    timings: Sequence[ShardMeta],
    card: ModelCard,
    price_per_hour: float | None,
    currency: str,
    device: str,
) -> CostSummary:
    images = sum(t.n_images for t in timings)
    wall = sum(t.wall_seconds for t in timings)
    infer = sum(t.inference_seconds for t in timings)
    throughput = images / wall if wall > 0 and images else None
    seconds_per_1k = 1000.0 / throughput if throughput else None
    providers = sorted({t.provider for t in timings}) or ["unknown"]
    return CostSummary(
        images=images,
        provider="+".join(providers),
        threads=timings[0].threads if timings else 0,
        batch_size=timings[0].batch_size if timings else 0,
        device=device,
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
    )
