"""The nightly schedule: which prefix tonight's batch is, and when beat sends it."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from kiban.errors import ConfigurationError
from kiban.messages import IngestBatch, NightlyRun, RunPlan
from kiban.settings import Settings


def nightly_batch(msg: NightlyRun, settings: Settings) -> IngestBatch:
    """The IngestBatch for one night: source and manifest templates with {date} filled in."""
    if not settings.schedule_source:
        raise ConfigurationError("KIBAN_SCHEDULE_SOURCE is not set: no nightly source to ingest")
    if not settings.schedule_models:
        raise ConfigurationError("KIBAN_SCHEDULE_MODELS is not set: no models for the night")
    date = msg.date or datetime.now(timezone.utc).strftime("%Y-%m-%d")
    manifest = (
        settings.schedule_manifest.replace("{date}", date) if settings.schedule_manifest else None
    )
    return IngestBatch(
        batch_id=f"nightly-{date}",
        source=settings.schedule_source.replace("{date}", date),
        manifest=manifest,
        chunk_size=settings.chunk_size,
        plan=RunPlan(models=settings.schedule_models, evaluate=True),
    )


def beat_schedule(settings: Settings) -> dict[str, Any]:
    """Celery beat entry: a NightlyRun message on the ingest queue at KIBAN_SCHEDULE_CRON."""
    from celery.schedules import crontab

    minute, hour, day_of_month, month_of_year, day_of_week = settings.schedule_cron.split()
    return {
        "kiban-nightly": {
            "task": NightlyRun.task,
            "schedule": crontab(
                minute=minute,
                hour=hour,
                day_of_month=day_of_month,
                month_of_year=month_of_year,
                day_of_week=day_of_week,
            ),
            "kwargs": {"message": NightlyRun().model_dump(mode="json")},
            "options": {"queue": NightlyRun.queue},
        }
    }
