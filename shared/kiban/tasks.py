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

A message is measured before it is parsed: one whose JSON encoding exceeds
``KIBAN_MAX_MESSAGE_BYTES`` is dead-lettered unread. A dead-letter record keeps the payload
itself only up to ``DEAD_LETTER_PAYLOAD_BYTES`` (beyond that, the first bytes as text, marked
truncated), always with the whole payload's size and sha256; log lines quote at most a short,
escaped excerpt. ``kiban.stray`` sends broker entries that never reach a task (not a Celery
message, unknown task, refused content type, undecodable body) down the same path.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import re
import secrets
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, ClassVar, TypeVar

from celery import Task

from kiban.celery_app import app
from kiban.context import Context
from kiban.errors import InvalidMessageError
from kiban.messages import Message, is_valid_name, parse_message
from kiban.settings import Settings, get_settings
from kiban.telemetry import (
    DEAD_LETTERS,
    TASK_FAILURES,
    TASK_RETRIES,
    TASK_SECONDS,
    UNKNOWN_TASK,
    record_task,
    redact,
)
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


#: A dead-letter record keeps the payload itself up to this many bytes of JSON (or raw
#: text); beyond that only this many first bytes, as text, marked truncated. A record whose
#: payload is whole can be replayed (``kiban deadletter replay``).
DEAD_LETTER_PAYLOAD_BYTES = 16 * 1024
#: Stored reasons are cut here; log lines quote at most ``LOG_EXCERPT_CHARS`` of any text.
REASON_CHARS = 2000
LOG_EXCERPT_CHARS = 300

