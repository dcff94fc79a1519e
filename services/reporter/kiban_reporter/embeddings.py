"""Read a batch's embeddings for one model back from its shards, aligned with records.

The reporter evaluates from shards, not from Qdrant: exact, reproducible, and possible
even while the vector database is down. A chunk that failed for good (dead-lettered) has
no shard; its images are left out and the report says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kiban.records import BatchInfo, ImageRecord
from kiban.shards import ShardMeta, read_meta, read_shard
from kiban.store import ObjectStore


@dataclass
class BatchEmbeddings:
    records: list[ImageRecord]  # sorted by key, aligned with vectors
    vectors: np.ndarray  # float32 [N, D], L2-normalised
    timings: list[ShardMeta]
    failures: list[tuple[str, str]]
    missing_chunks: list[int] = field(default_factory=list)  # no complete shard


def load_batch_embeddings(
    store: ObjectStore, info: BatchInfo, records: list[ImageRecord], model: str
) -> BatchEmbeddings:
    by_key = {r.key: r for r in records}
    keys: list[str] = []
    parts: list[np.ndarray] = []
    timings: list[ShardMeta] = []
    failures: list[tuple[str, str]] = []
    missing: list[int] = []
    for chunk in info.chunks:
        meta = read_meta(store, model, info.batch_id, chunk.index)
        if meta is None:
            missing.append(chunk.index)
            continue
        shard = read_shard(store, model, info.batch_id, chunk.index)
        keys.extend(shard.keys)
        parts.append(shard.vectors)
        timings.append(meta)
        failures.extend((str(k), str(reason)) for k, reason in meta.failures)
    vectors = np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
    order = np.argsort(np.asarray(keys, dtype=object), kind="stable")
    keys = [keys[i] for i in order]
    return BatchEmbeddings(
        [by_key[k] for k in keys],
        vectors[order] if len(keys) else vectors,
        timings,
        failures,
        missing,
    )
