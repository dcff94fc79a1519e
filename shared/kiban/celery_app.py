"""The one Celery app every service registers its tasks on.

Celery on Redis is the only way services talk to each other. The embedded default runs
the very same tasks in-process (``task_always_eager``), so there is one code path. Task
modules are found by name, so this library never imports a service.
"""

from __future__ import annotations

import importlib
import importlib.util

from celery import Celery

from kiban.settings import Settings, get_settings

# Each service's task module; a container only has its own service installed.
SERVICE_TASK_MODULES = ("kiban_ingest.tasks", "kiban_encoder.tasks", "kiban_reporter.tasks")

app = Celery("kiban")


def configure(settings: Settings | None = None) -> Celery:
    """Apply settings to the app: JSON only, late acks, prefetch 1, eager when embedded."""
    settings = settings or get_settings()
    app.conf.update(
        broker_url=settings.broker_url,
        result_backend=settings.broker_url,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options={"visibility_timeout": 6 * 3600},
        task_always_eager=settings.mode == "embedded",
        task_eager_propagates=True,
        broker_connection_retry_on_startup=True,
    )
    return app


def load_service_tasks() -> list[str]:
    """Import the task modules of whichever services are installed here."""
    loaded = []
    for module in SERVICE_TASK_MODULES:
        if importlib.util.find_spec(module.split(".")[0]) is not None:
            importlib.import_module(module)
            loaded.append(module)
    return loaded
