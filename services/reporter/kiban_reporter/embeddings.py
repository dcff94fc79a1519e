"""Read a batch's embeddings for one model back from its shards, aligned with records.

The reporter evaluates from shards, not from Qdrant: exact, reproducible, and possible
even while the vector database is down.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np

from kiban.records import BatchInfo, ImageRecord, shard_key
from kiban.store import ObjectStore
from kiban_reporter.cost import ShardTiming


@dataclass
class BatchEmbeddings:
    records: list[ImageRecord]  # sorted by key, aligned with vectors
    vectors: np.ndarray  # float32 [N, D], L2-normalised
    timings: list[ShardTiming]
    failures: list[tuple[str, str]]


def load_batch_embeddings(
    store: ObjectStore, info: BatchInfo, records: list[ImageRecord], model: str
) -> BatchEmbeddings:
    by_key = {r.key: r for r in records}
    keys: list[str] = []
    parts: list[np.ndarray] = []
    timings: list[ShardTiming] = []
    failures: list[tuple[str, str]] = []
    for chunk in info.chunks:
        key = shard_key(model, info.batch_id, chunk.index)
        with np.load(io.BytesIO(store.get(key))) as data:
            keys.extend(str(k) for k in data["keys"])
            parts.append(np.asarray(data["vectors"], np.float32))
        meta = json.loads(store.get(key.removesuffix(".npz") + ".json"))
        timings.append(ShardTiming.model_validate(meta))
        failures.extend((str(k), str(reason)) for k, reason in meta.get("failures", []))
    vectors = np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
    order = np.argsort(np.asarray(keys, dtype=object), kind="stable")
    keys = [keys[i] for i in order]
    return BatchEmbeddings([by_key[k] for k in keys], vectors[order], timings, failures)