# control, bidi-override, line-separator and lone-surrogate characters: escaped in log lines
_CONTROL = re.compile(
    r"[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\u2028\u2029\ud800-\udfff]"
)
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def _escaped(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def excerpt(text: str, limit: int = LOG_EXCERPT_CHARS) -> str:
    """``text`` for a log line: control characters escaped, cut to ``limit`` characters."""
    cut = len(text) > limit
    shown = _CONTROL.sub(_escaped, text[:limit])
    return f"{shown}… ({len(text)} chars)" if cut else shown


def _json_bytes(payload: Any) -> bytes:
    text = json.dumps(payload, default=str, separators=(",", ":"), ensure_ascii=False)
    return text.encode("utf-8", "surrogatepass")


def encode_payload(payload: Any) -> bytes:
    """The bytes a dead letter's payload is measured and hashed by: a stray broker entry's
    raw bytes or text as they are (UTF-8), a message as compact JSON."""
    if isinstance(payload, bytes):
        return payload
    if isinstance(payload, str):
        return payload.encode("utf-8", "surrogatepass")
    return _json_bytes(payload)


def message_size(payload: Any) -> int:
    """Bytes of ``payload``'s compact JSON encoding (what ``KIBAN_MAX_MESSAGE_BYTES`` limits)."""
    return len(_json_bytes(payload))


def oversize_reason(size: int, limit: int) -> str:
    return f"message of {size} bytes exceeds KIBAN_MAX_MESSAGE_BYTES ({limit})"


def kept_payload(payload: Any) -> dict[str, Any]:
    """The payload fields of a dead-letter record: the payload (whole, or its first
    ``DEAD_LETTER_PAYLOAD_BYTES`` as text), whether it was cut, its size and sha256."""
    raw = encode_payload(payload)
    truncated = len(raw) > DEAD_LETTER_PAYLOAD_BYTES
    if truncated:
        kept: Any = raw[:DEAD_LETTER_PAYLOAD_BYTES].decode("utf-8", "ignore")
    elif isinstance(payload, bytes):
        kept = payload.decode("utf-8", "replace")
    else:
        kept = payload
    return {
        "payload": kept,
        "payload_truncated": truncated,
        "payload_bytes": len(raw),
        "payload_sha256": hashlib.sha256(raw).hexdigest(),
    }


def named_batch(payload: Any) -> str | None:
    """The batch a payload names (a message, or the call around one), if it is a valid ID."""
    if isinstance(payload, dict) and isinstance(payload.get("kwargs"), dict):
        payload = payload["kwargs"].get("message")
    batch = payload.get("batch_id") if isinstance(payload, dict) else None
    return batch if isinstance(batch, str) and is_valid_name(batch) else None


def record_bytes(record: dict[str, Any]) -> bytes:
    """A dead-letter record as stored: UTF-8 JSON (escaped ASCII if it holds lone surrogates)."""
    try:
        return json.dumps(record, default=str, sort_keys=True, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return json.dumps(record, default=str, sort_keys=True).encode()


def dead_letter_dir(task: str) -> str:
    """The store folder of a task's dead letters; a task name from a stray message is
    reduced to safe characters (it never makes a path)."""
    part = _KEY_UNSAFE.sub("_", task)[:128].strip(".")
    return f"deadletter/{part or '_'}"


def dead_letter(
    ctx: Context,
    task: str,
    payload: Any,
    reason: str,
    extra: dict[str, Any] | None = None,
) -> str:
    """Keep a rejected message with its reason; nothing is lost silently.

    The record goes to the store (``deadletter/<task>/<id>.json``, what `kiban status` counts
    and `kiban deadletter` manages) and, when distributed, onto the broker's ``deadletter``
    queue. ``payload`` is the message (a JSON value) or, for a broker entry that is none,
    its raw bytes or text; only a bounded part of it is kept (``kept_payload``).
    """
    now = datetime.now(timezone.utc)
    record: dict[str, Any] = {
        "task": task,
        "reason": excerpt(redact(reason), REASON_CHARS),
        **kept_payload(payload),
        "at": now.isoformat(timespec="seconds"),
        **(extra or {}),
    }
    batch = named_batch(payload)
    if batch is not None:  # kept even when the payload is cut
        record["batch_id"] = batch
    # time first (IDs sort by it), then microseconds and a nonce: never two alike
    record["id"] = f"{now:%Y%m%dT%H%M%S}-{now:%f}{secrets.token_hex(4)}"
    body = record_bytes(record)
    key = f"{dead_letter_dir(task)}/{record['id']}.json"
    # a stray message's task name is not a metric label (labels must stay few)
    DEAD_LETTERS.labels(task if task in app.tasks else UNKNOWN_TASK).inc()
    try:
        ctx.store.put(key, body)
    except Exception as exc:  # noqa: BLE001 - the log line below still carries the reason
        log.error(
            "could not store dead letter for %s: %s", excerpt(task), excerpt(redact(str(exc)))
        )
    if ctx.settings.mode == "distributed":
        try:
            app.send_task(DEAD_LETTER_TASK, kwargs={"record": record}, queue=DEAD_LETTER_QUEUE)
        except Exception as exc:  # noqa: BLE001
            log.error(
                "could not queue dead letter for %s: %s", excerpt(task), excerpt(redact(str(exc)))
            )
    log.error("dead-lettered %s message: %s (%s)", excerpt(task), excerpt(redact(reason)), key)
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
        """The validated message, or InvalidMessageError naming what is wrong.

        The size comes first: a payload over ``KIBAN_MAX_MESSAGE_BYTES`` is never parsed.
        """
        limit = get_settings().max_message_bytes
        size = message_size(_payload(args, kwargs))
        if size > limit:
            raise InvalidMessageError(oversize_reason(size, limit))
        if args or set(kwargs) != {"message"}:
            raise InvalidMessageError(
                f"{self.name} takes exactly one keyword argument 'message', got "
                f"{len(args)} positional and keywords {sorted(kwargs)}"
            )
        return parse_message(kwargs["message"], self.message_type)

    def delivered_from(self) -> str:
        """The queue this run's message came from (a pool's ``encode.<pool>`` included)."""
        info = getattr(self.request, "delivery_info", None) or {}
        queue = info.get("routing_key")
        return queue if isinstance(queue, str) and queue else self.message_type.queue

    def on_success(self, retval: Any, task_id: str, args: Any, kwargs: Any) -> None:
        record_task(self.name, self.delivered_from(), "success")

    def on_retry(
        self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any
    ) -> None:
        TASK_RETRIES.labels(self.name).inc()
        record_task(self.name, self.delivered_from(), "retry")
        log.warning(
            "%s: %s; retry %d/%d",
            self.name,
            excerpt(redact(str(exc))),
            self.request.retries + 1,
            self.max_retries,
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
        record_task(self.name, self.delivered_from(), "failure")
        try:
            ctx = Context.from_settings(get_settings())
            dead_letter(ctx, self.name, _payload(args, kwargs), reason)
            if not isinstance(exc, InvalidMessageError):
                from kiban.workflow import after_failure

                after_failure(self.parse(tuple(args), dict(kwargs)), ctx, self.name, reason)
        except Exception as err:  # noqa: BLE001 - a failure path must not fail the worker
            log.error(
                "%s: failure path could not complete: %s", self.name, excerpt(redact(str(err)))
            )


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
    "DEAD_LETTER_PAYLOAD_BYTES",
    "DEAD_LETTER_QUEUE",
    "DEAD_LETTER_TASK",
    "KibanTask",
    "close_vector_indexes",
    "dead_letter",
    "dead_letter_dir",
    "encode_payload",
    "excerpt",
    "kept_payload",
    "kiban_task",
    "message_size",
    "oversize_reason",
    "vector_index",
]
