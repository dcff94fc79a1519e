"""Where a batch stands, read from the stores alone: any process can answer it.

Ingested = batch.json exists; encoded = a complete shard (``kiban.shards``) exists;
indexed = the index task's marker exists; failed = a stage gave up on the chunk
(``kiban.progress``); evaluated = a report version exists.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

from kiban.errors import StoreError
from kiban.progress import failed_chunks, indexed_chunks
from kiban.records import read_batch_info, report_versions
from kiban.shards import list_shards, read_meta
from kiban.store import ObjectStore


class ModelProgress(BaseModel):
    model: str
    chunks: int
    encoded: int
    indexed: int
    failed: int = 0  # chunks dead-lettered for good
    images_encoded: int | None = None  # None: not read (a progress poll)
    encode_failures: int | None = None


class BatchStatus(BaseModel):
    batch_id: str
    ingested: bool
    n_accepted: int = 0
    n_quarantined: int = 0
    n_duplicates: int = 0
    chunks: int = 0
    models: list[ModelProgress] = []
    report_versions: list[str] = []
    dead_letters: int = 0

    @property
    def latest_report(self) -> str | None:
        return self.report_versions[-1] if self.report_versions else None


def _count(store: ObjectStore, prefix: str) -> int:
    return sum(1 for _ in store.list(prefix))


def letter_batch(letter: dict[str, Any]) -> str | None:
    """The batch a dead-lettered message was about, when its payload names one."""
    payload = letter.get("payload")
    if isinstance(payload, dict) and isinstance(payload.get("kwargs"), dict):
        payload = payload["kwargs"].get("message")  # wrong arguments: the raw call
    batch = payload.get("batch_id") if isinstance(payload, dict) else None
    return batch if isinstance(batch, str) else None


def read_dead_letter(store: ObjectStore, key: str) -> dict[str, Any]:
    return dict(json.loads(store.get(key)))


def dead_letter_count(store: ObjectStore, batch_id: str | None = None) -> int:
    if batch_id is None:
        return _count(store, "deadletter")
    return sum(
        1
        for info in store.list("deadletter")
        if letter_batch(read_dead_letter(store, info.key)) == batch_id
    )


def batch_status(
    store: ObjectStore,
    batch_id: str,
    models: list[str] | None = None,
    detailed: bool = True,
) -> BatchStatus:
    """Where the batch stands. ``detailed=False`` only lists keys — no shard metadata or
    dead letter is read — so a progress bar can poll it cheaply on a large batch."""
    try:
        info = read_batch_info(store, batch_id)
    except StoreError:
        return BatchStatus(batch_id=batch_id, ingested=False)
    if models is None:
        models = sorted({ref.model for ref in list_shards(store) if ref.batch_id == batch_id})
    progress = []
    for model in models:
        shards = list(list_shards(store, model, batch_id))
        entry = ModelProgress(
            model=model,
            chunks=len(info.chunks),
            encoded=len(shards),
            indexed=len(indexed_chunks(store, batch_id, model)),
            failed=len(failed_chunks(store, batch_id, model)),
        )
        if detailed:
            metas = [read_meta(store, model, batch_id, ref.chunk) for ref in shards]
            entry.images_encoded = sum(m.n_images for m in metas if m is not None)
            entry.encode_failures = sum(len(m.failures) for m in metas if m is not None)
        progress.append(entry)
    versions = report_versions(store, batch_id)
    return BatchStatus(
        batch_id=batch_id,
        ingested=True,
        n_accepted=info.n_accepted,
        n_quarantined=info.n_quarantined,
        n_duplicates=info.n_duplicates,
        chunks=len(info.chunks),
        models=progress,
        report_versions=versions,
        dead_letters=dead_letter_count(store, batch_id) if detailed else 0,
    )


def list_batches(store: ObjectStore) -> list[dict[str, object]]:
    """One row per ingested batch, oldest first."""
    rows = []
    for info in store.list("batches"):
        parts = info.key.split("/")
        if len(parts) == 3 and parts[2] == "batch.json":
            batch = read_batch_info(store, parts[1])
            rows.append(
                {
                    "batch": batch.batch_id,
                    "created": batch.created_at,
                    "accepted": batch.n_accepted,
                    "quarantined": batch.n_quarantined,
                    "duplicates": batch.n_duplicates,
                    "reports": len(report_versions(store, batch.batch_id)),
                }
            )
    return sorted(rows, key=lambda r: str(r["created"]))


def recent_dead_letters(
    store: ObjectStore, limit: int, batch_id: str | None = None
) -> list[dict[str, object]]:
    """The newest dead letters (task, reason), optionally only those naming ``batch_id``."""
    keys = sorted((i.key for i in store.list("deadletter")), key=lambda k: k.rsplit("/", 1)[-1])
    letters = []
    for key in reversed(keys):
        letter = read_dead_letter(store, key)
        if batch_id is not None and letter_batch(letter) != batch_id:
            continue
        letters.append(letter)
        if len(letters) >= limit:
            break
    return letters
