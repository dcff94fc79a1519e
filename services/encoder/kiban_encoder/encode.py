"""The mapper stage: one chunk of a batch through one model, into one shard."""

from __future__ import annotations

import logging
import time

import numpy as np

from kiban.context import Context
from kiban.messages import EncodeChunk
from kiban.models.registry import fetch_model, load_card
from kiban.records import read_batch_info, read_chunk_records
from kiban.shards import ShardMeta, read_meta, write_shard
from kiban.telemetry import ENCODE_THROUGHPUT, IMAGES_ENCODED
from kiban_encoder.reader import decoded_batches
from kiban_encoder.session import load_model

log = logging.getLogger(__name__)


def l2_normalise(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def encode_chunk(msg: EncodeChunk, ctx: Context) -> ShardMeta:
    """Encode records [start, stop) of the batch; skip if this model's shard already exists."""
    card = load_card(ctx.store, msg.model)
    existing = read_meta(ctx.store, msg.model, msg.batch_id, msg.chunk)
    if existing is not None and existing.model_sha256 == card.sha256:
        log.info("shard %s/%s/%d exists, skipping", msg.model, msg.batch_id, msg.chunk)
        return existing

    info = read_batch_info(ctx.store, msg.batch_id)
    if msg.chunk not in {c.index for c in info.chunks}:
        raise ValueError(f"batch {msg.batch_id} has no chunk {msg.chunk} (has {len(info.chunks)})")
    records = read_chunk_records(ctx.store, msg.batch_id, msg.chunk)

    s = ctx.settings
    model = load_model(
        fetch_model(ctx.store, card, ctx.cache_dir),
        s.ort_providers,
        s.threads,
        card.input_name,
        card.output_name,
    )
    source = ctx.open_source(info.source)
    t0 = time.perf_counter()
    infer_seconds = 0.0
    sha256s: list[str] = []
    keys: list[str] = []
    parts: list[np.ndarray] = []
    failures: list[tuple[str, str]] = []
    for batch in decoded_batches(
        source,
        records,
        card.preprocessing,
        s.batch_size,
        s.decode_workers,
        s.max_image_pixels,
        s.min_image_side,
    ):
        failures.extend(batch.failures)
        if not batch.records:
            continue
        t_inf = time.perf_counter()
        raw = model.run(batch.pixels)
        infer_seconds += time.perf_counter() - t_inf
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
        batch_size=s.batch_size,
        wall_seconds=wall,
        inference_seconds=infer_seconds,
    )
    write_shard(ctx.store, meta, sha256s, keys, vectors)
    IMAGES_ENCODED.labels(msg.model, model.provider).inc(len(sha256s))
    if wall > 0:
        ENCODE_THROUGHPUT.labels(msg.model).set(len(sha256s) / wall)
    for key, reason in failures:
        log.warning("chunk %d: %s not encoded: %s", msg.chunk, key, reason)
    return meta
