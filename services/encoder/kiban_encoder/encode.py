"""The mapper stage: one chunk of a batch through one model, into one shard."""

from __future__ import annotations

import functools
import logging
import os
import shutil
import subprocess
import time

import numpy as np

from kiban.context import Context
from kiban.messages import EncodeChunk
from kiban.models.registry import fetch_model, load_card
from kiban.records import chunk_planned, read_batch_source, read_chunk_records
from kiban.shards import ShardMeta, read_meta, write_shard
from kiban.telemetry import init_model_series, record_encoded
from kiban_encoder.reader import decoded_batches
from kiban_encoder.session import GPU_PROVIDERS, load_model

log = logging.getLogger(__name__)


def l2_normalise(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def usable_cores(threads: int) -> int:
    """CPU cores this process may run on, or the ORT thread count when that is set (and fewer)."""
    try:
        available = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        available = os.cpu_count() or 1
    return min(threads, available) if threads > 0 else available


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip() or None
    except OSError:
        pass
    return None


def _gpu_model() -> str | None:
    """The first visible GPU's name from nvidia-smi (ORT does not say); None if it can't tell."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    cmd = [smi, "--query-gpu=name", "--format=csv,noheader"]
    if visible:
        cmd += ["-i", visible]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    names = [line.strip() for line in out.stdout.splitlines() if line.strip()]
    return names[0] if names else None


@functools.lru_cache(maxsize=8)
def describe_device(label: str, provider: str) -> str:
    """KIBAN_DEVICE_LABEL plus the hardware that ran: the GPU for CUDA/TensorRT, else the CPU.

    Recorded with every shard so the reporter states the encoder's hardware, not its own.
    Never fails: hardware it cannot name is left out.
    """
    try:
        gpu = provider in GPU_PROVIDERS
        hardware = _gpu_model() if gpu else _cpu_model()
    except Exception:  # noqa: BLE001 - a label must never fail an encode
        gpu, hardware = provider in GPU_PROVIDERS, None
    if gpu and label == "cpu":  # the setting's default says nothing about a GPU
        label = "gpu"
    return f"{label} ({hardware})" if hardware else label


def encode_chunk(msg: EncodeChunk, ctx: Context) -> ShardMeta:
    """Encode records [start, stop) of the batch; skip if this model's shard already exists."""
    card = load_card(ctx.store, msg.model)
    existing = read_meta(ctx.store, msg.model, msg.batch_id, msg.chunk)
    if existing is not None and existing.model_sha256 == card.sha256:
        log.info("shard %s/%s/%d exists, skipping", msg.model, msg.batch_id, msg.chunk)
        return existing

    # ingest sends a chunk as soon as its records are final, before batch.json exists
    if not chunk_planned(ctx.store, msg.batch_id, msg.chunk):
        raise ValueError(f"batch {msg.batch_id} has no chunk {msg.chunk}")
    batch_source = read_batch_source(ctx.store, msg.batch_id)
    records = read_chunk_records(ctx.store, msg.batch_id, msg.chunk)

    s = ctx.settings
    model = load_model(
        fetch_model(ctx.store, card, ctx.cache_dir),
        s.ort_providers,
        s.threads,
        card.input_name,
        card.output_name,
        decode_workers=s.decode_workers,
        gpu_batch_size=s.gpu_batch_size,
        image_side=card.preprocessing.crop,
        model_sha256=card.sha256,
        cache_root=ctx.cache_dir,
    )
    batch_size = s.gpu_batch_size if model.provider in GPU_PROVIDERS else s.batch_size
    # the series exist (at 0) from the first chunk on, even for a provider ORT fell back to
    init_model_series([msg.model], [model.provider], encode=True)
    source = ctx.open_source(batch_source)
    t0 = time.perf_counter()
    infer_seconds = 0.0
    batch_seconds: list[float] = []
    sha256s: list[str] = []
    keys: list[str] = []
    parts: list[np.ndarray] = []
    failures: list[tuple[str, str]] = []
    for batch in decoded_batches(
        source,
        records,
        card.preprocessing,
        batch_size,
        s.decode_workers,
        s.max_image_pixels,
        s.min_image_side,
    ):
        failures.extend(batch.failures)
        if not batch.records:
            continue
        t_inf = time.perf_counter()
        raw = model.run(batch.pixels)
        batch_seconds.append(time.perf_counter() - t_inf)
        infer_seconds += batch_seconds[-1]
        parts.append(l2_normalise(raw))
        sha256s.extend(r.sha256 for r in batch.records)
        keys.extend(r.key for r in batch.records)
    wall = time.perf_counter() - t0
    dim = card.embedding_dim
    vectors = np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)
    meta = ShardMeta(
        model=msg.model,
        model_sha256=card.sha256,
        batch_id=msg.batch_id,
        chunk=msg.chunk,
        n_images=len(sha256s),
        failures=failures,
        embedding_dim=dim,
        provider=model.provider,
        threads=s.threads,
        batch_size=batch_size,
        wall_seconds=wall,
        inference_seconds=infer_seconds,
        batch_seconds=batch_seconds,
        cores=usable_cores(s.threads),
        device=describe_device(s.device_label, model.provider),
        session=model.options,
    )
    write_shard(ctx.store, meta, sha256s, keys, vectors)
    record_encoded(msg.model, model.provider, len(sha256s), wall)
    for key, reason in failures:
        log.warning("chunk %d: %s not encoded: %s", msg.chunk, key, reason)
    return meta
