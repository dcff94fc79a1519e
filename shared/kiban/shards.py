"""The embedding shard contract: one shard per (model, batch, chunk), and its only reader.

The encoder writes a shard before anything touches Qdrant, so a Qdrant outage never loses
encoder work and any store can be re-indexed or re-evaluated without re-encoding. Every
other stage (indexer, reporter, cost, status, CLI, re-index) reads shards through this
module, so the layout lives in one place::

    embeddings/<model>/<batch>/chunk-00000.npz    ids (sha256), keys, vectors (float32, L2)
    embeddings/<model>/<batch>/chunk-00000.json   ShardMeta, written last: the shard is complete
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, Field

from kiban.store import ObjectStore

PREFIX = "embeddings"
_META_KEY = re.compile(r"^embeddings/([^/]+)/([^/]+)/chunk-(\d{5,})\.json$")


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
    # Added for the cost model (issue 8); defaulted so that shards written before still load.
    batch_seconds: list[float] = Field(
        default_factory=list,
        description="Wall time of each inference call (``batch_size`` images, the last fewer).",
    )
    cores: int | None = Field(
        None, description="CPU cores the encoder could use (the ORT thread count when set)."
    )
    device: str | None = Field(
        None, description="KIBAN_DEVICE_LABEL and the CPU or GPU model that ran, e.g. 'cpu (…)'."
    )
    # Added for issue 11; defaulted so that shards written before still load.
    session: dict[str, str | int] = Field(
        default_factory=dict,
        description="ONNX Runtime session options that ran (optimisation level, intra/inter-op "
        "threads, spinning, arena, IO binding, TensorRT fp16).",
    )


@dataclass(frozen=True)
class Shard:
    """A shard's contents: aligned lists of image identities and their vectors."""

    sha256s: list[str]
    keys: list[str]
    vectors: np.ndarray  # float32 [N, D]


@dataclass(frozen=True, order=True)
class ShardRef:
    """Where a complete shard lives: (model, batch, chunk)."""

    model: str
    batch_id: str
    chunk: int


def shard_key(model: str, batch_id: str, chunk: int) -> str:
    return f"{PREFIX}/{model}/{batch_id}/chunk-{chunk:05d}.npz"


def meta_key(model: str, batch_id: str, chunk: int) -> str:
    return f"{PREFIX}/{model}/{batch_id}/chunk-{chunk:05d}.json"


def write_shard(
    store: ObjectStore, meta: ShardMeta, sha256s: list[str], keys: list[str], vectors: np.ndarray
) -> None:
    """Write vectors, then the meta file: a reader that sees the meta sees a whole shard."""
    buf = io.BytesIO()
    np.savez(
        buf,
        ids=np.asarray(sha256s, dtype="U64"),
        keys=np.asarray(keys, dtype=str),
        vectors=vectors.astype(np.float32),
    )
    store.put(shard_key(meta.model, meta.batch_id, meta.chunk), buf.getvalue())
    store.put(meta_key(meta.model, meta.batch_id, meta.chunk), meta.model_dump_json().encode())


def is_complete(store: ObjectStore, model: str, batch_id: str, chunk: int) -> bool:
    return store.exists(meta_key(model, batch_id, chunk))


def read_meta(store: ObjectStore, model: str, batch_id: str, chunk: int) -> ShardMeta | None:
    """The shard's metadata, or None while the shard is not complete."""
    key = meta_key(model, batch_id, chunk)
    if not store.exists(key):
        return None
    return ShardMeta.model_validate_json(store.get(key))


def read_shard(store: ObjectStore, model: str, batch_id: str, chunk: int) -> Shard:
    with np.load(io.BytesIO(store.get(shard_key(model, batch_id, chunk)))) as data:
        return Shard(
            sha256s=[str(x) for x in data["ids"]],
            keys=[str(x) for x in data["keys"]],
            vectors=np.asarray(data["vectors"], np.float32),
        )


def list_shards(
    store: ObjectStore, model: str | None = None, batch_id: str | None = None
) -> Iterator[ShardRef]:
    """Every complete shard (its meta file exists), optionally of one model and/or batch."""
    prefix = PREFIX if model is None else f"{PREFIX}/{model}"
    if model is not None and batch_id is not None:
        prefix = f"{PREFIX}/{model}/{batch_id}"
    for info in store.list(prefix):
        match = _META_KEY.match(info.key)
        if match and (batch_id is None or match.group(2) == batch_id):
            yield ShardRef(match.group(1), match.group(2), int(match.group(3)))


def shard_batches(store: ObjectStore, model: str) -> set[str]:
    """The batches that have at least one complete shard of ``model``."""
    return {ref.batch_id for ref in list_shards(store, model)}
