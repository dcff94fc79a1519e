"""Ingest in pages: a planner lists, any worker validates a page, one reducer de-duplicates.

The rules are those of ``kiban_ingest.ingest`` (its docstring); this module is how they are
kept with memory bounded by a page or a chunk, never by the night:

* **Planner** (the IngestBatch task, ``plan_ingest``): streams the source listing, which every
  store yields in ascending key order (checked: a listing that goes backwards is an error),
  and writes it in pages of ``KIBAN_INGEST_PAGE_SIZE`` entries to
  ``batches/<id>/ingest/pages/page-NNNNNN.jsonl`` (key, size, listing problem, label, group,
  split), sending one ``ValidatePage`` per page as soon as it is written and one
  ``ReduceIngest`` after the first. The manifest stays in memory here (one object, bounded by
  ``KIBAN_MAX_OBJECT_BYTES``, exactly as before); the manifest keys no listing entry matched
  become "listed in manifest but not found in source" entries of
  ``ingest/manifest-quarantine.jsonl`` (with the rejected rows). Last, ``ingest/listing.json``:
  the number of pages and the listing's streaming fingerprint.
* **ValidatePage** (``validate_page``): reads, hashes and validates the objects of one page
  exactly as before (``_inspect_all``) into ``ingest/validated/page-NNNNNN.jsonl`` with the
  page's fingerprint (page content, source, image limits, ``INGEST_VERSION``): a page validated
  before with the same fingerprint is not read again — unless it had unreadable objects and was
  validated by another run (those are retried, as before). A worker claims the page first, so
  the reducer knows someone is on it.
* **Reducer** (``Reducer``): takes pages strictly in order 0, 1, 2, …; a page's validated result
  if there is one, else it validates the page itself when nobody claimed it (work stealing:
  embedded mode, one task at a time, and a single ingest worker never wait on anybody), or
  waits for the worker that claimed it at most ``KIBAN_INGEST_PAGE_WAIT`` seconds — validating
  an unclaimed later page meanwhile — and then validates it itself (a killed worker's page).
  De-duplication runs in an on-disk SQLite database in a temporary folder (sha256 → kept record;
  duplicates; quarantine; classes): pages come in key order, so the first key of a sha256 is
  known to be kept the moment its page is processed, and a chunk's records are final (but for
  their ``duplicates`` lists) as soon as ``chunk_size`` records have been kept — its records file
  is written and its EncodeChunk messages sent then, while later pages are validated. At the end
  records.jsonl and quarantine.jsonl are streamed from the database to a temporary file and
  stored from it, the chunk files whose records gained duplicates are rewritten, then
  ingest.json and batch.json (last, as before).

``ingest_batch`` (no queue) runs the same planner and reducer in one call, the reducer doing
every page.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sqlite3
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kiban.context import Context
from kiban.errors import KibanError, StoreError
from kiban.messages import IngestBatch
from kiban.records import (
    MAX_LABEL_CONFLICTS,
    BatchInfo,
    ChunkPlan,
    ImageRecord,
    IngestSource,
    KeyLabel,
    LabelConflict,
    QuarantineEntry,
    batch_prefix,
    chunk_records_key,
    ingest_source_key,
)
from kiban.settings import Settings
from kiban.store import ObjectInfo, ObjectStore, put_file
from kiban.transient import broker_is_transient, translated
from kiban_ingest.ingest import (
    CONVENTIONAL_MANIFESTS,
    INGEST_VERSION,
    MISSING_REASON,
    Inspected,
    Manifest,
    _existing_batch,
    _inspect_all,
    _json_bytes,
    _label_for,
    _suffix,
    _supported,
    open_source,
    read_manifest,
)
from kiban_ingest.metrics import IMAGES_INGESTED, IMAGES_QUARANTINED, reason_category

log = logging.getLogger(__name__)

#: Quarantine ranks: today's order among entries of one key (a stable sort by key of
#: listing problems, unsupported files, rejected images, manifest-missing, manifest rows).
RANK_LISTING, RANK_UNSUPPORTED, RANK_IMAGE, RANK_MISSING, RANK_MANIFEST_ROW = range(5)
#: How often a waiting reducer looks again (doubling up to the max: each look costs store
#: and broker requests that compete with the validators for the same cores), and how far
#: ahead it steals pages meanwhile.
POLL_SECONDS = 0.05
POLL_MAX_SECONDS = 1.0
LOOKAHEAD_PAGES = 8
#: SQLite page cache of the reducer (KiB): the database lives on disk, this is what it keeps.
SQLITE_CACHE_KIB = 16 * 1024
#: How long a claim on a page lives in Redis (a run is long over by then).
CLAIM_SECONDS = 24 * 3600


def ingest_prefix(batch_id: str) -> str:
    return f"{batch_prefix(batch_id)}/ingest"


def page_key(batch_id: str, page: int) -> str:
    return f"{ingest_prefix(batch_id)}/pages/page-{page:06d}.jsonl"


def validated_key(batch_id: str, page: int) -> str:
    return f"{ingest_prefix(batch_id)}/validated/page-{page:06d}.jsonl"


def listing_key(batch_id: str) -> str:
    return f"{ingest_prefix(batch_id)}/listing.json"


def manifest_quarantine_key(batch_id: str) -> str:
    return f"{ingest_prefix(batch_id)}/manifest-quarantine.jsonl"


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), sort_keys=True).encode()


class SupersededError(Exception):
    """A newer planner run of the same batch has started: this run's work is void."""


