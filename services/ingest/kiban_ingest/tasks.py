"""Celery task of the ingest container; the work itself lives in ``ingest.py``."""

from __future__ import annotations

from typing import Any

from kiban.celery_app import app
from kiban.messages import TASK_NAMES, IngestBatch
from kiban.tasks import run_task

from kiban_ingest.ingest import ingest_batch


@app.task(name=TASK_NAMES["ingest_batch"], bind=True, acks_late=True)
def ingest_batch_task(self: Any, message: dict[str, Any]) -> dict[str, Any]:
    """Validate ``message`` as IngestBatch (bad ones are dead-lettered) and ingest it."""
    info = run_task(TASK_NAMES["ingest_batch"], message, IngestBatch, ingest_batch)
    return info.model_dump(mode="json")
