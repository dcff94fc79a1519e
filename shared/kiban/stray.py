"""Stray broker entries never kill a worker.

Anything on a queue that no kiban task can take — a raw string pushed onto the Redis list,
JSON that is not a kombu message, a Celery message for an unknown task, a body that does not
decode, a refused content type (pickle, YAML), an entry larger than KIBAN_MAX_MESSAGE_BYTES —
is logged (redacted, a short escaped excerpt), dead-lettered with its reason (task
``(unknown)`` where it names none) and removed from the queue. The worker goes on with the
next message.

Left alone, kombu raises out of the event loop for the first kinds (Celery then stops the
worker: "Unrecoverable error", or drops and re-opens the broker connection), and Celery
only logs and rejects the others. ``install`` (called by ``kiban.worker`` at start-up) puts
two guards in place:

- **the entry** (``GuardedRedisTransport``): each entry BRPOP takes off a list is checked
  before kombu decodes it — its size first, then that it is JSON, a kombu envelope with the
  fields of the types kombu and Celery read, and a body that decodes;
- **the message** (``GuardedConsumer``): a body over the limit is refused before Celery
  decodes it; unknown messages, unknown tasks, invalid messages (refused content types) and
  undecodable bodies are dead-lettered as well as rejected; and any other error raised while
  a message is received is a dead letter, not a crash.

A message that reaches its task is measured again there (``KibanTask.parse``), so every
level refuses an oversize message before parsing it.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import logging
from typing import Any
from urllib.parse import urlsplit

from celery import Celery, signals
from celery.worker.consumer.consumer import Consumer
from kombu.transport import redis as kombu_redis
from kombu.utils.json import loads as kombu_loads
from vine import promise

from kiban.settings import Settings, get_settings
from kiban.telemetry import redact

log = logging.getLogger(__name__)

#: The task name recorded for an entry that names none.
UNKNOWN_TASK = "(unknown)"
#: Room for Celery's envelope around the message: ``[args, {"message": ...}, embed]`` in the
#: body, and the headers and properties (base64 makes the body 4/3 larger) in the entry.
BODY_SLACK_BYTES = 16 * 1024
ENTRY_SLACK_BYTES = 64 * 1024

_BODY_ENCODINGS = ("base64", "utf-8")
_GUARDED_SCHEMES = ("redis", "rediss")


def body_limit(max_message_bytes: int) -> int:
    """Largest Celery message body accepted for a message limit (arguments and envelope)."""
    return max_message_bytes + BODY_SLACK_BYTES


def entry_limit(max_message_bytes: int) -> int:
    """Largest Redis list entry accepted: the base64 body plus headers and properties."""
    return body_limit(max_message_bytes) * 4 // 3 + ENTRY_SLACK_BYTES


def record_stray(
    reason: str,
    payload: Any,
    *,
    task: Any = None,
    queue: Any = None,
    content_type: Any = None,
) -> None:
    """Log and dead-letter a broker entry no task took; never raises (the worker goes on).

    ``payload`` is what was on the broker: raw bytes or text, a JSON value, or a message
    body; the dead letter keeps a bounded part of it with its size and sha256.
    """
    from kiban.context import Context
    from kiban.tasks import dead_letter, encode_payload, excerpt

    name = task if isinstance(task, str) and task else UNKNOWN_TASK
    where = queue if isinstance(queue, str) and queue else "(unknown queue)"
    try:
        start = encode_payload(payload)[:200].decode("utf-8", "replace")
    except Exception:  # noqa: BLE001 - an excerpt must not stop the dead letter
        start = "(unprintable)"
    log.warning(
        "stray broker entry on %s for task %s refused: %s; it starts: %s",
        excerpt(where, 200),
        excerpt(name, 200),
        excerpt(redact(reason)),
        excerpt(redact(start), 120),
    )
    extra: dict[str, Any] = {"stray": True, "queue": where}
    if isinstance(content_type, str):
        extra["content_type"] = excerpt(content_type, 200)
    try:
        dead_letter(Context.from_settings(get_settings()), name, payload, reason, extra)
    except Exception as exc:  # noqa: BLE001 - a guard must not fail the worker
        log.error("could not dead-letter a stray entry: %s", excerpt(redact(str(exc))))


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    return "a number"


def envelope_problem(raw: Any, max_message_bytes: int) -> str | None:
    """Why a decoded Redis entry is not a kombu message kombu and Celery can read, or None.

    Checks exactly what kombu's virtual ``Message`` and Celery's consumer read, with the
    types they assume, so neither can raise out of the event loop on it.
    """
    if not isinstance(raw, dict):
        return f"not a kombu message: the entry is {_kind(raw)}, not an object"
    props = raw.get("properties")
    if not isinstance(props, dict):
        return "not a kombu message: no 'properties' object"
    tag = props.get("delivery_tag")
    if isinstance(tag, bool) or not isinstance(tag, (str, int)):
        return "not a kombu message: no delivery tag"
    for name, value in (
        ("properties.delivery_info", props.get("delivery_info")),
        ("headers", raw.get("headers")),
    ):
        if value is not None and not isinstance(value, dict):
            return f"not a kombu message: {name} is {_kind(value)}, not an object"
    headers = raw.get("headers") or {}
    for name in ("task", "id"):
        if headers.get(name) is not None and not isinstance(headers.get(name), str):
            return f"not a Celery message: headers.{name} is {_kind(headers.get(name))}"
    for name in ("content-type", "content-encoding", "body"):
        if raw.get(name) is not None and not isinstance(raw.get(name), str):
            return f"not a kombu message: {name} is {_kind(raw.get(name))}, not a string"
    encoding = props.get("body_encoding")
    if encoding is not None and (
        not isinstance(encoding, str) or encoding.lower() not in _BODY_ENCODINGS
    ):
        return "not a kombu message: unknown body encoding"
    body = raw.get("body") or ""
    size = len(body) * 3 // 4 if encoding == "base64" else len(body.encode("utf-8", "replace"))
    if size > body_limit(max_message_bytes):
        return f"message of {size} bytes exceeds KIBAN_MAX_MESSAGE_BYTES ({max_message_bytes})"
    if encoding == "base64":
        try:
            base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            return "not a kombu message: the body is not valid base64"
    return None


def check_entry(item: Any, max_message_bytes: int, channel: Any = None) -> str | None:
    """Why a raw Redis list entry must not reach kombu, or None: its size before anything
    is decoded, then JSON, the envelope and (given the channel) kombu's own message."""
    size = len(item) if isinstance(item, (bytes, str)) else 0
    limit = entry_limit(max_message_bytes)
    if size > limit:
        return (
            f"message of {size} bytes exceeds KIBAN_MAX_MESSAGE_BYTES ({max_message_bytes}; "
            f"a broker entry may have {limit} bytes with its envelope)"
        )
    try:
        raw = kombu_loads(item.decode("utf-8", "replace") if isinstance(item, bytes) else item)
    except Exception as exc:  # noqa: BLE001 - JSON errors, and kombu's type hooks on bad values
        return f"not a kombu message: not JSON ({type(exc).__name__}: {exc})"
    problem = envelope_problem(raw, max_message_bytes)
    if problem is None and channel is not None:
        try:
            channel.Message(raw, channel=channel)
        except Exception as exc:  # noqa: BLE001 - whatever kombu cannot build is refused
            problem = f"not a kombu message: {type(exc).__name__}: {exc}"
    return problem


