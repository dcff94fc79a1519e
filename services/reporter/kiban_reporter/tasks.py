"""Celery task of the reporter container: evaluate a batch and write its report."""

from __future__ import annotations

from typing import Any

from kiban.celery_app import app
from kiban.messages import TASK_NAMES, EvaluateBatch
from kiban.tasks import run_task
from kiban_reporter.evaluation import evaluate_batch


@app.task(name=TASK_NAMES["evaluate_batch"], acks_late=True)
def evaluate_batch_task(message: dict[str, Any]) -> dict[str, Any]:
    report = run_task(TASK_NAMES["evaluate_batch"], message, EvaluateBatch, evaluate_batch)
    return {"batch_id": report.batch_id, "version": report.version}
