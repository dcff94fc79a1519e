"""List the source into pages: the planner (the IngestBatch task, ``plan_ingest``).

It streams the source listing, which every store yields in ascending key order (checked: a
listing that goes backwards is an error), and writes it in pages of ``KIBAN_INGEST_PAGE_SIZE``
entries to ``batches/<id>/ingest/pages/page-NNNNNN.jsonl`` (key, size, listing problem, label,
group, split), sending one ``ValidatePage`` per page as soon as it is written and one
``ReduceIngest`` after the first. The manifest stays in memory here (one object, bounded by
``KIBAN_MAX_OBJECT_BYTES``, exactly as before); the manifest keys no listing entry matched
become "listed in manifest but not found in source" entries of
``ingest/manifest-quarantine.jsonl`` (with the rejected rows). Last, ``ingest/listing.json``:
the number of pages and the listing's streaming fingerprint. (The whole scheme:
``kiban_ingest.run_files``.)
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from kiban.context import Context
from kiban.errors import KibanError, StoreError
from kiban.messages import IngestBatch
from kiban.records import BatchInfo, IngestSource, batch_prefix, ingest_source_key
from kiban.settings import Settings
from kiban.store import ObjectInfo, ObjectStore
from kiban_ingest.ingest import (
    CONVENTIONAL_MANIFESTS,
    INGEST_VERSION,
    MISSING_REASON,
    Manifest,
    _existing_batch,
    _label_for,
    open_source,
    read_manifest,
)
from kiban_ingest.run_files import (
    RANK_MANIFEST_ROW,
    RANK_MISSING,
    _dumps,
    ingest_prefix,
    listing_key,
    manifest_quarantine_key,
    page_key,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Planned:
    """A planner run that wrote pages (``info`` is None) or found the batch unchanged."""

    run: str | None
    pages: int
    info: BatchInfo | None = None


def _entries(source: ObjectStore, manifest: Manifest | None) -> Iterator[ObjectInfo]:
    skip = set(CONVENTIONAL_MANIFESTS)
    if manifest is not None and manifest.key_in_source:
        skip.add(manifest.key_in_source)
    try:
        for obj in source.list():
            if obj.key not in skip:
                yield obj
    except KibanError:
        raise
    except Exception as exc:  # botocore errors: no such bucket, access denied, ...
        raise StoreError(f"cannot list {source.uri}: {exc}") from exc


class _ListingDigest:
    """The listing's fingerprint, streamed, and the order check on object keys."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.hash = hashlib.sha256()
        self.n = 0
        self.folders = False
        self.last: str | None = None

    def add(self, obj: ObjectInfo) -> None:
        self.hash.update(f"{obj.key}\t{obj.size}\t{obj.problem or ''}\n".encode())
        self.n += 1
        self.folders = self.folders or "/" in obj.key
        if obj.problem is None:  # a problem entry's key is a printable rendering: not ordered
            if self.last is not None and obj.key <= self.last:
                raise StoreError(
                    f"listing of {self.uri} is not in ascending key order "
                    f"({self.last!r} then {obj.key!r}); ingest streams it in pages and needs it"
                )
            self.last = obj.key


def _fingerprint(
    msg: IngestBatch, source: ObjectStore, digest: _ListingDigest, manifest: Manifest | None,
    settings: Settings,
) -> dict[str, object]:  # fmt: skip
    return {
        "ingest_version": INGEST_VERSION,
        "source": source.uri,
        "manifest": manifest.uri if manifest else None,
        "manifest_sha256": hashlib.sha256(manifest.data).hexdigest() if manifest else None,
        "listing_sha256": digest.hash.hexdigest(),
        "n_listed": digest.n,
        "chunk_size": msg.chunk_size,
        "max_image_pixels": settings.max_image_pixels,
        "min_image_side": settings.min_image_side,
        "max_object_bytes": settings.max_object_bytes,
    }