def _entry_task(item: Any) -> Any:
    """The task an entry names, if it is a readable envelope (for the dead letter's folder)."""
    try:
        raw = json.loads(item)
        headers = raw.get("headers") if isinstance(raw, dict) else None
        return headers.get("task") if isinstance(headers, dict) else None
    except Exception:  # noqa: BLE001
        return None


class _EntryGuard:
    """Mixin for kombu's Redis client: BRPOP replies are checked before kombu reads them.

    A refused entry is already off the list (BRPOP pops it): it is dead-lettered and the
    reply becomes "nothing", which kombu treats like a BRPOP timeout.
    """

    def __init__(self, *args: Any, kiban_channel: Any = None, **kwargs: Any) -> None:
        self._kiban_channel = kiban_channel
        super().__init__(*args, **kwargs)

    def parse_response(self, connection: Any, command_name: Any, **options: Any) -> Any:
        reply = super().parse_response(connection, command_name, **options)  # type: ignore[misc]
        if command_name != "BRPOP" or not reply:
            return reply
        try:
            queue, item = reply
            queue = queue.decode("utf-8", "replace") if isinstance(queue, bytes) else str(queue)
            channel = self._kiban_channel
            queue = queue.rsplit(getattr(channel, "sep", "\x06\x16"), 1)[0]
            problem = check_entry(item, get_settings().max_message_bytes, channel)
        except Exception as exc:  # noqa: BLE001 - an unexpected reply shape: let kombu judge
            log.debug("entry guard skipped: %s", exc)
            return reply
        if problem is None:
            return reply
        record_stray(problem, item, task=_entry_task(item), queue=queue)
        return None


@functools.cache
def _guarded(client_class: type) -> type:
    return type(f"Guarded{client_class.__name__}", (_EntryGuard, client_class), {})


