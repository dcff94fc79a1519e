"""Logging with secrets redacted, and the Prometheus metrics every service exports."""

from __future__ import annotations

import logging
import re
import sys
import threading
import traceback
from collections.abc import Iterable
from types import TracebackType

from prometheus_client import Counter, Gauge, Histogram

# --- redaction: credentials never reach a log line, an error, a traceback or the terminal ---
#
# Three forms, each with or without a scheme, in any setting or message:
#   scheme://user:password@host (redis, rediss, redis+sentinel, sentinel, amqp, http(s), s3, …;
#   the password may hold '@'), and every URL of a ';'-separated list (Celery fail-over);
#   user:password@host:port without a scheme;
#   secrets in query strings (?password=, &token=, X-Amz-Signature=, X-Amz-Credential=,
#   X-Amz-Security-Token=, sig=, api_key=, …) and key=value / "key": "value" / key:value
#   pairs whose key names a secret.
# The user name and the host stay (they say where), the secret becomes ***.

_URL_USERINFO = re.compile(
    r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^\s/?#'\"<>]*)@(?=[^\s@]|$)"
)
_BARE_USERINFO = re.compile(
    r"(?<![\w.+/:@%~-])(?P<user>[\w.~%+-]*):(?P<pw>[^\s/?#'\"<>]+)@(?=[A-Za-z0-9\[])"
)
_SECRET_NAME = (
    r"[\w.-]*(?:password|passwd|passphrase|secret|token|signature|credential|"
    r"api[_-]?key|apikey|access[_-]?key|private[_-]?key|auth[_-]?key)[\w.-]*"
)
_QUERY_SECRET = re.compile(
    rf"(?i)(?P<key>[?&;](?:{_SECRET_NAME}|pwd|pass|sig|key|auth|code))=(?P<value>[^&#\s'\"<>]*)"
)
_PAIR_SECRET = re.compile(
    rf"(?i)(?P<key>\b{_SECRET_NAME})"
    r"(?P<sep>['\"]?\s*=\s*['\"]?|['\"]\s*:\s*['\"]?|:(?=[^\s/]))"
    r"(?P<value>(?!\*\*\*)[^\s'\",&;}\]]+)"
)
_AUTH_HEADER = re.compile(
    r"(?i)\b(?P<key>authorization|x-api-key|api-key)(?P<sep>['\"]?\s*[:=]\s*['\"]?)"
    r"(?:(?P<kind>bearer|basic|token)\s+)?(?P<value>[^\s'\",]+)"
)


def _mask_userinfo(match: re.Match[str]) -> str:
    userinfo = match.group("userinfo")
    if not userinfo:
        return match.group(0)
    user, colon, _ = userinfo.partition(":")
    masked = f"{user}:***" if colon else "***"  # no colon: the whole userinfo is a token
    return f"{match.group('scheme')}{masked}@"


def _mask_header(match: re.Match[str]) -> str:
    kind = f"{match.group('kind')} " if match.group("kind") else ""
    return f"{match.group('key')}{match.group('sep')}{kind}***"


def redact(text: str) -> str:
    """Remove anything that looks like a credential from a log line, an error or a URL."""
    text = _URL_USERINFO.sub(_mask_userinfo, text)
    text = _BARE_USERINFO.sub(lambda m: f"{m.group('user')}:***@", text)
    text = _QUERY_SECRET.sub(lambda m: f"{m.group('key')}=***", text)
    text = _AUTH_HEADER.sub(_mask_header, text)
    return _PAIR_SECRET.sub(lambda m: f"{m.group('key')}{m.group('sep')}***", text)


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


