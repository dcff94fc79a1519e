"""Start one service's Celery worker (or beat) with the right queues, settings and metrics.

A container runs exactly one of these. With Qdrant local mode (no KIBAN_QDRANT_URL) only
one process may open the Qdrant directory, so the ``indexer`` serves the index and report
queues together (a single writer); with a Qdrant server each service scales on its own.

Entry point of every worker image, with nothing but the common library and the service's
extra installed (no CLI dependencies)::

    python -m kiban.worker SERVICE [--queues Q1,Q2] [--concurrency N] [--metrics-port P]
    kiban-worker SERVICE ...        # the same, as a console script

Besides the task services there are two that run no tasks: ``beat`` (the nightly schedule)
and ``exporter`` (every queue's depth, sampled from the broker: ``kiban.exporter``).

Metrics: ``/metrics`` binds to ``KIBAN_METRICS_HOST`` (127.0.0.1 unless opened) on the
metrics port. At start-up a worker gives its labelled counters their series for every label
value it can know (its tasks and queues, the outcomes, the models in the registry, the
execution providers, the quarantine reasons), so ``increase()`` sees the first event after
a (re)start. Each worker has a unique Celery node name, ``<service>-<pid>@<host>``.

``kiban worker SERVICE ...`` (the CLI) runs the same code.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NoReturn

from kiban.celery_app import app, configure
from kiban.errors import ConfigurationError, KibanError
from kiban.messages import EncodeChunk, IndexShard, IngestBatch, registry, service_queues
from kiban.settings import Settings, load_settings, use_settings
from kiban.store import open_store
from kiban.telemetry import (
    WORKER_CONSUMING,
    init_model_series,
    init_task_series,
    redact,
    setup_logging,
)

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
    "trainer": "kiban_trainer.tasks",
}


#: What ``python -m kiban.worker SERVICE`` accepts: the task services, the schedule and the
#: queue exporter (the last two run no tasks).
SERVICES: tuple[str, ...] = (*SERVICE_MODULES, "beat", "exporter")


def service_spec(service: str) -> ServiceSpec:
    return ServiceSpec((SERVICE_MODULES[service],), service_queues(service))


def resolve(service: str, settings: Settings, queues: list[str] | None) -> ServiceSpec:
    """The task modules and queues one worker serves, given the Qdrant mode."""
    if service not in SERVICE_MODULES:
        raise ConfigurationError(
            f"unknown service {service!r}: choose one of {', '.join(SERVICES)}"
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


def served_tasks(queues: Iterable[str]) -> list[tuple[str, str]]:
    """(task, queue) for every registered kiban task this worker receives: the task's queue
    or one of its pools (``encode`` → ``encode.gpu``) is among ``queues``."""
    queues = tuple(queues)
    return [
        (cls.task, queue)
        for cls in registry().values()
        if cls.task in app.tasks
        for queue in queues
        if queue == cls.queue or queue.startswith(f"{cls.queue}.")
    ]


def registry_models(settings: Settings) -> list[str]:
    """Names of the models published in the store (one listing; empty when unreadable)."""
    try:
        store = open_store(
            settings.resolved_store_uri, settings.s3_endpoint_url, settings.s3_region
        )
        keys = [info.key for info in store.list("models")]
    except Exception as exc:  # noqa: BLE001 - metrics must never stop a worker starting
        log.warning("metrics: could not list the models: %s", redact(str(exc)))
        return []
    parts = [key.split("/") for key in keys]
    return sorted({p[1] for p in parts if len(p) == 3 and p[2] == "card.json"})


def init_series(service: str, queues: tuple[str, ...], settings: Settings) -> None:
    """Every series this worker can name before its first event, at 0."""
    pairs = served_tasks(queues)
    init_task_series(pairs)
    tasks = {task for task, _ in pairs}
    encode, index = EncodeChunk.task in tasks, IndexShard.task in tasks
    if encode or index:
        providers = dict.fromkeys([*settings.ort_providers, "CPUExecutionProvider"])
        init_model_series(registry_models(settings), providers, encode=encode, index=index)
    if IngestBatch.task in tasks:
        with contextlib.suppress(ImportError):
            ingest_metrics = importlib.import_module("kiban_ingest.metrics")
            categories = {c for _, c in ingest_metrics.CATEGORIES} | {"other"}
            for category in sorted(categories):
                ingest_metrics.IMAGES_QUARANTINED.labels(category)
    for queue in queues:
        WORKER_CONSUMING.labels(service, queue).set(0)


def _track_consuming(service: str, queues: tuple[str, ...]) -> None:
    """kiban_worker_consuming = 1 once Celery consumes, 0 when it starts shutting down."""
    from celery.signals import worker_ready, worker_shutting_down

    def ready(**_: object) -> None:
        for queue in queues:
            WORKER_CONSUMING.labels(service, queue).set(1)

    def stopping(**_: object) -> None:
        for queue in queues:
            WORKER_CONSUMING.labels(service, queue).set(0)

    worker_ready.connect(ready, weak=False)
    worker_shutting_down.connect(stopping, weak=False)


def node_name(service: str) -> str:
    """Celery's node name: unique per process, so two workers on one host are two nodes."""
    return f"{service}-{os.getpid()}@%h"


