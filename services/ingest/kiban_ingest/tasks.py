"""Celery task of the ingest container; the work itself lives in ``ingest.py``."""

from __future__ import annotations

from typing import Any

from kiban.celery_app import app
from kiban.context import Context
from kiban.messages import TASK_NAMES, IngestBatch
from kiban.records import BatchInfo
from kiban.tasks import run_task
from kiban.workflow import after_ingest
from kiban_ingest.ingest import ingest_batch


def _ingest_then_plan(msg: IngestBatch, ctx: Context) -> BatchInfo:
    info = ingest_batch(msg, ctx)
    after_ingest(msg, info, ctx.store, ctx.settings)
    return info


@app.task(name=TASK_NAMES["ingest_batch"], acks_late=True)
def ingest_batch_task(message: dict[str, Any]) -> dict[str, Any]:
    """Validate ``message`` as IngestBatch (bad ones are dead-lettered), ingest, send the plan."""
    info = run_task(TASK_NAMES["ingest_batch"], message, IngestBatch, _ingest_then_plan)
    return info.model_dump(mode="json")  # type: ignore[no-any-return]
