"""The one Celery app every service registers its tasks on.

Celery on Redis is the only way services talk to each other. The embedded default runs
the very same tasks from an in-process queue (``kiban.local_queue``), so there is one code
path. Routing comes from the message registry (``kiban.messages``); task modules are found
by name, so this library never imports a service.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging

from celery import Celery

from kiban.liveness import LivenessStep, restore_sweep_interval
from kiban.messages import task_queues
from kiban.settings import Settings, get_settings

# Each service's task module; a container only has its own service installed.
SERVICE_TASK_MODULES = (
    "kiban_ingest.tasks",
    "kiban_encoder.tasks",
    "kiban_reporter.tasks",
    "kiban_trainer.tasks",
)

app = Celery("kiban")


def configure(settings: Settings | None = None) -> Celery:
    """Apply settings to the app: JSON only, late acks, prefetch 1, routes from messages."""
    settings = settings or get_settings()
    if app.conf.broker_url != settings.broker_url:
        _forget_broker_connections()
    app.conf.update(
        broker_url=settings.broker_url,
        # Results are not used: progress and outcomes live in the stores.
        result_backend=None,
        task_ignore_result=True,
        # JSON only, in and out: a pickled message is refused, never unpickled.
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        event_serializer="json",
        # Acknowledge after the work, one message at a time, and re-deliver the task of a
        # worker that died: Redis puts an unacknowledged message back on its queue when its
        # lease is older than the visibility timeout; a live worker renews the leases of the
        # messages it holds (kiban.liveness), so only a dead worker's tasks come back.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout,
            # sweep for abandoned (unacknowledged) messages often enough for the timeout
            "unacked_restore_interval": restore_sweep_interval(settings.visibility_timeout),
            "unacked_restore_throttle": 1,
        },
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        task_routes={name: {"queue": queue} for name, queue in task_queues().items()},
        task_default_queue="ingest",
        worker_hijack_root_logger=False,
        # kiban's handler writes to the real stderr; Celery must not swap it for a logger
        # proxy (log records would loop back into logging and be lost)
        worker_redirect_stdouts=False,
        worker_send_task_events=False,
    )
    app.steps["consumer"].add(LivenessStep)  # lease renewal and heartbeats, workers only
    for name in ACK_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RecoveredAckFilter) for f in logger.filters):
            logger.addFilter(RecoveredAckFilter())
    return app


#: Loggers through which Celery and kombu report an acknowledgement that did not reach the
#: broker (``Message.ack_log_error`` logs with the caller's logger).
ACK_LOGGERS = ("celery.worker.request", "kombu.message")
_LOST_ACK = ("Couldn't ack", "Couldn't reject")


def _connection_errors() -> tuple[type[BaseException], ...]:
    import redis.exceptions
    from kombu.exceptions import OperationalError

    return (
        OSError,  # ConnectionError, BrokenPipeError, socket timeouts
        redis.exceptions.ConnectionError,
        redis.exceptions.TimeoutError,
        OperationalError,
    )


class RecoveredAckFilter(logging.Filter):
    """An ack (or reject) lost to a broken broker connection is an expected, recovered
    condition, not a CRITICAL one: the message stays unacknowledged in the broker and is
    delivered again (when the consumer reconnects, or after the visibility timeout), and the
    work is idempotent. Celery logs it at CRITICAL with a traceback; this filter makes it one
    WARNING line. Any other CRITICAL record, or a lost ack for another reason, is untouched."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if (
            record.levelno >= logging.CRITICAL
            and isinstance(record.msg, str)
            and record.msg.startswith(_LOST_ACK)
            and exc is not None
            and isinstance(exc, _connection_errors())
        ):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg += (
                " — the broker connection was lost; the message stays unacknowledged and is "
                "delivered again"
            )
            record.exc_info, record.exc_text = None, None
        return True


def _forget_broker_connections() -> None:
    """Close and drop pooled connections to a broker the app is no longer configured for
    (a process that configures twice, e.g. a CLI or a test, must not publish to the old one).
    The same reset Celery makes after a fork."""
    pool = getattr(app, "_pool", None)
    if pool is not None:
        with contextlib.suppress(Exception):  # the old broker may be gone already
            pool.force_close_all()
    app._pool = None
    amqp = app.__dict__.get("amqp")
    if amqp is not None:
        amqp._producer_pool = None


def load_service_tasks() -> list[str]:
    """Import the task modules of whichever services are installed here."""
    loaded = []
    for module in SERVICE_TASK_MODULES:
        if importlib.util.find_spec(module.split(".")[0]) is not None:
            importlib.import_module(module)
            loaded.append(module)
    return loaded