def start_worker(
    service: str,
    settings: Settings,
    queues: list[str] | None = None,
    concurrency: int = 1,
    metrics_port: int | None = None,
    interval: float | None = None,
) -> None:
    """Run the worker in this process until it is stopped (blocks)."""
    _require_distributed(settings)
    setup_logging(settings.log_level)
    configure(settings)
    port = settings.metrics_port if metrics_port is None else metrics_port
    if service == "beat":
        _start_metrics(port, settings.metrics_host)
        start_beat(settings)
        return
    if service == "exporter":
        from kiban.exporter import DEFAULT_INTERVAL, run_exporter

        _start_metrics(port, settings.metrics_host)
        run_exporter(settings, queues or (), interval or DEFAULT_INTERVAL)
        return
    spec = resolve(service, settings, queues)
    # a stray or malformed broker entry is dead-lettered; it never stops the worker
    from kiban.stray import install as install_stray_guards

    install_stray_guards(app, settings)
    for module in spec.modules:
        importlib.import_module(module)
    init_series(service, spec.queues, settings)
    _track_consuming(service, spec.queues)
    _start_metrics(port, settings.metrics_host)
    log.info(
        "%s worker: queues %s, broker %s",
        service,
        ",".join(spec.queues),
        redact(settings.broker_url),
    )
    argv = [
        "worker",
        f"--queues={','.join(spec.queues)}",
        f"--hostname={node_name(service)}",
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


def _require_distributed(settings: Settings) -> None:
    if settings.mode != "distributed":
        raise ConfigurationError("workers need KIBAN_MODE=distributed (and KIBAN_BROKER_URL)")


def _start_metrics(port: int, host: str = "127.0.0.1") -> None:
    """Serve /metrics on ``host:port`` (``KIBAN_METRICS_HOST``; 0.0.0.0 opens it to the
    network, as the chart does); port 0 = no metrics."""
    if port:
        from prometheus_client import start_http_server

        start_http_server(port, addr=host)


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


def serve(
    service: str,
    queues: list[str] | None = None,
    concurrency: int = 1,
    metrics_port: int | None = None,
    interval: float | None = None,
) -> None:
    """Read the settings from the environment, open the store and run the worker (blocks)."""
    settings = load_settings()
    _require_distributed(settings)  # before the store is touched: a refusal changes nothing
    use_settings(settings)
    # The reporter's figures (matplotlib) keep their font cache under KIBAN_HOME, not $HOME.
    os.environ.setdefault("MPLCONFIGDIR", str(settings.home / "cache" / "matplotlib"))
    setup_logging(settings.log_level)
    # Fails fast on a wrong store setting, and makes the directory or bucket on first start.
    open_store(
        settings.resolved_store_uri, settings.s3_endpoint_url, settings.s3_region, create=True
    )
    start_worker(service, settings, queues, concurrency, metrics_port, interval)


class _OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line naming the argument (container logs, not a terminal)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {number}")
    return number


def _positive_seconds(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {value!r}") from None
    if not 0 < number <= 3600:
        raise argparse.ArgumentTypeError(f"must be > 0 and <= 3600, got {number}")
    return number


def _port(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {value!r}") from None
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0..65535 (0 = off), got {number}")
    return number


def _queue_list(value: str) -> list[str]:
    names = [q.strip() for q in value.split(",") if q.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated queue names, got {value!r}")
    return names


def build_parser() -> argparse.ArgumentParser:
    """The worker command line (also what the Helm chart's container args must parse with)."""
    parser = _OneLineParser(
        prog="kiban-worker",
        description="Start one service's Celery worker (or beat); needs KIBAN_MODE=distributed.",
    )
    parser.add_argument("service", choices=SERVICES, help=" | ".join(SERVICES))
    parser.add_argument(
        "--queues",
        type=_queue_list,
        default=None,
        help="Override the queues, comma-separated, e.g. encode.gpu for a GPU pool "
        "(exporter: more queues to watch besides the known ones).",
    )
    parser.add_argument(
        "--concurrency",
        type=_positive_int,
        default=1,
        help="Tasks at once (threads) in this process (default 1: solo pool).",
    )
    parser.add_argument(
        "--metrics-port",
        type=_port,
        default=None,
        help="Prometheus port (default: the KIBAN_METRICS_PORT setting; 0 = off).",
    )
    parser.add_argument(
        "--interval",
        type=_positive_seconds,
        default=None,
        help="exporter only: seconds between queue samples (default 2).",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    """``python -m kiban.worker`` / ``kiban-worker``: a kiban error is one line and exit 2."""
    args = build_parser().parse_args(argv)
    try:
        serve(args.service, args.queues, args.concurrency, args.metrics_port, args.interval)
    except KibanError as exc:
        print(f"kiban-worker: error: {redact(str(exc))}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
