"""Start one service's Celery worker (or beat) with the right queues, settings and metrics.

A container runs exactly one of these. With Qdrant local mode (no KIBAN_QDRANT_URL) only
one process may open the Qdrant directory, so the ``indexer`` serves the index and report
queues together (a single writer); with a Qdrant server each service scales on its own.

Entry point of every worker image, with nothing but the common library and the service's
extra installed (no CLI dependencies)::

    python -m kiban.worker SERVICE [--queues Q1,Q2] [--concurrency N] [--metrics-port P]
    kiban-worker SERVICE ...        # the same, as a console script

``kiban worker SERVICE ...`` (the CLI) runs the same code.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import NoReturn

from kiban.celery_app import app, configure
from kiban.errors import ConfigurationError, KibanError
from kiban.messages import service_queues
from kiban.settings import Settings, load_settings, use_settings
from kiban.store import open_store
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
    "trainer": "kiban_trainer.tasks",
}


#: What ``python -m kiban.worker SERVICE`` accepts: the task services and the schedule.
SERVICES: tuple[str, ...] = (*SERVICE_MODULES, "beat")


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
    _require_distributed(settings)
    setup_logging(settings.log_level)
    configure(settings)
    port = settings.metrics_port if metrics_port is None else metrics_port
    if service == "beat":
        _start_metrics(port)
        start_beat(settings)
        return
    spec = resolve(service, settings, queues)
    # a stray or malformed broker entry is dead-lettered; it never stops the worker
    from kiban.stray import install as install_stray_guards

    install_stray_guards(app, settings)
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


def _require_distributed(settings: Settings) -> None:
    if settings.mode != "distributed":
        raise ConfigurationError("workers need KIBAN_MODE=distributed (and KIBAN_BROKER_URL)")


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


def serve(
    service: str,
    queues: list[str] | None = None,
    concurrency: int = 1,
    metrics_port: int | None = None,
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
    start_worker(service, settings, queues, concurrency, metrics_port)


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
        help="Override the queues, comma-separated, e.g. encode.gpu for a GPU pool.",
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
    return parser


def main(argv: list[str] | None = None) -> None:
    """``python -m kiban.worker`` / ``kiban-worker``: a kiban error is one line and exit 2."""
    args = build_parser().parse_args(argv)
    try:
        serve(args.service, args.queues, args.concurrency, args.metrics_port)
    except KibanError as exc:
        print(f"kiban-worker: error: {redact(str(exc))}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