# --- planner ----------------------------------------------------------------------------


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


# --- one page ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PageResult:
    """A validated page: one row per listing entry, in listing order."""

    rows: list[dict[str, Any]]
    unreadable: bool


def read_run(store: ObjectStore, batch_id: str) -> IngestSource | None:
    try:
        return IngestSource.model_validate_json(store.get(ingest_source_key(batch_id)))
    except StoreError:
        return None


def _read_page(store: ObjectStore, batch_id: str, run: str, page: int) -> bytes | None:
    """The page's entry lines (header dropped); None while it is not written. A page of
    another run means this run was superseded."""
    try:
        data = store.get(page_key(batch_id, page))
    except StoreError:
        return None
    header, _, body = data.partition(b"\n")
    if json.loads(header).get("run") != run:
        raise SupersededError(f"page {page} belongs to another run")
    return body


def _page_fingerprint(body: bytes, source_uri: str, settings: Settings) -> str:
    h = hashlib.sha256()
    limits = (INGEST_VERSION, source_uri, settings.max_image_pixels, settings.min_image_side)
    h.update(_dumps([*limits, settings.max_object_bytes]) + b"\n")
    h.update(body)
    return h.hexdigest()


def _stored_result(
    store: ObjectStore, batch_id: str, run: str, page: int, fingerprint: str
) -> PageResult | None:
    """The stored result of the page when it is reusable: same fingerprint, and no
    unreadable object unless this very run read it (a new run retries those)."""
    try:
        data = store.get(validated_key(batch_id, page))
    except StoreError:
        return None
    header_line, _, body = data.partition(b"\n")
    header = json.loads(header_line)
    if header.get("fingerprint") != fingerprint:
        return None
    if header.get("unreadable") and header.get("run") != run:
        return None
    rows = [json.loads(line) for line in body.splitlines() if line.strip()]
    return PageResult(rows, bool(header.get("unreadable")))


