"""Validate one page of the listing: ValidatePage (``validate_page``), its result and claims.

A worker reads, hashes and validates the objects of one page exactly as before
(``_inspect_all``) into ``ingest/validated/page-NNNNNN.jsonl`` with the page's fingerprint (page
content, source, image limits, ``INGEST_VERSION``): a page validated before with the same
fingerprint is not read again — unless it had unreadable objects and was validated by another
run (those are retried, as before). A worker claims the page first, so the reducer knows
someone is on it. (The whole scheme: ``kiban_ingest.run_files``.)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from kiban.context import Context
from kiban.errors import KibanError, StoreError
from kiban.settings import Settings
from kiban.store import ObjectInfo, ObjectStore
from kiban.transient import broker_is_transient, translated
from kiban_ingest.ingest import (
    INGEST_VERSION,
    Inspected,
    _inspect_all,
    _suffix,
    _supported,
    open_source,
)
from kiban_ingest.run_files import (
    RANK_IMAGE,
    RANK_LISTING,
    RANK_UNSUPPORTED,
    SupersededError,
    _dumps,
    page_key,
    read_run,
    validated_key,
)

#: How long a claim on a page lives in Redis (a run is long over by then).
CLAIM_SECONDS = 24 * 3600


@dataclass(frozen=True)
class PageResult:
    """A validated page: one row per listing entry, in listing order."""

    rows: list[dict[str, Any]]
    unreadable: bool


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
