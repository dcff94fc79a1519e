"""What every kiban task does around its work: validate, time, dead-letter bad input.

Service task modules wrap their work function with ``run_task``, so message validation,
metrics and dead-lettering behave the same in every container and in embedded mode.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, TypeVar

from kiban.context import Context
from kiban.errors import InvalidMessageError
from kiban.messages import Message, parse_message
from kiban.settings import Settings, get_settings
from kiban.telemetry import TASK_FAILURES, TASK_SECONDS, redact
from kiban.vectors import VectorIndex

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)

_INDEX: dict[str, VectorIndex] = {}


def vector_index(settings: Settings) -> VectorIndex:
    """One client per process and location: Qdrant local mode allows a single opener."""
    location = settings.qdrant_url or str(settings.resolved_qdrant_path.resolve())
    if location not in _INDEX:
        _INDEX[location] = VectorIndex(settings)
    return _INDEX[location]


def close_vector_indexes() -> None:
    for index in _INDEX.values():
        index.close()
    _INDEX.clear()


atexit.register(close_vector_indexes)  # Qdrant local mode flushes and unlocks on close


def dead_letter(ctx: Context, task: str, payload: Any, reason: str) -> str:
    """Keep a rejected message with its reason in the store; nothing is lost silently."""
    body = json.dumps(
        {"task": task, "reason": redact(reason), "payload": payload}, default=str, sort_keys=True
    )
    digest = hashlib.sha256(body.encode()).hexdigest()[:16]
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    key = f"deadletter/{task}/{stamp}-{digest}.json"
    ctx.store.put(key, body.encode())
    log.error("dead-lettered %s message: %s (%s)", task, redact(reason), key)
    return key


def run_task(
    task: str,
    payload: Any,
    message_type: type[M],
    work: Callable[[M, Context], Any],
    settings: Settings | None = None,
) -> Any:
    """Validate ``payload`` as ``message_type`` and run ``work``; bad messages are dead-lettered."""
    ctx = Context.from_settings(settings or get_settings())
    try:
        message = parse_message(payload, message_type)
    except InvalidMessageError as exc:
        dead_letter(ctx, task, payload, str(exc))
        TASK_FAILURES.labels(task, "invalid_message").inc()
        raise
    start = time.perf_counter()
    try:
        return work(message, ctx)  # type: ignore[arg-type]
    except Exception as exc:
        TASK_FAILURES.labels(task, type(exc).__name__).inc()
        raise
    finally:
        TASK_SECONDS.labels(task).observe(time.perf_counter() - start)
