"""Reduce the pages in order into the batch: the reducer (the ReduceIngest task, ``Reducer``).

It takes pages strictly in order 0, 1, 2, …; a page's validated result if there is one, else it
validates the page itself when nobody claimed it (work stealing: embedded mode, one task at a
time, and a single ingest worker never wait on anybody), or waits for the worker that claimed
it at most ``KIBAN_INGEST_PAGE_WAIT`` seconds — validating an unclaimed later page meanwhile —
and then validates it itself (a killed worker's page). De-duplication runs in an on-disk SQLite
database in a temporary folder (``kiban_ingest.dedup``: sha256 → kept record; duplicates;
quarantine; classes): pages come in key order, so the first key of a sha256 is known to be kept
the moment its page is processed, and a chunk's records are final (but for their
``duplicates`` lists) as soon as ``chunk_size`` records have been kept — its records file is
written and its EncodeChunk messages sent then, while later pages are validated. At the end
records.jsonl and quarantine.jsonl are streamed from the database to a temporary file and
stored from it, the chunk files whose records gained duplicates are rewritten, then ingest.json
and batch.json (last, as before). (The whole scheme: ``kiban_ingest.run_files``.)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kiban.context import Context
from kiban.errors import KibanError, StoreError
from kiban.records import MAX_LABEL_CONFLICTS, BatchInfo, ChunkPlan, batch_prefix, chunk_records_key
from kiban.store import ObjectStore, put_file
from kiban_ingest.dedup import Dedup
from kiban_ingest.ingest import _json_bytes, open_source
from kiban_ingest.metrics import IMAGES_INGESTED, IMAGES_QUARANTINED, reason_category
from kiban_ingest.pages import (
    Claims,
    PageResult,
    _page_fingerprint,
    _read_page,
    _stored_result,
    validate_page_body,
)
from kiban_ingest.run_files import (
    SupersededError,
    ingest_prefix,
    listing_key,
    manifest_quarantine_key,
    read_run,
)

log = logging.getLogger(__name__)

#: How often a waiting reducer looks again (doubling up to the max: each look costs store
#: and broker requests that compete with the validators for the same cores), and how far
#: ahead it steals pages meanwhile.
POLL_SECONDS = 0.05
POLL_MAX_SECONDS = 1.0
LOOKAHEAD_PAGES = 8


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
