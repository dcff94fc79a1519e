"""Embedding shards: one per (model, batch, chunk), written before anything touches Qdrant.

A Qdrant outage never loses encoder work, and any store can be re-indexed (or
re-evaluated) from shards without re-encoding.
"""

from __future__ import annotations

import io

import numpy as np
from pydantic import BaseModel

from kiban.records import shard_key
from kiban.store import ObjectStore


class ShardMeta(BaseModel):
    """What the encoder measured while writing a shard; the reporter's cost input."""

    model: str
    model_sha256: str
    batch_id: str
    chunk: int
    n_images: int
    failures: list[tuple[str, str]]
    embedding_dim: int
    provider: str
    threads: int
    batch_size: int
    wall_seconds: float
    inference_seconds: float


def meta_key(model: str, batch_id: str, chunk: int) -> str:
    return shard_key(model, batch_id, chunk).removesuffix(".npz") + ".json"


def write_shard(
    store: ObjectStore, meta: ShardMeta, sha256s: list[str], keys: list[str], vectors: np.ndarray
) -> None:
    buf = io.BytesIO()
    np.savez(
        buf,
        ids=np.asarray(sha256s, dtype="U64"),
        keys=np.asarray(keys, dtype=str),
        vectors=vectors.astype(np.float32),
    )
    store.put(shard_key(meta.model, meta.batch_id, meta.chunk), buf.getvalue())
    # The meta file is written last: its presence means the shard is complete.
    store.put(meta_key(meta.model, meta.batch_id, meta.chunk), meta.model_dump_json().encode())


def read_meta(store: ObjectStore, model: str, batch_id: str, chunk: int) -> ShardMeta | None:
    key = meta_key(model, batch_id, chunk)
    if not store.exists(key):
        return None
    return ShardMeta.model_validate_json(store.get(key))


def read_shard(
    store: ObjectStore, model: str, batch_id: str, chunk: int
) -> tuple[list[str], list[str], np.ndarray]:
    with np.load(io.BytesIO(store.get(shard_key(model, batch_id, chunk)))) as data:
        return list(data["ids"]), list(data["keys"]), np.asarray(data["vectors"], np.float32)
