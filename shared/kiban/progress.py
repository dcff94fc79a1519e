"""Progress markers: what the indexer and the failure path record per (batch, model, chunk).

A chunk is *done* for a model when it is indexed or has failed for good (dead-lettered);
the task that makes the last chunk of a batch done sends the evaluation. Markers live in
the object store, so any process can read progress::

    batches/<batch>/progress/indexed/<model>/chunk-00000          (empty)
    batches/<batch>/progress/failed/<model>/chunk-00000.json      ChunkFailure
"""

from __future__ import annotations

import re

from pydantic import BaseModel

from kiban.records import batch_prefix
from kiban.store import ObjectStore

_CHUNK = re.compile(r"chunk-(\d{5,})(?:\.json)?$")


class ChunkFailure(BaseModel):
    """A chunk a stage gave up on; the report states it and evaluates the rest."""

    model: str
    chunk: int
    task: str
    reason: str


def indexed_key(batch_id: str, model: str, chunk: int) -> str:
    return f"{batch_prefix(batch_id)}/progress/indexed/{model}/chunk-{chunk:05d}"


def failed_key(batch_id: str, model: str, chunk: int) -> str:
    return f"{batch_prefix(batch_id)}/progress/failed/{model}/chunk-{chunk:05d}.json"


def mark_indexed(store: ObjectStore, batch_id: str, model: str, chunk: int) -> None:
    """The chunk is in Qdrant; a failure recorded by an earlier run no longer holds."""
    store.put(indexed_key(batch_id, model, chunk), b"")
    store.delete(failed_key(batch_id, model, chunk))


def mark_failed(store: ObjectStore, batch_id: str, failure: ChunkFailure) -> None:
    store.put(
        failed_key(batch_id, failure.model, failure.chunk), failure.model_dump_json().encode()
    )


def _chunks(store: ObjectStore, prefix: str) -> set[int]:
    found = set()
    for info in store.list(prefix):
        match = _CHUNK.search(info.key)
        if match:
            found.add(int(match.group(1)))
    return found


def indexed_chunks(store: ObjectStore, batch_id: str, model: str) -> set[int]:
    return _chunks(store, f"{batch_prefix(batch_id)}/progress/indexed/{model}")


def failed_chunks(store: ObjectStore, batch_id: str, model: str) -> set[int]:
    return _chunks(store, f"{batch_prefix(batch_id)}/progress/failed/{model}")


def read_failures(store: ObjectStore, batch_id: str) -> list[ChunkFailure]:
    """Every chunk failure of a batch, by model and chunk."""
    failures = [
        ChunkFailure.model_validate_json(store.get(info.key))
        for info in store.list(f"{batch_prefix(batch_id)}/progress/failed")
        if info.key.endswith(".json")
    ]
    return sorted(failures, key=lambda f: (f.model, f.chunk))


def chunks_done(store: ObjectStore, batch_id: str, model: str) -> set[int]:
    """Chunks indexed or failed for good: nothing more will happen to them."""
    return indexed_chunks(store, batch_id, model) | failed_chunks(store, batch_id, model)
