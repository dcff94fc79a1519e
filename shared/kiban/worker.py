"""Start one service's Celery worker (or beat) with the right queues, settings and metrics.

A container runs exactly one of these. With Qdrant local mode (no KIBAN_QDRANT_URL) only
one process may open the Qdrant directory, so the ``indexer`` serves the index and report
queues together (a single writer); with a Qdrant server each service scales on its own.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import threading
import time
from dataclasses import dataclass

from kiban.celery_app import app, configure
from kiban.errors import ConfigurationError
from kiban.messages import service_queues
from kiban.settings import Settings
from kiban.telemetry import QUEUE_LENGTH, redact, setup_logging

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServiceSpec:
    modules: tuple[str, ...]
    queues: tuple[str, ...]


# The task module of each service; its queues come from the message registry.
SERVICE_MODULES: dict[str, str] = {
    "ingest": "kiban_ingest.tasks",
    "encoder": "kiban_encoder.tasks",
    "indexer": "kiban_encoder.tasks",
    "reporter": "kiban_reporter.tasks",
}


def service_spec(service: str) -> ServiceSpec:
    return ServiceSpec((SERVICE_MODULES[service],), service_queues(service))


def resolve(service: str, settings: Settings, queues: list[str] | None) -> ServiceSpec:
    """The task modules and queues one worker serves, given the Qdrant mode."""
    if service not in SERVICE_MODULES:
        raise ConfigurationError(
            f"unknown service {service!r}: choose one of {', '.join([*SERVICE_MODULES, 'beat'])}"
        )
    spec = service_spec(service)
    local_qdrant = settings.qdrant_url is None
    if local_qdrant and service == "reporter":
        raise ConfigurationError(
            "Qdrant local mode (KIBAN_QDRANT_URL unset) allows one process per path: the "
            "report queue is served by `kiban worker indexer`; set KIBAN_QDRANT_URL to run "
            "reporters separately"
        )
    if local_qdrant and service == "indexer":
        reporter = service_spec("reporter")
        spec = ServiceSpec(spec.modules + reporter.modules, spec.queues + reporter.queues)
    if queues:
        spec = ServiceSpec(spec.modules, tuple(queues))
    return spec


def _watch_queues(settings: Settings, queues: tuple[str, ...], every: float = 15.0) -> None:
    """Export queue lengths (Redis LLEN) so dashboards see backlog, not just throughput."""
    import redis

    client = redis.Redis.from_url(settings.broker_url, socket_timeout=5)
    while True:
        for queue in queues:
            with contextlib.suppress(Exception):  # broker restarting: next round
                QUEUE_LENGTH.labels(queue).set(client.llen(queue))
        time.sleep(every)


def start_worker(
    service: str,
    settings: Settings,
    queues: list[str] | None = None,
    concurrency: int = 1,
    metrics_port: int | None = None,
) -> None:
    """Run the worker in this process until it is stopped (blocks)."""
    if settings.mode != "distributed":
        raise ConfigurationError("workers need KIBAN_MODE=distributed (and KIBAN_BROKER_URL)")
    setup_logging(settings.log_level)
    configure(settings)
    port = settings.metrics_port if metrics_port is None else metrics_port
    if service == "beat":
        _start_metrics(port)
        start_beat(settings)
        return
    spec = resolve(service, settings, queues)
    for module in spec.modules:
        importlib.import_module(module)
    _start_metrics(port)
    threading.Thread(
        target=_watch_queues, args=(settings, spec.queues), daemon=True, name="queue-watch"
    ).start()
    log.info(
        "%s worker: queues %s, broker %s",
        service,
        ",".join(spec.queues),
        redact(settings.broker_url),
    )
    argv = [
        "worker",
        f"--queues={','.join(spec.queues)}",
        f"--hostname={service}-%h-%i",
        f"--loglevel={settings.log_level}",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]
    # One ONNX session uses every core: one task at a time per process (solo pool), scale
    # by processes. Threads for more, since onnxruntime and Pillow release the GIL.
    argv += (
        ["--pool=solo"] if concurrency == 1 else ["--pool=threads", f"--concurrency={concurrency}"]
    )
    app.worker_main(argv)


def _start_metrics(port: int) -> None:
    if port:
        from prometheus_client import start_http_server

        start_http_server(port)


def start_beat(settings: Settings) -> None:
    """Celery beat with the nightly schedule; exactly one per deployment."""
    from kiban.schedule import beat_schedule

    if not settings.schedule_source or not settings.schedule_models:
        raise ConfigurationError(
            "beat needs KIBAN_SCHEDULE_SOURCE and KIBAN_SCHEDULE_MODELS (and KIBAN_SCHEDULE_CRON)"
        )
    app.conf.beat_schedule = beat_schedule(settings)
    settings.home.mkdir(parents=True, exist_ok=True)
    log.info("beat: nightly run at '%s' for %s", settings.schedule_cron, settings.schedule_source)
    app.Beat(loglevel=settings.log_level, schedule=str(settings.home / "beat-schedule")).run()
