"""Celery task of the reporter container: evaluate a batch and write its report."""

from __future__ import annotations

from typing import Any

from kiban.context import Context
from kiban.messages import EvaluateBatch, ExportReport
from kiban.tasks import kiban_task
from kiban_reporter.evaluation import evaluate_batch
from kiban_reporter.export import export_report
from kiban_reporter.trend import export_gauges


@kiban_task(EvaluateBatch)
def evaluate_batch_task(msg: EvaluateBatch, ctx: Context) -> dict[str, Any]:
    """Evaluate a batch from its stored embeddings; writes a new report version."""
    report = evaluate_batch(msg, ctx)
    export_gauges(report)  # quality, CI, regression flag: Prometheus (never raises)
    return {"batch_id": report.batch_id, "version": report.version}


@kiban_task(ExportReport)
def export_report_task(msg: ExportReport, ctx: Context) -> list[str]:
    """Copy a stored report to another prefix (another team's bucket)."""
    return export_report(msg, ctx)