class RedactingFormatter(logging.Formatter):
    """Redacts the whole formatted record: the message and any traceback or stack under it
    (an exception's text, e.g. kombu's "Cannot connect to redis://:pw@…", included)."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class _StderrHandler(logging.StreamHandler):
    """stderr; when the stream it was given has been closed (a command line run inside a
    test runner, which swaps stderr and closes it), the current ``sys.stderr``."""

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(self.stream, "closed", False):
            self.stream = sys.stderr
        super().emit(record)


def _redacting_excepthook(
    exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None
) -> None:
    sys.stderr.write(redact("".join(traceback.format_exception(exc_type, exc, tb))))


def _redacting_thread_excepthook(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "?"
    text = "".join(traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback))
    sys.stderr.write(redact(f"Exception in thread {name}:\n{text}"))


def setup_logging(level: str = "INFO") -> None:
    """kiban's own loggers at ``level``; third-party chatter (Celery traces, open_clip) at
    WARNING. Every handler redacts secrets, tracebacks included."""
    root = logging.getLogger()
    if not any(isinstance(f, RedactingFilter) for h in root.handlers for f in h.filters):
        handler = _StderrHandler()
        handler.setFormatter(RedactingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler.addFilter(RedactingFilter())
        root.addHandler(handler)
    # An uncaught exception's traceback (main thread or any other) is redacted too; a hook
    # someone else installed (a debugger, pytest) is left in place.
    if sys.excepthook is sys.__excepthook__:
        sys.excepthook = _redacting_excepthook
    if threading.excepthook is threading.__excepthook__:
        threading.excepthook = _redacting_thread_excepthook
    root.setLevel(logging.WARNING)
    for name in ("kiban", "kiban_ingest", "kiban_encoder", "kiban_reporter", "kiban_trainer"):
        logging.getLogger(name).setLevel(level.upper())


# --- Prometheus metrics ------------------------------------------------------------------
#
# Every labelled counter is given its series at start-up for the label values a process can
# know (``init_task_series``, ``init_model_series``, ``init_queue_series``): a series that
# appears only with its first increment is invisible to ``increase()``/``rate()``, so the
# first event after every (re)start — the first dead letter, the first image — would be lost
# to dashboards and alerts.

TASK_SECONDS = Histogram(
    "kiban_task_duration_seconds",
    "Wall time of a kiban task run (every run: success, retry or failure)",
    ["task"],
    buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800),
)
#: How a task run ended: ``success``; ``retry`` (a transient error, the message comes back
#: later); ``failure`` (the failure path: the message is dead-lettered). ``queue`` is the
#: queue the message came from (``encode.<pool>`` for a pool).
OUTCOMES = ("success", "retry", "failure")
TASKS = Counter(
    "kiban_tasks_total",
    "Task runs by outcome: success, retry (transient error, re-queued) or failure (dead-lettered)",
    ["task", "queue", "outcome"],
)
TASK_LAST_SUCCESS = Gauge(
    "kiban_task_last_success_timestamp_seconds",
    "Unix time of the latest successful run of the task in this process",
    ["task"],
)
#: Failure reasons known before any failure; others (a permanent error's class name)
#: appear with their first occurrence.
KNOWN_FAILURE_REASONS = ("invalid_message", "TransientError")
TASK_FAILURES = Counter("kiban_task_failures_total", "Tasks that raised", ["task", "reason"])
TASK_RETRIES = Counter("kiban_task_retries_total", "Retries after transient errors", ["task"])
#: The ``task`` label of a dead letter whose task is not a kiban task (a stray message).
UNKNOWN_TASK = "(unknown)"
DEAD_LETTERS = Counter("kiban_dead_letters_total", "Messages dead-lettered", ["task"])

IMAGES_ENCODED = Counter("kiban_images_encoded_total", "Images embedded", ["model", "provider"])
ENCODE_SECONDS = Counter(
    "kiban_encode_seconds_total",
    "Wall seconds spent encoding chunks (read, decode, infer; per chunk), so "
    "rate(kiban_images_encoded_total) / rate(kiban_encode_seconds_total) is images per "
    "encoding second",
    ["model", "provider"],
)
POINTS_UPSERTED = Counter("kiban_points_upserted_total", "Vectors written to Qdrant", ["model"])

#: 1 while a worker consumes the queue (set when Celery is ready, 0 when it shuts down).
WORKER_CONSUMING = Gauge(
    "kiban_worker_consuming", "1 while this worker consumes the queue", ["service", "queue"]
)

# Exported by the queue exporter (``kiban.exporter``) only: one process samples the broker,
# independent of the queues' consumers.
QUEUE_LENGTH = Gauge(
    "kiban_queue_length",
    "Messages waiting in a broker queue (all priority levels)",
    ["queue"],
)
QUEUE_UNACKED = Gauge(
    "kiban_queue_unacked",
    "Messages delivered to a worker and not yet acknowledged (every queue)",
)
QUEUE_SAMPLED = Gauge(
    "kiban_queue_sample_timestamp_seconds",
    "Unix time of the queue exporter's latest successful sample of the broker",
)


def init_task_series(pairs: Iterable[tuple[str, str]]) -> None:
    """Give each (task, queue) its series at 0: outcomes, retries, dead letters, failures by
    the known reasons, durations; and the dead letters of stray messages."""
    for task, queue in pairs:
        for outcome in OUTCOMES:
            TASKS.labels(task, queue, outcome)
        TASK_SECONDS.labels(task)
        TASK_RETRIES.labels(task)
        DEAD_LETTERS.labels(task)
        for reason in KNOWN_FAILURE_REASONS:
            TASK_FAILURES.labels(task, reason)
    DEAD_LETTERS.labels(UNKNOWN_TASK)  # every worker dead-letters stray broker entries


def init_model_series(
    models: Iterable[str],
    providers: Iterable[str] = (),
    *,
    encode: bool = False,
    index: bool = False,
) -> None:
    """Give each model (x execution provider) its encoding and indexing series at 0."""
    providers = tuple(providers)
    for model in models:
        if encode:
            for provider in providers:
                IMAGES_ENCODED.labels(model, provider)
                ENCODE_SECONDS.labels(model, provider)
        if index:
            POINTS_UPSERTED.labels(model)


def record_task(task: str, queue: str, outcome: str) -> None:
    """Count a task run's outcome; a success also stamps the task's last-success time."""
    TASKS.labels(task, queue, outcome).inc()
    if outcome == "success":
        TASK_LAST_SUCCESS.labels(task).set_to_current_time()


def record_encoded(model: str, provider: str, images: int, seconds: float) -> None:
    """One encoded chunk: its images and the wall seconds it took (rates, not a gauge)."""
    IMAGES_ENCODED.labels(model, provider).inc(images)
    ENCODE_SECONDS.labels(model, provider).inc(max(0.0, seconds))


# Retrieval quality of the latest evaluation, set by the reporter after it writes a report
# (kiban_reporter.trend.export_gauges). Labels are bounded: ``series`` is the batch series
# (e.g. "nightly-"; "none" for a batch without earlier batches of its series), ``metric`` a
# KMetrics field at the headline k (mv5_macro_f1, mv5_accuracy, acc5, map5, mv5_weighted_f1).
# Never a batch id or a class label.
QUALITY = Gauge(
    "kiban_quality",
    "Retrieval quality of the latest evaluated report at the headline k (point estimate)",
    ["series", "model", "metric"],
)
QUALITY_CI_LOW = Gauge(
    "kiban_quality_ci_low",
    "Lower bound of the bootstrap interval of kiban_quality",
    ["series", "model", "metric"],
)
QUALITY_CI_HIGH = Gauge(
    "kiban_quality_ci_high",
    "Upper bound of the bootstrap interval of kiban_quality",
    ["series", "model", "metric"],
)
QUALITY_BASELINE = Gauge(
    "kiban_quality_baseline",
    "Trailing baseline of the headline metric: mean over the series' earlier batches",
    ["series", "model", "metric"],
)
QUALITY_REGRESSION = Gauge(
    "kiban_quality_regression",
    "1 when the latest headline CI upper bound is below the trailing baseline, else 0",
    ["series", "model"],
)
LAST_EVALUATION = Gauge(
    "kiban_last_evaluation_timestamp_seconds",
    "Unix time of the latest report written for the series",
    ["series"],
)