def plan_ingest(
    msg: IngestBatch, ctx: Context, on_page: Callable[[str, int], None] | None = None
) -> Planned:
    """List ``msg.source`` into pages; ``on_page(run, page)`` is called as each is written.

    When the batch was ingested before (ingest.json exists), the listing is first streamed
    once without writing anything: unchanged inputs return the stored BatchInfo, no page is
    written and no image read. Otherwise a new run (a random id) starts: the old batch.json is
    kept aside as ``ingest/previous-batch.json`` (for ``created_at``) and removed, so that no
    stage takes the old chunk plan for the new one while the batch is redone.
    """
    settings, store = ctx.settings, ctx.store
    source = open_source(msg.source, ctx, "source")
    manifest = read_manifest(msg.manifest, source, ctx) if msg.manifest else None
    prefix = batch_prefix(msg.batch_id)
    if store.exists(f"{prefix}/ingest.json"):
        digest = _ListingDigest(source.uri)
        for obj in _entries(source, manifest):
            digest.add(obj)
        existing = _existing_batch(
            store, prefix, _fingerprint(msg, source, digest, manifest, settings)
        )
        if existing is not None:
            log.info("batch %s: inputs unchanged, keeping the stored batch", msg.batch_id)
            return Planned(None, 0, existing)

    run = uuid.uuid4().hex
    with contextlib.suppress(StoreError):
        old = store.get(f"{prefix}/batch.json")
        store.put(f"{ingest_prefix(msg.batch_id)}/previous-batch.json", old)
        store.delete(f"{prefix}/batch.json")
    store.delete(listing_key(msg.batch_id))
    store.put(
        ingest_source_key(msg.batch_id),
        IngestSource(
            batch_id=msg.batch_id,
            source=source.uri,
            manifest=manifest.uri if manifest else None,
            run=run,
        )
        .model_dump_json()
        .encode(),
    )
    try:
        pages = _write_pages(msg, ctx, source, manifest, run, on_page)
    except Exception as exc:  # the reducer must not wait for pages that never come
        store.put(listing_key(msg.batch_id), _dumps({"run": run, "failed": str(exc)[:2000]}))
        raise
    return Planned(run, pages)


def _write_pages(
    msg: IngestBatch, ctx: Context, source: ObjectStore, manifest: Manifest | None, run: str,
    on_page: Callable[[str, int], None] | None,
) -> int:  # fmt: skip
    store, size = ctx.store, ctx.settings.ingest_page_size
    digest = _ListingDigest(source.uri)
    matched: set[str] = set()  # manifest keys met in the listing (bounded by the manifest)
    lines: list[bytes] = []
    pages = 0

    def flush() -> None:
        nonlocal pages, lines
        header = _dumps({"run": run, "page": pages})
        store.put(page_key(msg.batch_id, pages), b"\n".join([header, *lines]) + b"\n")
        if on_page is not None:
            on_page(run, pages)
        pages += 1
        lines = []

    for obj in _entries(source, manifest):
        digest.add(obj)
        if manifest is not None and obj.key in manifest.entries:
            matched.add(obj.key)
        entry: dict[str, Any] = {"key": obj.key, "size": obj.size, "problem": obj.problem}
        if obj.problem is None:
            label = _label_for(obj.key, manifest)
            entry.update(label=label.label, group=label.group, split=label.split)
        lines.append(_dumps(entry))
        if len(lines) >= size:
            flush()
    if lines:
        flush()
    extra: list[bytes] = []
    if manifest is not None:
        extra += [
            _dumps({"key": key, "reason": MISSING_REASON, "rank": RANK_MISSING})
            for key in manifest.entries
            if key not in matched
        ]
        extra += [
            _dumps(
                {
                    "key": row.key,
                    "reason": f"manifest line {row.line}: {row.reason}",
                    "rank": RANK_MANIFEST_ROW,
                }
            )
            for row in manifest.rejected
        ]
    store.put(manifest_quarantine_key(msg.batch_id), b"".join(line + b"\n" for line in extra))
    label_source = "manifest" if manifest else "folders" if digest.folders else "none"
    store.put(
        listing_key(msg.batch_id),
        _dumps(
            {
                "run": run,
                "pages": pages,
                "n_listed": digest.n,
                "label_source": label_source,
                "fingerprint": _fingerprint(msg, source, digest, manifest, ctx.settings),
                "failed": None,
            }
        ),
    )
    if on_page is not None and pages == 0:
        on_page(run, -1)  # nothing listed: the reducer still writes the (empty) batch
    log.info("batch %s: %d entries listed in %d pages (run %s)", msg.batch_id, digest.n, pages, run)
    return pages
