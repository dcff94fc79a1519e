"""The data a batch leaves in the object store: image records, quarantine, batch summary.

Layout under the store root (documented in docs/architecture.md)::

    batches/<batch>/batch.json         BatchInfo: source, counts, chunk plan
    batches/<batch>/records.jsonl      ImageRecord per accepted image, sorted by key
    batches/<batch>/chunks/chunk-00000.jsonl   the same records, one file per planned chunk
    batches/<batch>/quarantine.jsonl   QuarantineEntry per rejected file
    embeddings/<model>/<batch>/chunk-00000.npz   shard (kiban.shards): ids, vectors, meta
    batches/<batch>/progress/...       indexed / failed markers (kiban.progress)
    models/<name>/model.onnx, models/<name>/card.json
    reports/<batch>/<version>/report.json, report.md
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, Field

from kiban.errors import StoreError
from kiban.store import ObjectStore

SCHEMA_VERSION = 1


class ImageRecord(BaseModel):
    """One accepted image; ``sha256`` of the source bytes is its identity."""

    model_config = ConfigDict(frozen=True)

    key: str = Field(description="Object key relative to the batch source prefix.")
    sha256: str
    label: str | None = None
    group: str | None = Field(None, description="Patient/slide/lot; never matches itself.")
    split: str | None = None
    width: int
    height: int
    duplicates: list[str] = Field(
        default_factory=list, description="Other keys in the batch with the same bytes."
    )


class QuarantineEntry(BaseModel):
    model_config = ConfigDict(frozen=True)

    key: str
    reason: str
    sha256: str | None = None


class ChunkPlan(BaseModel):
    index: int
    start: int
    stop: int


class KeyLabel(BaseModel):
    model_config = ConfigDict(frozen=True)

    key: str
    label: str | None = None


class LabelConflict(BaseModel):
    """Byte-identical images (one sha256) under keys labelled differently.

    The record is the first key in code-point order and keeps that key's label (``kept``);
    the other keys with a different label are ``dropped`` (still listed as duplicates).
    """

    model_config = ConfigDict(frozen=True)

    sha256: str
    kept: KeyLabel
    dropped: list[KeyLabel]


#: Label conflicts kept in batch.json (the count is always complete).
MAX_LABEL_CONFLICTS = 1000


class BatchInfo(BaseModel):
    schema_version: int = SCHEMA_VERSION
    batch_id: str
    source: str
    manifest: str | None = None
    label_source: str = Field(description="'folders', 'manifest' or 'none'.")
    n_listed: int
    n_accepted: int
    n_quarantined: int
    n_duplicates: int
    labelled: bool
    classes: list[str]
    chunks: list[ChunkPlan]
    created_at: str
    n_label_conflicts: int = Field(
        0, description="Byte-identical images whose keys carry different labels."
    )
    label_conflicts: list[LabelConflict] = Field(
        default_factory=list,
        description=f"The first {MAX_LABEL_CONFLICTS:,} label conflicts, by kept key.",
    )


def batch_prefix(batch_id: str) -> str:
    return f"batches/{batch_id}"


M = TypeVar("M", bound=BaseModel)


def dump_jsonl(items: Iterable[BaseModel]) -> bytes:
    return "".join(item.model_dump_json() + "\n" for item in items).encode()


def load_jsonl(data: bytes, model: type[M]) -> list[M]:
    return [model.model_validate_json(line) for line in data.decode().splitlines() if line.strip()]


def read_batch_info(store: ObjectStore, batch_id: str) -> BatchInfo:
    return BatchInfo.model_validate_json(store.get(f"{batch_prefix(batch_id)}/batch.json"))


def ingest_source_key(batch_id: str) -> str:
    return f"{batch_prefix(batch_id)}/ingest/source.json"


class IngestSource(BaseModel):
    """Written by ingest's planner before any chunk exists (``ingest/source.json``): what a
    chunk's encoder and indexer need while batch.json is not written yet."""

    batch_id: str
    source: str
    manifest: str | None = None
    run: str


def read_batch_info_if_ingested(store: ObjectStore, batch_id: str) -> BatchInfo | None:
    """The batch's BatchInfo, or None while its ingest has not written batch.json (chunks of
    a batch are encoded and indexed while later pages are still being validated)."""
    key = f"{batch_prefix(batch_id)}/batch.json"
    try:
        return BatchInfo.model_validate_json(store.get(key))
    except StoreError:
        if store.exists(key):
            raise
        return None


def read_batch_source(store: ObjectStore, batch_id: str) -> str:
    """The source URI of a batch, available from the moment its ingest starts planning
    (``ingest/source.json``), else from batch.json (batches ingested before pages)."""
    try:
        return IngestSource.model_validate_json(store.get(ingest_source_key(batch_id))).source
    except StoreError:
        return read_batch_info(store, batch_id).source


def chunk_planned(store: ObjectStore, batch_id: str, chunk: int) -> bool:
    """Whether ``chunk`` is a chunk of the batch: in batch.json's plan once it exists; before
    that, while ingest is in flight, when its records file has been written."""
    info = read_batch_info_if_ingested(store, batch_id)
    if info is not None:
        return chunk in {c.index for c in info.chunks}
    return store.exists(chunk_records_key(batch_id, chunk))


def read_records(store: ObjectStore, batch_id: str) -> list[ImageRecord]:
    return load_jsonl(store.get(f"{batch_prefix(batch_id)}/records.jsonl"), ImageRecord)


def chunk_records_key(batch_id: str, chunk: int) -> str:
    return f"{batch_prefix(batch_id)}/chunks/chunk-{chunk:05d}.jsonl"


def write_chunk_records(
    store: ObjectStore, batch_id: str, records: list[ImageRecord], chunks: list[ChunkPlan]
) -> None:
    """One small file per chunk, so an encode or index task reads its records only — not
    the whole batch's list once per chunk."""
    for plan in chunks:
        store.put(
            chunk_records_key(batch_id, plan.index), dump_jsonl(records[plan.start : plan.stop])
        )


def read_chunk_records(store: ObjectStore, batch_id: str, chunk: int) -> list[ImageRecord]:
    return load_jsonl(store.get(chunk_records_key(batch_id, chunk)), ImageRecord)


def read_quarantine(store: ObjectStore, batch_id: str) -> list[QuarantineEntry]:
    return load_jsonl(store.get(f"{batch_prefix(batch_id)}/quarantine.jsonl"), QuarantineEntry)


def report_prefix(batch_id: str) -> str:
    return f"reports/{batch_id}"


def report_versions(store: ObjectStore, batch_id: str) -> list[str]:
    """Report versions are zero-padded counters, oldest first."""
    return sorted(
        {
            info.key.split("/")[2]
            for info in store.list(report_prefix(batch_id))
            if info.key.endswith("/report.json")
        }
    )


def latest_report_version(store: ObjectStore, batch_id: str) -> str | None:
    versions = report_versions(store, batch_id)
    return versions[-1] if versions else None
