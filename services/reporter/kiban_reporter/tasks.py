"""Celery task of the reporter container: evaluate a batch and write its report."""

from __future__ import annotations

from typing import Any

from kiban.context import Context
from kiban.messages import EvaluateBatch
from kiban.tasks import kiban_task
from kiban_reporter.evaluation import evaluate_batch


@kiban_task("evaluate_batch", EvaluateBatch)
def evaluate_batch_task(msg: EvaluateBatch, ctx: Context) -> dict[str, Any]:
    """Evaluate a batch from its stored embeddings; writes a new report version."""
    report = evaluate_batch(msg, ctx)
    return {"batch_id": report.batch_id, "version": report.version}
