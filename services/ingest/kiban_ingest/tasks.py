"""Celery tasks of the ingest container; the work itself lives in ``ingest.py``."""

from __future__ import annotations

from kiban.context import Context
from kiban.messages import IngestBatch, NightlyRun
from kiban.records import BatchInfo
from kiban.schedule import nightly_batch
from kiban.tasks import kiban_task
from kiban.workflow import after_ingest, dispatch
from kiban_ingest.ingest import ingest_batch


@kiban_task(IngestBatch)
def ingest_batch_task(msg: IngestBatch, ctx: Context) -> BatchInfo:
    """Ingest a source prefix as a batch, then send one encode message per model and chunk."""
    info = ingest_batch(msg, ctx)
    after_ingest(msg, info, ctx.store, ctx.settings)
    return info


@kiban_task(NightlyRun)
def nightly_run_task(msg: NightlyRun, ctx: Context) -> IngestBatch:
    """The schedule's trigger: send tonight's IngestBatch (the prefix of the night)."""
    batch = nightly_batch(msg, ctx.settings)
    dispatch(batch, ctx.settings)
    return batch
