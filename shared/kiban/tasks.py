"""What every kiban task does around its work: validate, retry, time, dead-letter.

Service task modules register their work function with ``kiban_task``, so message
validation, retries with exponential backoff, metrics and dead-lettering behave the same
in every container and in embedded mode:

- a message that fails validation is dead-lettered at once with its reason;
- a transient error (S3, Qdrant, Redis unreachable or 5xx) is retried with exponential
  backoff up to ``KIBAN_TASK_RETRIES`` times inside the task, so a restarted Redis or a
  Qdrant blip costs a delay, not the batch;
- any other error, or a transient one that outlasts the retries, is dead-lettered with
  its reason and the task fails; the rest of the batch is unaffected.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import random
import socket
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, TypeVar

from kiban.celery_app import app
from kiban.context import Context
from kiban.errors import InvalidMessageError
from kiban.messages import Message, parse_message
from kiban.settings import Settings, get_settings
from kiban.telemetry import DEAD_LETTERS, TASK_FAILURES, TASK_RETRIES, TASK_SECONDS, redact
from kiban.vectors import VectorIndex

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)

DEAD_LETTER_QUEUE = "deadletter"
DEAD_LETTER_TASK = "kiban.deadletter"
MAX_BACKOFF_SECONDS = 60.0

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


def is_transient(exc: BaseException) -> bool:
    """Errors worth retrying: the other side is unreachable, overloaded or restarting."""
    if isinstance(exc, (ConnectionError, TimeoutError, socket.timeout)):
        return True
    name = type(exc).__name__
    module = type(exc).__module__
    if module.startswith("redis") and name in (
        "ConnectionError",
        "TimeoutError",
        "BusyLoadingError",
    ):
        return True
    if module.startswith(("kombu", "amqp")) and (
        "Connection" in name or name == "OperationalError"
    ):
        return True
    if module.startswith(("botocore", "urllib3")) and name in (
        "EndpointConnectionError",
        "ConnectionClosedError",
        "ReadTimeoutError",
        "ConnectTimeoutError",
        "ProtocolError",
    ):
        return True
    if module.startswith("botocore") and name == "ClientError":
        code = getattr(exc, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return int(code) >= 500 or getattr(exc, "response", {}).get("Error", {}).get("Code") in (
            "SlowDown",
            "RequestTimeout",
            "ServiceUnavailable",
        )
    if module.startswith(("httpx", "httpcore")) and ("Connect" in name or "Timeout" in name):
        return True
    if module.startswith("qdrant_client"):
        status = getattr(exc, "status_code", None)
        return name == "ResponseHandlingException" or (status is not None and status >= 500)
    cause = exc.__cause__ or exc.__context__
    return cause is not None and cause is not exc and is_transient(cause)


def dead_letter(ctx: Context, task: str, payload: Any, reason: str) -> str:
    """Keep a rejected message with its reason; nothing is lost silently.

    The record goes to the store (``deadletter/<task>/…``, what `kiban status` counts)
    and, when distributed, onto the broker's ``deadletter`` queue for operators' tools.
    """
    record = {
        "task": task,
        "reason": redact(reason),
        "payload": payload,
        "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    body = json.dumps(record, default=str, sort_keys=True)
    digest = hashlib.sha256(body.encode()).hexdigest()[:16]
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    key = f"deadletter/{task}/{stamp}-{digest}.json"
    DEAD_LETTERS.labels(task).inc()
    try:
        ctx.store.put(key, body.encode())
    except Exception as exc:  # noqa: BLE001 - the log line below still carries the reason
        log.error("could not store dead letter for %s: %s", task, redact(str(exc)))
    if ctx.settings.mode == "distributed":
        try:
            app.send_task(DEAD_LETTER_TASK, kwargs={"record": record}, queue=DEAD_LETTER_QUEUE)
        except Exception as exc:  # noqa: BLE001
            log.error("could not queue dead letter for %s: %s", task, redact(str(exc)))
    log.error("dead-lettered %s message: %s (%s)", task, redact(reason), key)
    return key


def run_task(
    task: str,
    payload: Any,
    message_type: type[M],
    work: Callable[[M, Context], Any],
    settings: Settings | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> Any:
    """Validate ``payload`` as ``message_type`` and run ``work`` with retries (module doc)."""
    settings = settings or get_settings()
    ctx = Context.from_settings(settings)
    try:
        message = parse_message(payload, message_type)
    except InvalidMessageError as exc:
        TASK_FAILURES.labels(task, "invalid_message").inc()
        dead_letter(ctx, task, payload, str(exc))
        raise
    start = time.perf_counter()
    attempt = 0
    try:
        while True:
            try:
                return work(message, ctx)  # type: ignore[arg-type]
            except Exception as exc:
                transient = is_transient(exc)
                if transient and attempt < settings.task_retries:
                    delay = min(MAX_BACKOFF_SECONDS, settings.retry_backoff_seconds * 2**attempt)
                    delay *= random.uniform(0.8, 1.2)
                    attempt += 1
                    TASK_RETRIES.labels(task).inc()
                    log.warning(
                        "%s: transient %s (%s); retry %d/%d in %.1fs",
                        task,
                        type(exc).__name__,
                        redact(str(exc))[:200],
                        attempt,
                        settings.task_retries,
                        delay,
                    )
                    sleep(delay)
                    ctx = Context.from_settings(settings)  # fresh clients after an outage
                    continue
                TASK_FAILURES.labels(task, type(exc).__name__).inc()
                why = f"after {attempt} retries: " if transient else ""
                dead_letter(ctx, task, payload, f"{why}{type(exc).__name__}: {exc}")
                raise
    finally:
        TASK_SECONDS.labels(task).observe(time.perf_counter() - start)


def kiban_task(kind: str, message_type: type[M]) -> Callable[[Callable[[M, Context], Any]], Any]:
    """Register ``work`` as the Celery task for messages of ``kind``.

    The task takes one keyword argument, ``message`` (a JSON object). Anything else a
    producer sends — other arguments, a non-object — is dead-lettered as invalid, never
    half-processed. Tasks are acknowledged late and re-queued if their worker dies.
    """
    from kiban.messages import TASK_NAMES

    name = TASK_NAMES[kind]

    def register(work: Callable[[M, Context], Any]) -> Any:
        @app.task(name=name, acks_late=True, reject_on_worker_lost=True)
        def task(*args: Any, **kwargs: Any) -> Any:
            if args or set(kwargs) != {"message"}:
                payload: Any = {"args": list(args), "kwargs": kwargs}
                bad = InvalidMessageError(
                    f"{name} takes exactly one keyword argument 'message', got "
                    f"{len(args)} positional and keywords {sorted(kwargs)}"
                )
                ctx = Context.from_settings(get_settings())
                TASK_FAILURES.labels(name, "invalid_message").inc()
                dead_letter(ctx, name, payload, str(bad))
                raise bad
            result = run_task(name, kwargs["message"], message_type, work)
            return result.model_dump(mode="json") if hasattr(result, "model_dump") else result

        task.__doc__ = work.__doc__
        return task

    return register


__all__ = [
    "DEAD_LETTER_QUEUE",
    "close_vector_indexes",
    "dead_letter",
    "is_transient",
    "kiban_task",
    "run_task",
    "vector_index",
]
