"""Worker liveness in the broker: a running task keeps its lease, and anyone can see who lives.

**Redelivery** (docs/deployment.md, *Redelivery*). Tasks are acknowledged late. With Celery's
Redis transport a message delivered and not yet acknowledged sits in the ``unacked`` hash,
indexed in the ``unacked_index`` sorted set by the time it was delivered, and every consumer
sweeps that index every few seconds, putting back on its queue each message whose time is older
than ``KIBAN_VISIBILITY_TIMEOUT``. Every worker runs one thread (``LivenessMonitor``) that, every
``renew_interval`` seconds, sets that time to *now* for each message the worker holds. So:

- while a worker lives and reaches the broker nothing it holds is put back, however long the
  task runs (a nightly evaluation, a training run): never two copies at once;
- when a worker dies (SIGKILL, OOM, a lost node) its renewals stop and its messages are put
  back ``KIBAN_VISIBILITY_TIMEOUT`` after the last renewal, plus at most one sweep
  (``restore_sweep_interval``): ``redelivery_bound`` seconds after the death;
- the only way a running task is handed out twice is a worker cut off from the broker (or
  frozen) for longer than the timeout less one renewal; the worker then logs an error naming
  the task (the work is idempotent: the second copy writes the same shard and the same points).

**Heartbeats.** The same thread writes ``kiban:worker:<node>`` (expiring after ``heartbeat_ttl``):
node name, pid, host, queues, metrics address and the tasks it is running. ``kiban status`` reads
them: a worker of the solo pool that is busy with a task does not answer Celery's ping, and a
dead one simply has no record once it expired.

Nothing here runs in embedded mode or in a client: the monitor is a consumer bootstep
(``LivenessStep``, added to the app by ``kiban.celery_app.configure``).
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from celery import bootsteps

log = logging.getLogger(__name__)

#: Heartbeat records: ``<global key prefix>kiban:worker:<node name>``.
HEARTBEAT_PREFIX = "kiban:worker:"
#: The transport's defaults (``kombu.transport.redis.Channel``); a worker reads its channel's.
UNACKED_KEY = "unacked"
UNACKED_INDEX_KEY = "unacked_index"
#: Longest text kept of a value taken from a message (batch, model) in a heartbeat.
MAX_FIELD_CHARS = 200


def renew_interval(visibility_timeout: float) -> float:
    """Seconds between two lease renewals (and heartbeats) of a worker."""
    return max(1.0, min(10.0, visibility_timeout / 6))


def restore_sweep_interval(visibility_timeout: float) -> int:
    """Seconds between two sweeps for expired leases (kombu's ``unacked_restore_interval``)."""
    return max(1, min(10, int(visibility_timeout) // 4))


def redelivery_bound(visibility_timeout: float) -> float:
    """At most this long after a worker died, its tasks are back on their queues (a consumer
    that is not busy picks them up at once; a busy pool when its current task ends)."""
    return visibility_timeout + restore_sweep_interval(visibility_timeout)


def heartbeat_ttl(visibility_timeout: float) -> int:
    """A heartbeat record expires this long after the last one: three missed beats."""
    return int(3 * renew_interval(visibility_timeout)) + 5


def _short(value: object) -> str | int | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        return value[:MAX_FIELD_CHARS]
    return None


def work_of(kwargs: object) -> dict[str, str | int | None]:
    """batch, model and chunk named by a kiban task's ``message`` keyword argument."""
    message = kwargs.get("message") if isinstance(kwargs, Mapping) else None
    if not isinstance(message, Mapping):
        return {"batch": None, "model": None, "chunk": None}
    return {
        "batch": _short(message.get("batch_id")),
        "model": _short(message.get("model")),
        "chunk": _short(message.get("chunk")),
    }


def describe_raw_message(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Task name, id and work of a message as kombu's Redis transport stores it (the payload
    in the ``unacked`` hash or a queue): headers, and a body that is base64 JSON."""
    headers: Mapping[str, Any] = raw.get("headers") or {}
    properties: Mapping[str, Any] = raw.get("properties") or {}
    if not isinstance(headers, Mapping):
        headers = {}
    if not isinstance(properties, Mapping):
        properties = {}
    kwargs: object = None
    with contextlib.suppress(Exception):  # a stray or foreign body: no work named
        body = raw.get("body")
        if properties.get("body_encoding") == "base64" and isinstance(body, str):
            body = base64.b64decode(body)
        decoded = json.loads(body) if isinstance(body, (str, bytes)) else None
        if isinstance(decoded, list) and len(decoded) >= 2:
            kwargs = decoded[1]
    return {
        "task": _short(headers.get("task")),
        "id": _short(headers.get("id")),
        "tag": _short(properties.get("delivery_tag")),
        **work_of(kwargs),
    }


# -- what this worker is running (task_prerun / task_postrun) ----------------------------

_RUNNING: dict[str, dict[str, Any]] = {}


def _on_prerun(task_id: str | None = None, task: Any = None, kwargs: Any = None, **_: Any) -> None:
    if task_id:
        _RUNNING[task_id] = {
            "id": task_id,
            "task": getattr(task, "name", None),
            "started": time.time(),
            **work_of(kwargs),
        }


def _on_postrun(task_id: str | None = None, **_: Any) -> None:
    if task_id:
        _RUNNING.pop(task_id, None)


def running_tasks() -> list[dict[str, Any]]:
    return [dict(entry) for entry in list(_RUNNING.values())]


# -- lease renewal -------------------------------------------------------------------------


def renew(client: Any, index_key: str, tags: Iterable[str], now: float) -> list[str]:
    """Set the index time of each of ``tags`` to ``now`` where it is still indexed; returns the
    tags that were not (put back on a queue by a sweep, or gone with the broker's data)."""
    tags = list(tags)
    if not tags:
        return []
    with client.pipeline(transaction=False) as pipe:
        for tag in tags:
            pipe.zadd(index_key, {tag: now}, xx=True, ch=True)
        changed = pipe.execute()
    return [tag for tag, n in zip(tags, changed, strict=True) if not n]


class LivenessMonitor:
    """One thread per worker process: renews the leases of the messages the consumer holds and
    writes the heartbeat record. ``beat`` is one round (tests call it directly)."""

    def __init__(
        self,
        client: Any,
        visibility_timeout: float,
        node: str,
        metrics: str | None = None,
        key_prefix: str = "",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.visibility_timeout = visibility_timeout
        self.node = node
        self.metrics = metrics
        self.key_prefix = key_prefix
        self.clock = clock
        self.interval = renew_interval(visibility_timeout)
        self.started = clock()
        self.consumer: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_ok = clock()
        self._failing = False
        self._outage_reported = False
        self._lost: set[str] = set()
        self._suspects: set[str] = set()

    # the consumer's view: what it holds, where it keeps it
    def _channel(self) -> Any:
        consumer = getattr(self.consumer, "task_consumer", None)
        return getattr(consumer, "channel", None)

    def held(self) -> dict[str, Any]:
        """Delivery tag → message of every message this worker holds unacknowledged.

        kombu's QoS keeps a delivered message in ``_delivered`` until the next delivery even
        after its ack, marking it in ``_dirty``: those are done, not held."""
        qos = getattr(self._channel(), "qos", None)
        delivered = getattr(qos, "_delivered", None)
        if not delivered:
            return {}
        for _ in range(3):  # copied while the consumer thread may change them
            with contextlib.suppress(RuntimeError):
                done = set(getattr(qos, "_dirty", ()))
                return {tag: m for tag, m in dict(delivered).items() if tag not in done}
        return {}

    def index_key(self) -> str:
        channel = self._channel()
        return self.key_prefix + str(getattr(channel, "unacked_index_key", UNACKED_INDEX_KEY))

    def queues(self) -> list[str]:
        consumer: Any = getattr(self.consumer, "task_consumer", None)
        with contextlib.suppress(Exception):
            return [str(q.name) for q in consumer.queues]
        return []

    def heartbeat_key(self) -> str:
        return f"{self.key_prefix}{HEARTBEAT_PREFIX}{self.node}"

    def record(self, held: Mapping[str, Any], now: float) -> dict[str, Any]:
        return {
            "node": self.node,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "queues": self.queues(),
            "metrics": self.metrics,
            "started": self.started,
            "seen": now,
            "renew_interval": self.interval,
            "tasks": running_tasks(),
            "held": sorted(str(tag) for tag in held),
        }

    def beat(self) -> bool:
        """One round: renew every held lease and write the heartbeat. False: broker away."""
        now = self.clock()
        held = self.held()
        try:
            lost = renew(self.client, self.index_key(), held, now)
            self.client.set(
                self.heartbeat_key(),
                json.dumps(self.record(held, now)),
                ex=heartbeat_ttl(self.visibility_timeout),
            )
        except Exception as exc:  # noqa: BLE001 - the broker restarting: try again soon
            self._on_failure(exc, held, now)
            return False
        if self._failing:
            log.info("broker reachable again: leases of %d task(s) renewed", len(held))
        self._failing = self._outage_reported = False
        self._last_ok = now
        # Un-indexed and still held: lost, unless it was being acknowledged at this very moment
        # (kombu removes the index entry before it marks the message done), so only a message
        # found un-indexed on two beats in a row counts.
        still = self.held()
        suspects = {tag for tag in lost if tag in still}
        confirmed, self._suspects = suspects & self._suspects, suspects
        for tag in confirmed:
            if tag not in self._lost:
                self._lost.add(tag)
                headers = getattr(still[tag], "headers", None) or {}
                log.error(
                    "lease of %s[%s] lost: the broker no longer counts it in flight (put back "
                    "on its queue after an outage or a pause longer than "
                    "KIBAN_VISIBILITY_TIMEOUT=%ss, or the broker lost its data); it may run "
                    "twice — shards and points are idempotent",
                    headers.get("task", "?"),
                    headers.get("id", tag),
                    int(self.visibility_timeout),
                )
        self._lost &= set(still)
        return True

    def _on_failure(self, exc: BaseException, held: Mapping[str, Any], now: float) -> None:
        if not self._failing:
            self._failing = True
            log.warning(
                "cannot renew the lease of %d task(s) in flight, broker unreachable: %s",
                len(held),
                type(exc).__name__,
            )
        away = now - self._last_ok
        if held and not self._outage_reported and away > self.visibility_timeout - self.interval:
            self._outage_reported = True
            log.error(
                "broker unreachable for %.0fs (KIBAN_VISIBILITY_TIMEOUT=%ss): the %d task(s) "
                "this worker runs may be handed to another worker while they still run",
                away,
                int(self.visibility_timeout),
                len(held),
            )

    def run(self) -> None:
        while not self._stop.is_set():
            ok = self.beat()
            self._stop.wait(self.interval if ok else 1.0)

    def attach(self, consumer: Any) -> None:
        """Follow ``consumer`` (again after a reconnect); start the thread the first time."""
        self.consumer = consumer
        if self._thread is None:
            self._thread = threading.Thread(target=self.run, name="kiban-liveness", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with contextlib.suppress(Exception):  # leaving: the record goes at once
            self.client.delete(self.heartbeat_key())


_MONITOR: LivenessMonitor | None = None


def _monitor_for(consumer: Any) -> LivenessMonitor:
    global _MONITOR
    if _MONITOR is None:
        import redis

        from kiban.settings import get_settings

        settings = get_settings()
        host = settings.metrics_host
        if host in ("", "0.0.0.0", "::"):  # bound to every address: name the machine
            host = socket.gethostname()
        conf = consumer.app.conf
        options = conf.broker_transport_options or {}
        client = redis.Redis.from_url(conf.broker_url, socket_timeout=5, socket_connect_timeout=5)
        _MONITOR = LivenessMonitor(
            client,
            float(options.get("visibility_timeout", 3600)),
            str(consumer.hostname),
            f"{host}:{settings.metrics_port}" if settings.metrics_port else None,
            str(options.get("global_keyprefix", "") or ""),
        )
    return _MONITOR


class LivenessStep(bootsteps.StartStopStep):
    """Consumer bootstep: the liveness monitor follows the task consumer (module docstring)."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def start(self, c: Any) -> None:
        from celery import signals

        signals.task_prerun.connect(_on_prerun, weak=False, dispatch_uid="kiban-liveness-pre")
        signals.task_postrun.connect(_on_postrun, weak=False, dispatch_uid="kiban-liveness-post")
        try:
            _monitor_for(c).attach(c)
        except Exception as exc:  # noqa: BLE001 - a broker URL redis-py cannot open directly
            log.error(
                "lease renewal and heartbeats off (%s): a task held longer than "
                "KIBAN_VISIBILITY_TIMEOUT will be delivered again",
                type(exc).__name__,
            )

    def shutdown(self, c: Any) -> None:
        global _MONITOR
        if _MONITOR is not None:
            _MONITOR.stop()
            _MONITOR = None


def read_heartbeats(client: Any, key_prefix: str = "", limit: int = 1000) -> list[dict[str, Any]]:
    """Every live worker's heartbeat record (expired ones are gone), by node name."""
    keys = []
    for key in client.scan_iter(match=f"{key_prefix}{HEARTBEAT_PREFIX}*", count=200):
        keys.append(key)
        if len(keys) >= limit:
            break
    records = []
    for raw in client.mget(keys) if keys else []:
        with contextlib.suppress(Exception):
            record = json.loads(raw)
            if isinstance(record, dict) and isinstance(record.get("node"), str):
                records.append(record)
    return sorted(records, key=lambda r: str(r["node"]))
