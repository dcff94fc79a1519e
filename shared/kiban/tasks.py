"""What every kiban task does around its work: validate, retry, time, dead-letter.

Service task modules register their work function with ``@kiban_task(MessageClass)``.
Retries and failures use Celery's own machinery, the same in every container and in the
embedded default (``kiban.local_queue``):

- a message that fails validation is dead-lettered at once with its reason;
- a ``TransientError`` (the object store, Qdrant or Redis adapters raise it for an
  unreachable, overloaded or restarting server) is retried by Celery's ``autoretry_for``
  with exponential backoff and full jitter (``retry_backoff``), at most
  ``KIBAN_TASK_RETRIES`` times; the retry is a new message, so the worker is free meanwhile;
- any other error, or a transient one that outlasts the retries, reaches ``on_failure``:
  the message is dead-lettered with its reason and the workflow records the failure (a
  failed chunk is stated in the report; the rest of the batch is unaffected).
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, ClassVar, TypeVar

from celery import Task

from kiban.celery_app import app
from kiban.context import Context
from kiban.errors import InvalidMessageError
from kiban.messages import Message, parse_message
from kiban.settings import Settings, get_settings
from kiban.telemetry import DEAD_LETTERS, TASK_FAILURES, TASK_RETRIES, TASK_SECONDS, redact
from kiban.transient import TransientError
from kiban.vectors import VectorIndex

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)

DEAD_LETTER_QUEUE = "deadletter"
DEAD_LETTER_TASK = "kiban.deadletter"
MAX_BACKOFF_SECONDS = 60

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


def _payload(args: tuple[Any, ...] | list[Any], kwargs: dict[str, Any]) -> Any:
    """What the producer sent: the message itself, or the whole call when it is malformed."""
    if not args and set(kwargs) == {"message"}:
        return kwargs["message"]
    return {"args": list(args), "kwargs": kwargs}


class KibanTask(Task):
    """Base class of every kiban task: late acks, Celery retries, the failure path."""

    message_type: ClassVar[type[Message]]
    work: ClassVar[Callable[[Any, Context], Any]]

    autoretry_for = (TransientError,)
    retry_backoff_max = MAX_BACKOFF_SECONDS
    retry_jitter = True
    acks_late = True
    reject_on_worker_lost = True
    typing = False  # arguments are validated below, so a bad call is dead-lettered

    @property
    def max_retries(self) -> int:
        """KIBAN_TASK_RETRIES, read when a retry is decided."""
        return get_settings().task_retries

    def parse(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Message:
        """The validated message, or InvalidMessageError naming what is wrong."""
        if args or set(kwargs) != {"message"}:
            raise InvalidMessageError(
                f"{self.name} takes exactly one keyword argument 'message', got "
                f"{len(args)} positional and keywords {sorted(kwargs)}"
            )
        return parse_message(kwargs["message"], self.message_type)

    def on_retry(
        self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any
    ) -> None:
        TASK_RETRIES.labels(self.name).inc()
        log.warning(
            "%s: %s; retry %d/%d", self.name, exc, self.request.retries + 1, self.max_retries
        )

    def on_failure(
        self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any
    ) -> None:
        """Dead-letter the message with its reason and tell the workflow (never raises)."""
        if isinstance(exc, InvalidMessageError):
            reason, kind = str(exc), "invalid_message"
        elif isinstance(exc, TransientError):
            reason, kind = f"after {self.request.retries} retries: {exc}", "TransientError"
        else:
            reason, kind = f"{type(exc).__name__}: {exc}", type(exc).__name__
        TASK_FAILURES.labels(self.name, kind).inc()
        try:
            ctx = Context.from_settings(get_settings())
            dead_letter(ctx, self.name, _payload(args, kwargs), reason)
            if not isinstance(exc, InvalidMessageError):
                from kiban.workflow import after_failure

                after_failure(self.parse(tuple(args), dict(kwargs)), ctx, self.name, reason)
        except Exception as err:  # noqa: BLE001 - a failure path must not fail the worker
            log.error("%s: failure path could not complete: %s", self.name, redact(str(err)))


def kiban_task(message_type: type[M]) -> Callable[[Callable[[M, Context], Any]], Any]:
    """Register ``work`` as the Celery task of ``message_type`` (its ``task`` name).

    The task takes one keyword argument, ``message`` (a JSON object). Anything else a
    producer sends — other arguments, a non-object — is dead-lettered as invalid, never
    half-processed. Tasks are acknowledged late and re-queued if their worker dies.
    """

    def register(work: Callable[[M, Context], Any]) -> Any:
        def run(self: KibanTask, *args: Any, **kwargs: Any) -> Any:
            message = self.parse(args, kwargs)
            ctx = Context.from_settings(get_settings())
            start = time.perf_counter()
            try:
                result = work(message, ctx)  # type: ignore[arg-type]
            finally:
                TASK_SECONDS.labels(self.name).observe(time.perf_counter() - start)
            return result.model_dump(mode="json") if hasattr(result, "model_dump") else result

        run.__name__ = work.__name__
        run.__doc__ = work.__doc__
        return app.task(
            name=message_type.task,
            base=KibanTask,
            bind=True,
            message_type=message_type,
            # the backoff factor is read when the task is registered (worker start-up)
            retry_backoff=get_settings().retry_backoff_seconds,
        )(run)

    return register


__all__ = [
    "DEAD_LETTER_QUEUE",
    "KibanTask",
    "close_vector_indexes",
    "dead_letter",
    "kiban_task",
    "vector_index",
]
