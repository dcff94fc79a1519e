"""Celery tasks of the ingest container; the work lives in ``ingest.py`` and the paged modules.

IngestBatch plans (lists the source into pages), ValidatePage validates one page, and
ReduceIngest de-duplicates the pages in order, sending each chunk's encode messages as soon
as its records are final (``kiban_ingest.run_files``).
"""

from __future__ import annotations

import os
import socket
from typing import Any

from kiban.context import Context
from kiban.errors import KibanError
from kiban.messages import IngestBatch, NightlyRun, ReduceIngest, ValidatePage
from kiban.records import BatchInfo
from kiban.schedule import nightly_batch
from kiban.tasks import kiban_task
from kiban.workflow import after_ingest, after_reduce, dispatch, encode_chunk_with_plan
from kiban_ingest.pages import validate_page
from kiban_ingest.planner import plan_ingest
from kiban_ingest.reducer import reduce_ingest


@kiban_task(IngestBatch)
def ingest_batch_task(msg: IngestBatch, ctx: Context) -> BatchInfo | dict[str, Any]:
    """Plan the batch: list the source into pages, one ValidatePage per page as soon as it is
    written and one ReduceIngest after the first. Unchanged inputs: the stored batch is kept
    and its chunks are sent to the encoders, as before.

    Embedded, the in-process queue runs one task at a time, so page messages would only ever
    find their page done by the reducer: this task runs the same reducer itself, right after
    listing (memory still bounded by a page and a chunk), and sends each chunk to the
    encoders as soon as its records are final. Distributed, it returns once the listing is
    written; the batch is finished by ReduceIngest.
    """
    if ctx.settings.mode == "embedded":
        planned = plan_ingest(msg, ctx)
        if planned.info is None:
            assert planned.run is not None
            info = _reduce(
                ReduceIngest(
                    batch_id=msg.batch_id, run=planned.run, chunk_size=msg.chunk_size, plan=msg.plan
                ),
                ctx,
            )
            if info is None:
                raise KibanError(f"batch {msg.batch_id}: ingest superseded by a newer run")
            return info
        after_ingest(msg, planned.info, ctx.store, ctx.settings)
        return planned.info

    def on_page(run: str, page: int) -> None:
        if page >= 0:
            dispatch(ValidatePage(batch_id=msg.batch_id, run=run, page=page), ctx.settings)
        if page <= 0:  # right after the first page (or, with none, after the listing)
            reduce = ReduceIngest(
                batch_id=msg.batch_id, run=run, chunk_size=msg.chunk_size, plan=msg.plan
            )
            dispatch(reduce, ctx.settings)

    planned = plan_ingest(msg, ctx, on_page)
    if planned.info is not None:
        after_ingest(msg, planned.info, ctx.store, ctx.settings)
        return planned.info
    return {"batch_id": msg.batch_id, "run": planned.run, "pages": planned.pages}


@kiban_task(ValidatePage)
def validate_page_task(msg: ValidatePage, ctx: Context) -> str:
    """Validate one listing page (skipped when done before or claimed by another worker)."""
    me = f"{socket.gethostname()}-{os.getpid()}-{msg.page}"
    return validate_page(ctx, msg.batch_id, msg.run, msg.page, me)


@kiban_task(ReduceIngest)
def reduce_ingest_task(msg: ReduceIngest, ctx: Context) -> BatchInfo | None:
    """De-duplicate the run's pages in order and write the batch (see ``reducer.Reducer``)."""
    return _reduce(msg, ctx)


def _reduce(msg: ReduceIngest, ctx: Context) -> BatchInfo | None:
    def on_chunk(chunk: int) -> None:
        encode_chunk_with_plan(msg.batch_id, chunk, msg.plan, ctx.settings)

    info = reduce_ingest(ctx, msg.batch_id, msg.run, msg.chunk_size, on_chunk=on_chunk)
    if info is not None:
        after_reduce(msg.plan, info, ctx.store, ctx.settings)
    return info


@kiban_task(NightlyRun)
def nightly_run_task(msg: NightlyRun, ctx: Context) -> IngestBatch:
    """The schedule's trigger: send tonight's IngestBatch (the prefix of the night)."""
    batch = nightly_batch(msg, ctx.settings)
    dispatch(batch, ctx.settings)
    return batch
