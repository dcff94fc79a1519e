"""Celery tasks of the ingest container; the work itself lives in ``ingest.py``."""

from __future__ import annotations

from kiban.context import Context
from kiban.messages import IngestBatch
from kiban.records import BatchInfo
from kiban.tasks import kiban_task
from kiban.workflow import after_ingest
from kiban_ingest.ingest import ingest_batch


@kiban_task("ingest_batch", IngestBatch)
def ingest_batch_task(msg: IngestBatch, ctx: Context) -> BatchInfo:
    """Ingest a source prefix as a batch, then send one encode message per model and chunk."""
    info = ingest_batch(msg, ctx)
    after_ingest(msg, info, ctx.store, ctx.settings)
    return info
