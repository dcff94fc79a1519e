"""Turn a source prefix into a batch: validated, labelled, de-duplicated image records.

Output, under ``batches/<batch_id>/`` in the kiban store (see ``kiban.records``)::

    records.jsonl      one ImageRecord per accepted image, sorted by key
    quarantine.jsonl   one QuarantineEntry per rejected file, sorted by key
    batch.json         BatchInfo: counts, classes, chunk plan (written last: the
                       batch exists for other services once this file does)
    ingest.json        the fingerprint of the inputs that produced the above

Decisions:

* Which files: every listed object except hidden ones (the store skips them), the
  manifest itself, and top-level ``manifest.csv``/``manifest.jsonl`` (by convention
  never images). Anything without a supported suffix is *quarantined* with reason
  "unsupported file type", not ignored: a stray ``.gif`` or ``.dcm`` in a labelled
  folder is something the user should see, and nothing is lost silently.
* Only regular files inside the source are read (``kiban.store``): a listing entry that
  is not one — a FIFO, socket or device (never opened), a symbolic link out of the source,
  a dangling link or a link to a folder, a name that is not UTF-8 or cannot be a key, a
  folder that cannot be read — is quarantined with its reason and the batch goes on. A
  link to a regular file inside the source is read (it is a duplicate of its target).
* Size: every object is read with ``KIBAN_MAX_OBJECT_BYTES`` as a bound, enforced while
  streaming; a larger one is quarantined ("too large: …"); a larger manifest is refused.
* Locations: in distributed mode the source and manifest of a message must be allowed
  (``kiban.locations.check_location``); otherwise the message is dead-lettered.
* Identity: the sha256 of the bytes. Identical bytes under several keys are one
  record (the first key in sorted order) listing the other keys in ``duplicates``.
  When those keys carry different labels, the first key's label is kept and the others
  are recorded in ``BatchInfo.label_conflicts`` (sha256, kept key and label, dropped keys
  and labels; the first 1,000, with the total in ``n_label_conflicts``).
* Manifest rows whose key cannot be in the source (absolute, ``..``) are quarantined
  with their line, like rows naming a missing object; nothing outside the source is read.
* Idempotency: outputs are a pure function of the inputs (sorted, no timestamps
  except ``created_at``). A re-run whose fingerprint (source URI, listed keys and
  sizes, manifest bytes, chunk size, image limits) matches ``ingest.json`` returns
  the stored BatchInfo without reading a single image. Otherwise the batch is redone,
  and ``created_at`` is kept when the new files equal the old ones byte for byte.
  Caveat: an object replaced by another of exactly the same size under the same key
  is not noticed by the fingerprint; delete ``ingest.json`` to force a full re-run.
  A batch with unreadable objects never writes the fingerprint, so a re-run retries.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import PurePosixPath

from kiban.context import Context
from kiban.errors import KibanError, ObjectRefusedError, ObjectTooLargeError, StoreError
from kiban.imaging import SUPPORTED_SUFFIXES, ImageRejected, validate_image
from kiban.locations import check_location
from kiban.messages import IngestBatch
from kiban.records import (
    MAX_LABEL_CONFLICTS,
    BatchInfo,
    ChunkPlan,
    ImageRecord,
    KeyLabel,
    LabelConflict,
    QuarantineEntry,
    batch_prefix,
    dump_jsonl,
    write_chunk_records,
)
from kiban.store import ObjectInfo, ObjectStore, open_store, safe_key
from kiban_ingest.labels import (
    LabelEntry,
    ManifestError,
    RejectedRow,
    folder_label,
    parse_manifest,
)
from kiban_ingest.metrics import IMAGES_INGESTED, IMAGES_QUARANTINED, reason_category

log = logging.getLogger(__name__)

#: Bump when the output of ingest changes for the same input (invalidates fingerprints).
INGEST_VERSION = 2
CONVENTIONAL_MANIFESTS = ("manifest.csv", "manifest.jsonl")
LOG_EVERY = 500

MISSING_REASON = "listed in manifest but not found in source"


@dataclass(frozen=True)
class Manifest:
    uri: str
    data: bytes
    key_in_source: str | None  # the manifest's own key when it lies inside the source
    entries: dict[str, LabelEntry]
    rejected: tuple[RejectedRow, ...] = ()  # rows whose key cannot be in the source


@dataclass(frozen=True)
class Inspected:
    """What reading and decoding one object found; exactly one of size/reason is set."""

    key: str
    sha256: str | None
    width: int = 0
    height: int = 0
    reason: str | None = None
    unreadable: bool = False


def ingest_batch(msg: IngestBatch, ctx: Context) -> BatchInfo:
    """List, validate, label and de-duplicate ``msg.source`` into batch ``msg.batch_id``."""
    settings = ctx.settings
    source = open_source(msg.source, ctx, "source")
    manifest = read_manifest(msg.manifest, source, ctx) if msg.manifest else None
    listing = _list_source(source, manifest)
    prefix = batch_prefix(msg.batch_id)
    fingerprint = _fingerprint(msg, source, listing, manifest, ctx)

    existing = _existing_batch(ctx.store, prefix, fingerprint)
    if existing is not None:
        log.info("batch %s: inputs unchanged, keeping the stored batch", msg.batch_id)
        return existing

    started = time.perf_counter()
    objects = [o for o in listing if o.problem is None]
    candidates = [o for o in objects if _supported(o.key)]
    quarantine = [
        QuarantineEntry(key=o.key, reason=o.problem) for o in listing if o.problem is not None
    ]
    quarantine += [
        QuarantineEntry(key=o.key, reason=f"unsupported file type ({_suffix(o.key) or 'none'})")
        for o in objects
        if not _supported(o.key)
    ]
    inspected = _inspect_all(
        source,
        candidates,
        settings.max_image_pixels,
        settings.min_image_side,
        settings.decode_workers,
        msg.batch_id,
        settings.max_object_bytes,
    )
    quarantine += [
        QuarantineEntry(key=i.key, reason=i.reason, sha256=i.sha256)
        for i in inspected
        if i.reason is not None
    ]
    if manifest is not None:
        listed = {o.key for o in listing}
        quarantine += [
            QuarantineEntry(key=key, reason=MISSING_REASON)
            for key in manifest.entries
            if key not in listed
        ]
        quarantine += [
            QuarantineEntry(key=row.key, reason=f"manifest line {row.line}: {row.reason}")
            for row in manifest.rejected
        ]
    quarantine.sort(key=lambda q: q.key)
    records, n_duplicates, conflicts = _records(
        [i for i in inspected if i.reason is None], manifest
    )

    label_source = (
        "manifest" if manifest else "folders" if any("/" in o.key for o in listing) else "none"
    )
    classes = sorted({r.label for r in records if r.label is not None})
    chunks = [
        ChunkPlan(index=n, start=start, stop=min(start + msg.chunk_size, len(records)))
        for n, start in enumerate(range(0, len(records), msg.chunk_size))
    ]
    info = BatchInfo(
        batch_id=msg.batch_id,
        source=source.uri,
        manifest=manifest.uri if manifest else None,
        label_source=label_source,
        n_listed=len(listing),
        n_accepted=len(records),
        n_quarantined=len(quarantine),
        n_duplicates=n_duplicates,
        labelled=bool(classes),
        classes=classes,
        chunks=chunks,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        n_label_conflicts=len(conflicts),
        label_conflicts=conflicts[:MAX_LABEL_CONFLICTS],
    )
    records_bytes, quarantine_bytes = dump_jsonl(records), dump_jsonl(quarantine)
    info = _keep_created_at(ctx.store, prefix, info, records_bytes, quarantine_bytes)

    ctx.store.put(f"{prefix}/records.jsonl", records_bytes)
    write_chunk_records(ctx.store, msg.batch_id, records, chunks)
    ctx.store.put(f"{prefix}/quarantine.jsonl", quarantine_bytes)
    if any(i.unreadable for i in inspected):
        ctx.store.delete(f"{prefix}/ingest.json")  # a re-run must retry those objects
    else:
        ctx.store.put(f"{prefix}/ingest.json", _json_bytes(fingerprint))
    ctx.store.put(f"{prefix}/batch.json", info.model_dump_json(indent=2).encode())

    IMAGES_INGESTED.inc(len(records))
    for entry in quarantine:
        IMAGES_QUARANTINED.labels(reason_category(entry.reason)).inc()
    seconds = time.perf_counter() - started
    log.info(
        "batch %s: %d listed, %d accepted, %d duplicates, %d quarantined in %.1f s (%.0f img/s)",
        msg.batch_id,
        len(listing),
        len(records),
        n_duplicates,
        len(quarantine),
        seconds,
        len(candidates) / seconds if seconds > 0 else 0.0,
    )
    return info


# --- inputs ---------------------------------------------------------------------------


def open_source(uri: str, ctx: Context, what: str) -> ObjectStore:
    """A source store (checked against the allowed locations), every read bounded."""
    settings = ctx.settings
    return open_store(
        check_location(uri, settings, what),
        settings.s3_endpoint_url,
        settings.s3_region,
        max_object_bytes=settings.max_object_bytes,
    )


def read_manifest(uri: str, source: ObjectStore, ctx: Context) -> Manifest:
    """Read and parse the manifest: a URI, or a key relative to the source prefix.

    Read with the same bound as images; a manifest row whose key cannot be in the source
    is set aside (``Manifest.rejected``), a manifest that is not one is refused whole.
    """
    inside: str | None
    limit = ctx.settings.max_object_bytes
    try:
        if "://" not in uri:
            key = safe_key(uri)
            data, full_uri, inside = source.get(key, limit), f"{source.uri}/{key}", key
        else:
            uri = check_location(uri, ctx.settings, "manifest")
            parent, _, name = uri.rstrip("/").rpartition("/")
            if not name or parent.endswith("/"):
                raise ManifestError(
                    f"manifest {uri}: expected file:///dir/name or s3://bucket/name"
                )
            store = open_source(parent, ctx, "manifest")
            data, full_uri = store.get(name, limit), f"{store.uri}/{name}"
            base = source.uri.rstrip("/") + "/"
            inside = full_uri[len(base) :] if full_uri.startswith(base) else None
    except ObjectTooLargeError:
        raise ManifestError(
            f"manifest {uri}: larger than {limit} bytes (KIBAN_MAX_OBJECT_BYTES)"
        ) from None
    except StoreError as exc:
        raise ManifestError(f"manifest {uri}: {exc}") from None
    rejected: list[RejectedRow] = []
    entries = parse_manifest(data, full_uri, rejected)
    return Manifest(full_uri, data, inside, entries, tuple(rejected))


def _list_source(source: ObjectStore, manifest: Manifest | None) -> list[ObjectInfo]:
    """Everything that could be an image, sorted by key; the manifest is not."""
    skip = set(CONVENTIONAL_MANIFESTS)
    if manifest is not None and manifest.key_in_source:
        skip.add(manifest.key_in_source)
    try:
        listing = [o for o in source.list() if o.key not in skip]
    except KibanError:
        raise
    except Exception as exc:  # botocore errors: no such bucket, access denied, ...
        raise StoreError(f"cannot list {source.uri}: {exc}") from exc
    return sorted(listing, key=lambda o: o.key)


def _suffix(key: str) -> str:
    return PurePosixPath(key).suffix.lower()


def _supported(key: str) -> bool:
    return _suffix(key) in SUPPORTED_SUFFIXES


def _fingerprint(
    msg: IngestBatch,
    source: ObjectStore,
    listing: list[ObjectInfo],
    manifest: Manifest | None,
    ctx: Context,
) -> dict[str, object]:
    listed = hashlib.sha256()
    for obj in listing:
        listed.update(f"{obj.key}\t{obj.size}\t{obj.problem or ''}\n".encode())
    return {
        "ingest_version": INGEST_VERSION,
        "source": source.uri,
        "manifest": manifest.uri if manifest else None,
        "manifest_sha256": hashlib.sha256(manifest.data).hexdigest() if manifest else None,
        "listing_sha256": listed.hexdigest(),
        "n_listed": len(listing),
        "chunk_size": msg.chunk_size,
        "max_image_pixels": ctx.settings.max_image_pixels,
        "min_image_side": ctx.settings.min_image_side,
        "max_object_bytes": ctx.settings.max_object_bytes,
    }


def _json_bytes(obj: object) -> bytes:
    return json.dumps(obj, indent=2, sort_keys=True).encode()


def _existing_batch(
    store: ObjectStore, prefix: str, fingerprint: dict[str, object]
) -> BatchInfo | None:
    try:
        stored = json.loads(store.get(f"{prefix}/ingest.json"))
        if stored != fingerprint or not store.exists(f"{prefix}/records.jsonl"):
            return None
        return BatchInfo.model_validate_json(store.get(f"{prefix}/batch.json"))
    except (StoreError, ValueError):
        return None


def _keep_created_at(
    store: ObjectStore, prefix: str, info: BatchInfo, records: bytes, quarantine: bytes
) -> BatchInfo:
    """Same outputs as last time → same batch.json bytes, timestamp included."""
    try:
        old = BatchInfo.model_validate_json(store.get(f"{prefix}/batch.json"))
        same = (
            store.get(f"{prefix}/records.jsonl") == records
            and store.get(f"{prefix}/quarantine.jsonl") == quarantine
            and old.model_copy(update={"created_at": info.created_at}) == info
        )
    except (StoreError, ValueError):
        return info
    return info.model_copy(update={"created_at": old.created_at}) if same else info


# --- reading and decoding -------------------------------------------------------------


def _inspect_all(
    source: ObjectStore,
    objects: list[ObjectInfo],
    max_pixels: int,
    min_side: int,
    workers: int,
    batch_id: str,
    max_bytes: int | None = None,
) -> list[Inspected]:
    """Read, hash and validate every object on a thread pool (Pillow drops the GIL).

    Validation is ``kiban.imaging.validate_image``: PNG/TIFF/BMP fully decoded, JPEG
    entropy-decoded in full but inverse-transformed at 1/8 scale (see its docstring for
    what that still proves).

    Each read is bounded by ``max_bytes`` (also checked against the listed size first, so
    an object listed as too large is not even opened). A refused object (too large, not a
    regular file, a link out of the source) is quarantined for good; any other read error
    marks the object unreadable, so the batch's fingerprint is not kept and a re-run
    retries it.
    """

    def inspect(obj: ObjectInfo) -> Inspected:
        if max_bytes is not None and obj.size > max_bytes:
            reason = f"too large: more than {max_bytes} bytes (KIBAN_MAX_OBJECT_BYTES)"
            return Inspected(obj.key, None, reason=reason)
        try:
            data = source.get(obj.key, max_bytes)
        except ObjectRefusedError as exc:
            return Inspected(obj.key, None, reason=exc.reason)
        except Exception as exc:  # a vanished object or a server error: keep going
            return Inspected(obj.key, None, reason=f"cannot read object: {exc}", unreadable=True)
        digest = hashlib.sha256(data).hexdigest()
        try:  # same rejections and reasons as decode_image; a JPEG is decoded at 1/8 scale
            width, height = validate_image(data, max_pixels=max_pixels, min_side=min_side)
        except ImageRejected as exc:
            return Inspected(obj.key, digest, reason=exc.reason)
        return Inspected(obj.key, digest, width, height)

    results: list[Inspected] = []
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="ingest") as pool:
        for n, result in enumerate(pool.map(inspect, objects), start=1):
            results.append(result)
            if n % LOG_EVERY == 0:
                log.info("batch %s: %d/%d files checked", batch_id, n, len(objects))
    return results


def _records(
    accepted: Iterable[Inspected], manifest: Manifest | None
) -> tuple[list[ImageRecord], int, list[LabelConflict]]:
    """One record per distinct sha256, at its first key; later keys become duplicates.

    The record keeps the label of its first key (code-point order). Duplicates labelled
    differently are returned as label conflicts, ordered by the kept key.
    """
    first: dict[str, Inspected] = {}
    duplicates: dict[str, list[str]] = {}
    for item in sorted(accepted, key=lambda i: i.key):
        assert item.sha256 is not None
        if item.sha256 in first:
            duplicates[item.sha256].append(item.key)
        else:
            first[item.sha256] = item
            duplicates[item.sha256] = []
    records = []
    conflicts = []
    for digest, item in first.items():
        entry = _label_for(item.key, manifest)
        dropped = [
            KeyLabel(key=other, label=label)
            for other in duplicates[digest]
            if (label := _label_for(other, manifest).label) != entry.label
        ]
        if dropped:
            conflicts.append(
                LabelConflict(
                    sha256=digest, kept=KeyLabel(key=item.key, label=entry.label), dropped=dropped
                )
            )
        records.append(
            ImageRecord(
                key=item.key,
                sha256=digest,
                label=entry.label,
                group=entry.group,
                split=entry.split,
                width=item.width,
                height=item.height,
                duplicates=duplicates[digest],
            )
        )
    records.sort(key=lambda r: r.key)
    conflicts.sort(key=lambda c: c.kept.key)
    if conflicts:
        log.warning(
            "%d byte-identical images carry different labels; each record keeps the label of "
            "its first key (see label_conflicts in batch.json)",
            len(conflicts),
        )
    return records, sum(len(d) for d in duplicates.values()), conflicts


def _label_for(key: str, manifest: Manifest | None) -> LabelEntry:
    if manifest is None:
        return LabelEntry(label=folder_label(key))
    return manifest.entries.get(key, LabelEntry(label=None))


__all__ = ["ingest_batch", "open_source", "read_manifest", "ManifestError", "MISSING_REASON"]