class GuardedRedisChannel(kombu_redis.Channel):
    """kombu's Redis channel whose clients check every BRPOP entry (``_EntryGuard``)."""

    def _get_client(self) -> Any:
        base = super()._get_client()
        if isinstance(base, functools.partial):
            return functools.partial(
                _guarded(base.func), *base.args, kiban_channel=self, **base.keywords
            )
        return functools.partial(_guarded(base), kiban_channel=self)


class GuardedRedisTransport(kombu_redis.Transport):
    """kombu's Redis transport with ``GuardedRedisChannel``."""

    Channel = GuardedRedisChannel


def _message_task(message: Any) -> Any:
    headers = getattr(message, "headers", None)
    return headers.get("task") if isinstance(headers, dict) else None


def _message_queue(message: Any) -> Any:
    info = getattr(message, "delivery_info", None)
    return info.get("routing_key") if isinstance(info, dict) else None


class GuardedConsumer(Consumer):
    """Celery's consumer, whose every refusal is also a dead letter and never a crash."""

    def _recoverable(self) -> tuple[type[BaseException], ...]:
        """Broker connection errors, which Celery recovers from by reconnecting. kombu counts
        KeyError among them (a stale descriptor); here a KeyError is about a message."""
        errors = tuple(getattr(self, "connection_errors", ()) or ())
        return tuple(e for e in errors if not issubclass(KeyError, e))

    def _refuse(self, message: Any, reason: str) -> None:
        """Take ``message`` off the queue (unless it was already) and dead-letter it."""
        if not getattr(message, "acknowledged", True):
            message.reject_log_error(log, self._recoverable())
        record_stray(
            reason,
            getattr(message, "body", b"") or b"",
            task=_message_task(message),
            queue=_message_queue(message),
            content_type=getattr(message, "content_type", None),
        )

    def create_task_handler(self, promise: Any = promise) -> Any:
        handler = super().create_task_handler(promise)
        recoverable = self._recoverable()

        def on_task_received(message: Any) -> Any:
            try:
                body = getattr(message, "body", None) or b""
                limit = get_settings().max_message_bytes
                if len(body) > body_limit(limit):
                    self._refuse(
                        message,
                        f"message of {len(body)} bytes exceeds KIBAN_MAX_MESSAGE_BYTES "
                        f"({limit}; a message body may have {body_limit(limit)} bytes)",
                    )
                    return None
                return handler(message)
            except recoverable:
                raise
            except Exception as exc:  # noqa: BLE001 - a message must never stop the worker
                self._refuse(message, f"message could not be received: {type(exc).__name__}: {exc}")
                return None

        return on_task_received

    def on_unknown_message(self, body: Any, message: Any) -> None:
        self._refuse(message, "not a Celery task message (no task name)")
        signals.task_rejected.send(sender=self, message=message, exc=None)

    def on_unknown_task(self, body: Any, message: Any, exc: BaseException) -> None:
        name = _message_task(message)
        self._refuse(message, f"unknown task {str(name)!r}: not served by this worker")
        headers = message.headers if isinstance(message.headers, dict) else {}
        signals.task_unknown.send(
            sender=self, message=message, exc=exc, name=name, id=headers.get("id")
        )

    def on_invalid_task(self, body: Any, message: Any, exc: BaseException) -> None:
        self._refuse(message, f"invalid task message: {exc}")
        signals.task_rejected.send(sender=self, message=message, exc=exc)

    def on_decode_error(self, message: Any, exc: BaseException) -> None:
        content = getattr(message, "content_type", None)
        self._refuse(message, f"message body does not decode as {content!s}: {exc}")


def install(app: Celery, settings: Settings) -> None:
    """Use the guarded consumer and, for ``redis://`` and ``rediss://`` brokers, the guarded
    Redis transport (a worker process only; producers are unaffected).

    The transport is registered under kombu's own scheme names, so the broker URL, its TLS
    handling for ``rediss`` and what the worker logs about it stay exactly kombu's.
    """
    from kombu import transport as kombu_transports

    app.conf.worker_consumer = f"{__name__}:GuardedConsumer"
    if urlsplit(settings.broker_url).scheme in _GUARDED_SCHEMES:
        for scheme in _GUARDED_SCHEMES:
            kombu_transports.TRANSPORT_ALIASES[scheme] = f"{__name__}:GuardedRedisTransport"
            getattr(kombu_transports, "_transport_cache", {}).pop(scheme, None)


__all__ = [
    "UNKNOWN_TASK",
    "GuardedConsumer",
    "GuardedRedisTransport",
    "body_limit",
    "check_entry",
    "entry_limit",
    "envelope_problem",
    "install",
    "record_stray",
]