def validate_page_body(
    ctx: Context, source: ObjectStore, batch_id: str, run: str, page: int, body: bytes
) -> PageResult:
    """Validate the page's objects (as before: ``_inspect_all``) and store the result."""
    settings = ctx.settings
    entries = [json.loads(line) for line in body.splitlines() if line.strip()]
    candidates = [
        ObjectInfo(e["key"], e["size"])
        for e in entries
        if e["problem"] is None and _supported(e["key"])
    ]
    inspected: dict[str, Inspected] = {
        i.key: i
        for i in _inspect_all(
            source,
            candidates,
            settings.max_image_pixels,
            settings.min_image_side,
            settings.decode_workers,
            batch_id,
            settings.max_object_bytes,
        )
    }
    rows: list[dict[str, Any]] = []
    for e in entries:
        key = e["key"]
        if e["problem"] is not None:
            rows.append({"key": key, "reason": e["problem"], "rank": RANK_LISTING})
        elif not _supported(key):
            reason = f"unsupported file type ({_suffix(key) or 'none'})"
            rows.append({"key": key, "reason": reason, "rank": RANK_UNSUPPORTED})
        else:
            i = inspected[key]
            row: dict[str, Any] = {"key": key, "sha256": i.sha256}
            if i.reason is not None:
                row.update(reason=i.reason, rank=RANK_IMAGE, unreadable=i.unreadable)
            else:
                row.update(
                    width=i.width,
                    height=i.height,
                    label=e.get("label"),
                    group=e.get("group"),
                    split=e.get("split"),
                )
            rows.append(row)
    unreadable = any(r.get("unreadable") for r in rows)
    header = _dumps(
        {
            "fingerprint": _page_fingerprint(body, source.uri, settings),
            "run": run,
            "unreadable": unreadable,
        }
    )
    ctx.store.put(validated_key(batch_id, page), b"\n".join([header, *map(_dumps, rows)]) + b"\n")
    return PageResult(rows, unreadable)


class Claims:
    """Who is validating which page of a run. Distributed: Redis ``SET NX`` on the broker
    (atomic across workers). Embedded, tasks run one at a time in one process: nobody else
    can be on a page, so every claim is granted."""

    def __init__(self, settings: Settings) -> None:
        self.client = None
        if settings.mode == "distributed":
            import redis

            self.client = redis.Redis.from_url(settings.broker_url)

    def claim(self, batch_id: str, run: str, page: int, me: str) -> str | None:
        """None when ``me`` holds the page now (newly or already); else the holder."""
        if self.client is None:
            return None
        key = f"kiban:ingest:{batch_id}:{run}:{page}"
        with translated("broker", broker_is_transient):
            if self.client.set(key, me, nx=True, ex=CLAIM_SECONDS):
                return None
            holder = self.client.get(key)
        text = holder.decode() if isinstance(holder, bytes) else str(holder)
        return None if text == me else text


def validate_page(ctx: Context, batch_id: str, run: str, page: int, me: str) -> str:
    """The ValidatePage task's work; what happened, in a word (for the task result)."""
    current = read_run(ctx.store, batch_id)
    if current is None or current.run != run:
        return "superseded"
    source = open_source(current.source, ctx, "source")
    try:
        body = _read_page(ctx.store, batch_id, run, page)
    except SupersededError:
        return "superseded"
    if body is None:
        raise KibanError(f"batch {batch_id}: no listing page {page} of run {run}")
    fingerprint = _page_fingerprint(body, source.uri, ctx.settings)
    if _stored_result(ctx.store, batch_id, run, page, fingerprint) is not None:
        return "done before"
    holder = Claims(ctx.settings).claim(batch_id, run, page, me)
    if holder is not None:
        return f"claimed by {holder}"
    validate_page_body(ctx, source, batch_id, run, page, body)
    return "validated"


# --- reducer ----------------------------------------------------------------------------

SCHEMA = """
CREATE TABLE records (seq INTEGER PRIMARY KEY, key TEXT NOT NULL, sha256 TEXT NOT NULL UNIQUE,
    label TEXT, grp TEXT, split TEXT, width INTEGER, height INTEGER);
CREATE TABLE dups (id INTEGER PRIMARY KEY, sha256 TEXT NOT NULL, key TEXT NOT NULL, label TEXT);
CREATE INDEX dups_sha ON dups (sha256);
CREATE TABLE quarantine (id INTEGER PRIMARY KEY, key TEXT NOT NULL, rank INTEGER NOT NULL,
    reason TEXT NOT NULL, sha256 TEXT);
CREATE TABLE classes (label TEXT PRIMARY KEY);
CREATE TABLE dirty (chunk INTEGER PRIMARY KEY);
"""


