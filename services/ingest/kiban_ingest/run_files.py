"""Ingest in pages: a planner lists, any worker validates a page, one reducer de-duplicates.

The rules are those of ``kiban_ingest.ingest`` (its docstring); the paged modules are how they
are kept with memory bounded by a page or a chunk, never by the night:

* ``kiban_ingest.planner``: the IngestBatch task lists the source in key order into pages and
  sends one ``ValidatePage`` per page and one ``ReduceIngest``;
* ``kiban_ingest.pages``: any worker validates a page (``ValidatePage``), claiming it first;
* ``kiban_ingest.reducer``: one reducer takes the pages in order and writes the batch, its
  chunks as soon as their records are final, de-duplicating in ``kiban_ingest.dedup``.

``ingest_batch`` (no queue) runs the same planner and reducer in one call, the reducer doing
every page.

This module holds what they share: where one run's files live in the store and how their
lines are written, the quarantine ranks the lines carry, and which run is current (a newer
planner run of the batch voids an older one's work).
"""

from __future__ import annotations

import json

from kiban.errors import StoreError
from kiban.records import IngestSource, batch_prefix, ingest_source_key
from kiban.store import ObjectStore

#: Quarantine ranks: today's order among entries of one key (a stable sort by key of
#: listing problems, unsupported files, rejected images, manifest-missing, manifest rows).
RANK_LISTING, RANK_UNSUPPORTED, RANK_IMAGE, RANK_MISSING, RANK_MANIFEST_ROW = range(5)


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


def read_run(store: ObjectStore, batch_id: str) -> IngestSource | None:
    try:
        return IngestSource.model_validate_json(store.get(ingest_source_key(batch_id)))
    except StoreError:
        return None
