"""Turn a source prefix into a batch: validated, labelled, de-duplicated image records.

Output, under ``batches/<batch_id>/`` in the kiban store (see ``kiban.records``)::

    records.jsonl      one ImageRecord per accepted image, sorted by key
    quarantine.jsonl   one QuarantineEntry per rejected file, sorted by key
    batch.json         BatchInfo: counts, classes, chunk plan (written last: the
                       batch exists for other services once this file does)
    ingest.json        the fingerprint of the inputs that produced the above

How: in pages (``kiban_ingest.run_files``). The IngestBatch task lists the source in key
order into pages of ``KIBAN_INGEST_PAGE_SIZE`` entries, any ingest worker validates a page
(``ValidatePage``), and one reducer (``ReduceIngest``) takes the pages in key order,
de-duplicates in an on-disk SQLite database and sends each chunk to the encoders as soon
as its records are final. No process holds the batch: memory is bounded by a page and a
chunk (the manifest, one object bounded by ``KIBAN_MAX_OBJECT_BYTES``, is held by the
planner). Every rule below holds in pages exactly as it did in one piece.

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
  sizes, manifest bytes, chunk size, image limits; the listing streamed, never held)
  matches ``ingest.json`` returns the stored BatchInfo without reading a single image.
  Otherwise the batch is redone — a page whose content and limits are unchanged reuses
  its stored validation result — and ``created_at`` is kept when the new files equal the
  old ones byte for byte (compared by sha256, ``ingest/outputs.json``).
  Caveat: an object replaced by another of exactly the same size under the same key
  is not noticed by the fingerprint; delete ``ingest.json`` to force a full re-run.
  A batch with unreadable objects never writes the fingerprint, so a re-run retries.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from kiban.context import Context
from kiban.errors import KibanError, ObjectRefusedError, ObjectTooLargeError, StoreError
from kiban.imaging import SUPPORTED_SUFFIXES, ImageRejected, validate_image
from kiban.locations import check_location
from kiban.messages import MAX_CHUNK_SIZE, IngestBatch
from kiban.records import (
    BatchInfo,
    ImageRecord,
    LabelConflict,
)
from kiban.store import ObjectInfo, ObjectStore, open_store, safe_key
from kiban_ingest.labels import (
    LabelEntry,
    ManifestError,
    RejectedRow,
    folder_label,
    parse_manifest,
)

log = logging.getLogger(__name__)

#: Bump when the output of ingest changes for the same input (invalidates fingerprints).
INGEST_VERSION = 3  # 3: listing pages; page results carry it in their fingerprint
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
    """List, validate, label and de-duplicate ``msg.source`` into batch ``msg.batch_id``.

    In one call, with no queue: the planner writes the listing pages and the reducer
    validates each of them itself (``kiban_ingest.reducer``; the IngestBatch task spreads the
    same pages over the ingest workers instead). Memory stays bounded by a page and a chunk.
    """
    from kiban_ingest.planner import plan_ingest
    from kiban_ingest.reducer import reduce_ingest

    planned = plan_ingest(msg, ctx)
    if planned.info is not None:
        return planned.info
    assert planned.run is not None
    info = reduce_ingest(ctx, msg.batch_id, planned.run, msg.chunk_size, distributed_claims=False)
    if info is None:  # another run of the same batch started meanwhile
        raise KibanError(f"batch {msg.batch_id}: ingest superseded by a newer run")
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


def _suffix(key: str) -> str:
    return PurePosixPath(key).suffix.lower()


def _supported(key: str) -> bool:
    return _suffix(key) in SUPPORTED_SUFFIXES


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
    differently are returned as label conflicts, ordered by the kept key. The same
    de-duplication the reducer runs page by page (``kiban_ingest.dedup.Dedup``), on a list.
    """
    from kiban_ingest.dedup import Dedup

    with tempfile.TemporaryDirectory(prefix="kiban-dedup-") as tmp:
        dedup = Dedup(Path(tmp), MAX_CHUNK_SIZE)
        try:
            for item in sorted(accepted, key=lambda i: i.key):
                entry = _label_for(item.key, manifest)
                dedup.add_record(
                    {
                        "key": item.key,
                        "sha256": item.sha256,
                        "label": entry.label,
                        "group": entry.group,
                        "split": entry.split,
                        "width": item.width,
                        "height": item.height,
                    }
                )
            records = list(dedup.records())
            conflicts, _ = dedup.conflicts(len(records) + 1)
            return records, dedup.n_duplicates(), conflicts
        finally:
            dedup.close()


def _label_for(key: str, manifest: Manifest | None) -> LabelEntry:
    if manifest is None:
        return LabelEntry(label=folder_label(key))
    return manifest.entries.get(key, LabelEntry(label=None))


__all__ = ["ingest_batch", "open_source", "read_manifest", "ManifestError", "MISSING_REASON"]