class Dedup:
    """Records in key order, de-duplicated by sha256, in an on-disk SQLite database.

    ``add`` must be called in ascending key order: a sha256's first key is then kept for good
    the moment it is added. SQLite orders TEXT by its UTF-8 bytes, which is code-point order —
    Python's string order — for every key and label kiban accepts (no lone surrogates).
    """

    def __init__(self, folder: Path, chunk_size: int) -> None:
        self.db = sqlite3.connect(folder / "ingest.sqlite", isolation_level=None)
        self.db.execute(f"PRAGMA cache_size=-{SQLITE_CACHE_KIB}")
        self.db.execute("PRAGMA journal_mode=OFF")
        self.db.execute("PRAGMA synchronous=OFF")
        self.db.executescript(SCHEMA)
        self.db.execute("BEGIN")
        self.chunk_size = chunk_size
        self.n_records = 0
        self.written = 0  # records [0, written) are in chunk files already
        self.unreadable = False

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self.db.execute("COMMIT")
        self.db.close()

    def add_record(self, row: dict[str, Any]) -> None:
        found = self.db.execute(
            "SELECT seq, label FROM records WHERE sha256 = ?", (row["sha256"],)
        ).fetchone()
        if found is None:
            self.db.execute(
                "INSERT INTO records VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    self.n_records,
                    row["key"],
                    row["sha256"],
                    row.get("label"),
                    row.get("group"),
                    row.get("split"),
                    row["width"],
                    row["height"],
                ),
            )
            if row.get("label") is not None:
                self.db.execute("INSERT OR IGNORE INTO classes VALUES (?)", (row["label"],))
            self.n_records += 1
            return
        self.db.execute(
            "INSERT INTO dups (sha256, key, label) VALUES (?, ?, ?)",
            (row["sha256"], row["key"], row.get("label")),
        )
        if found[0] < self.written:  # its chunk file is out of date now
            self.db.execute(
                "INSERT OR IGNORE INTO dirty VALUES (?)", (found[0] // self.chunk_size,)
            )

    def add_quarantine(self, key: str, rank: int, reason: str, sha256: str | None) -> None:
        self.db.execute(
            "INSERT INTO quarantine (key, rank, reason, sha256) VALUES (?, ?, ?, ?)",
            (key, rank, reason, sha256),
        )

    def add_page(self, result: PageResult) -> None:
        for row in result.rows:
            if "reason" in row:
                self.add_quarantine(row["key"], row["rank"], row["reason"], row.get("sha256"))
            else:
                self.add_record(row)
        self.unreadable = self.unreadable or result.unreadable

    def records(self, start: int = 0, stop: int | None = None) -> Iterator[ImageRecord]:
        """Records [start, stop) in key order, each with its duplicates (so far)."""
        stop = self.n_records if stop is None else stop
        cursor = self.db.execute(
            "SELECT r.seq, r.key, r.sha256, r.label, r.grp, r.split, r.width, r.height, d.key "
            "FROM records r LEFT JOIN dups d ON d.sha256 = r.sha256 "
            "WHERE r.seq >= ? AND r.seq < ? ORDER BY r.seq, d.id",
            (start, stop),
        )
        current: list[Any] | None = None
        dups: list[str] = []
        for row in cursor:
            if current is None or row[0] != current[0]:
                if current is not None:
                    yield _record(current, dups)
                current, dups = list(row), []
            if row[8] is not None:
                dups.append(row[8])
        if current is not None:
            yield _record(current, dups)

    def quarantine(self) -> Iterator[QuarantineEntry]:
        cursor = self.db.execute(
            "SELECT key, reason, sha256 FROM quarantine ORDER BY key, rank, id"
        )
        for key, reason, sha256 in cursor:
            yield QuarantineEntry(key=key, reason=reason, sha256=sha256)

    def n_duplicates(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM dups").fetchone()[0])

    def n_quarantined(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM quarantine").fetchone()[0])

    def classes(self) -> list[str]:
        return [row[0] for row in self.db.execute("SELECT label FROM classes ORDER BY label")]

    def dirty_chunks(self) -> list[int]:
        return [row[0] for row in self.db.execute("SELECT chunk FROM dirty ORDER BY chunk")]

    def conflicts(self, limit: int) -> tuple[list[LabelConflict], int]:
        """The first ``limit`` label conflicts by kept key, and how many there are."""
        where = (
            "FROM records r WHERE EXISTS (SELECT 1 FROM dups d "
            "WHERE d.sha256 = r.sha256 AND d.label IS NOT r.label)"
        )
        total = int(self.db.execute(f"SELECT COUNT(*) {where}").fetchone()[0])
        conflicts = []
        rows = self.db.execute(
            f"SELECT r.sha256, r.key, r.label {where} ORDER BY r.seq LIMIT ?", (limit,)
        ).fetchall()
        for sha256, key, label in rows:
            dropped = [
                KeyLabel(key=k, label=lab)
                for k, lab in self.db.execute(
                    "SELECT key, label FROM dups WHERE sha256 = ? AND label IS NOT ? ORDER BY id",
                    (sha256, label),
                )
            ]
            conflicts.append(
                LabelConflict(sha256=sha256, kept=KeyLabel(key=key, label=label), dropped=dropped)
            )
        return conflicts, total


def _record(row: list[Any], dups: list[str]) -> ImageRecord:
    return ImageRecord(
        key=row[1],
        sha256=row[2],
        label=row[3],
        group=row[4],
        split=row[5],
        width=row[6],
        height=row[7],
        duplicates=dups,
    )


def _jsonl_lines(items: Iterator[Any]) -> Iterator[bytes]:
    for item in items:
        yield (item.model_dump_json() + "\n").encode()


class Reducer:
    """One ingest run's reduce step (see the module docstring)."""

    def __init__(
        self,
        ctx: Context,
        batch_id: str,
        run: str,
        chunk_size: int,
        claims: Claims | None = None,
        on_chunk: Callable[[int], None] | None = None,
        page_wait: float | None = None,
    ) -> None:
        self.ctx, self.store = ctx, ctx.store
        self.batch_id, self.run, self.chunk_size = batch_id, run, chunk_size
        self.claims, self.on_chunk = claims, on_chunk
        self.page_wait = ctx.settings.ingest_page_wait if page_wait is None else page_wait
        self.me = f"reduce-{run}"
        self.prefix = batch_prefix(batch_id)
        self._source: ObjectStore | None = None
        self.stolen = 0
        # Later pages already validated or claimed by another worker: never looked at again
        # while waiting (a claimed page's result is awaited when the reducer gets to it).
        self._settled: set[int] = set()

    @property
    def source(self) -> ObjectStore:
        if self._source is None:
            current = read_run(self.store, self.batch_id)
            if current is None or current.run != self.run:
                raise SupersededError("another ingest run of the batch started")
            self._source = open_source(current.source, self.ctx, "source")
        return self._source

    def run_all(self) -> BatchInfo | None:
        """Reduce every page; the BatchInfo written, or None when a newer run took over."""
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="kiban-ingest-") as tmp:
            dedup = Dedup(Path(tmp), self.chunk_size)
            try:
                try:
                    listing = self._reduce_pages(dedup)
                except SupersededError as exc:
                    log.warning("batch %s run %s: %s; stopping", self.batch_id, self.run, exc)
                    return None
                info = self._finish(dedup, listing, Path(tmp))
            finally:
                dedup.close()
        seconds = time.perf_counter() - started
        log.info(
            "batch %s: %d listed, %d accepted, %d duplicates, %d quarantined in %.1f s "
            "(%d pages validated by the reducer)",
            self.batch_id,
            info.n_listed,
            info.n_accepted,
            info.n_duplicates,
            info.n_quarantined,
            seconds,
            self.stolen,
        )
        return info

    # pages, in order

    def _listing(self) -> dict[str, Any] | None:
        try:
            listing = json.loads(self.store.get(listing_key(self.batch_id)))
        except StoreError:
            return None
        if listing.get("run") != self.run:
            raise SupersededError("the listing belongs to another run")
        if listing.get("failed"):
            raise KibanError(f"batch {self.batch_id}: listing failed: {listing['failed']}")
        return dict(listing)

    def _reduce_pages(self, dedup: Dedup) -> dict[str, Any]:
        page = 0
        waiting_since: float | None = None
        while True:
            listing = self._listing()
            if listing is not None and page >= listing["pages"]:
                return listing
            body = _read_page(self.store, self.batch_id, self.run, page)
            if body is None:  # the planner is still listing
                if listing is not None:
                    raise KibanError(f"batch {self.batch_id}: listing page {page} is missing")
                waiting_since = waiting_since or time.monotonic()
                if time.monotonic() - waiting_since > max(self.page_wait, 600):
                    raise KibanError(
                        f"batch {self.batch_id}: no listing page {page} after "
                        f"{time.monotonic() - waiting_since:.0f}s (is the IngestBatch task dead?)"
                    )
                current = read_run(self.store, self.batch_id)
                if current is None or current.run != self.run:
                    raise SupersededError("another ingest run of the batch started")
                time.sleep(POLL_SECONDS)
                continue
            waiting_since = None
            dedup.add_page(self._result(page, body))
            while dedup.n_records - dedup.written >= self.chunk_size:
                self._write_chunk(dedup, dedup.written // self.chunk_size, send=True)
                dedup.written += self.chunk_size
            page += 1

    def _result(self, page: int, body: bytes) -> PageResult:
        fingerprint = _page_fingerprint(body, self.source.uri, self.ctx.settings)
        waited_from: float | None = None
        delay = POLL_SECONDS
        while True:
            stored = _stored_result(self.store, self.batch_id, self.run, page, fingerprint)
            if stored is not None:
                return stored
            holder = self._claim(page)
            if holder is None:
                self.stolen += 1
                return validate_page_body(
                    self.ctx, self.source, self.batch_id, self.run, page, body
                )
            waited_from = waited_from or time.monotonic()
            if time.monotonic() - waited_from > self.page_wait:
                log.warning(
                    "batch %s: page %d claimed by %s, no result after %.0f s "
                    "(KIBAN_INGEST_PAGE_WAIT): validating it here",
                    self.batch_id,
                    page,
                    holder,
                    time.monotonic() - waited_from,
                )
                self.stolen += 1
                return validate_page_body(
                    self.ctx, self.source, self.batch_id, self.run, page, body
                )
            if self._steal_ahead(page):
                delay = POLL_SECONDS
            else:
                time.sleep(delay)
                delay = min(POLL_MAX_SECONDS, delay * 2)

    def _claim(self, page: int) -> str | None:
        if self.claims is None:
            return None
        return self.claims.claim(self.batch_id, self.run, page, self.me)

    def _steal_ahead(self, page: int) -> bool:
        """While waiting on ``page``: validate one later page nobody has claimed."""
        for ahead in range(page + 1, page + 1 + LOOKAHEAD_PAGES):
            if ahead in self._settled:
                continue
            body = _read_page(self.store, self.batch_id, self.run, ahead)
            if body is None:
                return False
            self._settled.add(ahead)
            fingerprint = _page_fingerprint(body, self.source.uri, self.ctx.settings)
            if _stored_result(self.store, self.batch_id, self.run, ahead, fingerprint):
                continue
            if self._claim(ahead) is None:
                self.stolen += 1
                validate_page_body(self.ctx, self.source, self.batch_id, self.run, ahead, body)
                return True
        return False

    # outputs

    def _write_chunk(self, dedup: Dedup, chunk: int, send: bool) -> None:
        """Write a chunk's records file; ``send``: its EncodeChunk messages too (a chunk is
        sent once, when its records are final but for their ``duplicates`` lists)."""
        start = chunk * self.chunk_size
        stop = min(start + self.chunk_size, dedup.n_records)
        data = b"".join(_jsonl_lines(dedup.records(start, stop)))
        self.store.put(chunk_records_key(self.batch_id, chunk), data)
        if send and self.on_chunk is not None:
            self.on_chunk(chunk)

    def _stream_to_store(self, key: str, lines: Iterator[bytes], tmp: Path) -> str:
        """Write ``lines`` to a temporary file, store it, return its sha256."""
        digest = hashlib.sha256()
        path = tmp / "out.jsonl"
        with open(path, "wb") as fh:
            for line in lines:
                digest.update(line)
                fh.write(line)
        put_file(self.store, key, path)
        os.unlink(path)
        return digest.hexdigest()

    def _finish(self, dedup: Dedup, listing: dict[str, Any], tmp: Path) -> BatchInfo:
        mq = self.store.get(manifest_quarantine_key(self.batch_id))
        for line in mq.splitlines():
            if line.strip():
                row = json.loads(line)
                dedup.add_quarantine(row["key"], row["rank"], row["reason"], None)
        n = dedup.n_records
        chunks = [
            ChunkPlan(index=i, start=start, stop=min(start + self.chunk_size, n))
            for i, start in enumerate(range(0, n, self.chunk_size))
        ]
        conflicts, n_conflicts = dedup.conflicts(MAX_LABEL_CONFLICTS)
        if n_conflicts:
            log.warning(
                "%d byte-identical images carry different labels; each record keeps the label "
                "of its first key (see label_conflicts in batch.json)",
                n_conflicts,
            )
        current = read_run(self.store, self.batch_id)
        fingerprint = listing["fingerprint"]
        info = BatchInfo(
            batch_id=self.batch_id,
            source=str(fingerprint["source"]),
            manifest=current.manifest if current else None,
            label_source=listing["label_source"],
            n_listed=listing["n_listed"],
            n_accepted=n,
            n_quarantined=dedup.n_quarantined(),
            n_duplicates=dedup.n_duplicates(),
            labelled=bool(dedup.classes()),
            classes=dedup.classes(),
            chunks=chunks,
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            n_label_conflicts=n_conflicts,
            label_conflicts=conflicts,
        )
        records_sha = self._stream_to_store(
            f"{self.prefix}/records.jsonl", _jsonl_lines(dedup.records()), tmp
        )
        for chunk in dedup.dirty_chunks():  # duplicates found after the chunk was written
            self._write_chunk(dedup, chunk, send=False)
        if dedup.written < n:  # the last, partial chunk
            self._write_chunk(dedup, dedup.written // self.chunk_size, send=True)

        def quarantine_lines() -> Iterator[bytes]:
            for entry in dedup.quarantine():
                IMAGES_QUARANTINED.labels(reason_category(entry.reason)).inc()
                yield (entry.model_dump_json() + "\n").encode()

        quarantine_sha = self._stream_to_store(
            f"{self.prefix}/quarantine.jsonl", quarantine_lines(), tmp
        )
        info = self._keep_created_at(info, records_sha, quarantine_sha)
        outputs = {"records_sha256": records_sha, "quarantine_sha256": quarantine_sha}
        self.store.put(f"{ingest_prefix(self.batch_id)}/outputs.json", _json_bytes(outputs))
        if dedup.unreadable:
            self.store.delete(f"{self.prefix}/ingest.json")  # a re-run must retry those objects
        else:
            self.store.put(f"{self.prefix}/ingest.json", _json_bytes(fingerprint))
        self.store.put(f"{self.prefix}/batch.json", info.model_dump_json(indent=2).encode())
        self.store.delete(f"{ingest_prefix(self.batch_id)}/previous-batch.json")
        IMAGES_INGESTED.inc(n)
        return info

    def _keep_created_at(self, info: BatchInfo, records_sha: str, quarantine_sha: str) -> BatchInfo:
        """Same outputs as last time → same batch.json bytes, timestamp included (compared by
        digest: the previous run's ``ingest/outputs.json``)."""
        try:
            old_outputs = json.loads(self.store.get(f"{ingest_prefix(self.batch_id)}/outputs.json"))
            try:
                raw = self.store.get(f"{ingest_prefix(self.batch_id)}/previous-batch.json")
            except StoreError:
                raw = self.store.get(f"{self.prefix}/batch.json")
            old = BatchInfo.model_validate_json(raw)
        except (StoreError, ValueError):
            return info
        same = (
            old_outputs.get("records_sha256") == records_sha
            and old_outputs.get("quarantine_sha256") == quarantine_sha
            and old.model_copy(update={"created_at": info.created_at}) == info
        )
        return info.model_copy(update={"created_at": old.created_at}) if same else info


def reduce_ingest(
    ctx: Context,
    batch_id: str,
    run: str,
    chunk_size: int,
    distributed_claims: bool = True,
    on_chunk: Callable[[int], None] | None = None,
) -> BatchInfo | None:
    """The ReduceIngest task's work (``ingest_batch`` runs it with no claims and no chunks
    sent)."""
    claims = Claims(ctx.settings) if distributed_claims else None
    return Reducer(ctx, batch_id, run, chunk_size, claims, on_chunk).run_all()
