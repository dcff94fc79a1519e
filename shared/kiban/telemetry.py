"""Logging with secrets redacted, and the Prometheus metrics every service exports."""

from __future__ import annotations

import logging
import re

from prometheus_client import Counter, Gauge, Histogram

_SECRET_PATTERNS = [
    # user:password@ in URLs (redis://:pw@host, s3 endpoints with creds)
    (
        re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@\s]+)@"),
        r"\g<scheme>\g<user>:***@",
    ),
    (
        re.compile(r"(?i)(api[_-]?key|secret|password|token)(['\"]?\s*[:=]\s*['\"]?)([^\s'\",]+)"),
        r"\1\2***",
    ),
]


def redact(text: str) -> str:
    """Remove anything that looks like a credential from a log line or error."""
    for pattern, repl in _SECRET_PATTERNS:
        text = pattern.sub(repl, text)
    return text


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


def setup_logging(level: str = "INFO") -> None:
    """kiban's own loggers at ``level``; third-party chatter (Celery traces, open_clip) at
    WARNING. Every handler redacts secrets."""
    root = logging.getLogger()
    if not any(isinstance(f, RedactingFilter) for h in root.handlers for f in h.filters):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler.addFilter(RedactingFilter())
        root.addHandler(handler)
    root.setLevel(logging.WARNING)
    for name in ("kiban", "kiban_ingest", "kiban_encoder", "kiban_reporter"):
        logging.getLogger(name).setLevel(level.upper())


TASK_SECONDS = Histogram(
    "kiban_task_duration_seconds",
    "Wall time of a kiban task",
    ["task"],
    buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800),
)
TASK_FAILURES = Counter("kiban_task_failures_total", "Tasks that raised", ["task", "reason"])
IMAGES_ENCODED = Counter("kiban_images_encoded_total", "Images embedded", ["model", "provider"])
ENCODE_THROUGHPUT = Gauge(
    "kiban_encode_images_per_second", "Throughput of the last encoded chunk", ["model"]
)
POINTS_UPSERTED = Counter("kiban_points_upserted_total", "Vectors written to Qdrant", ["model"])
TASK_RETRIES = Counter("kiban_task_retries_total", "Retries after transient errors", ["task"])
DEAD_LETTERS = Counter("kiban_dead_letters_total", "Messages dead-lettered", ["task"])
QUEUE_LENGTH = Gauge("kiban_queue_length", "Messages waiting in a broker queue", ["queue"])

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
