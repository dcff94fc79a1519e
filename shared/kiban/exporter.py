"""The queue exporter: every queue's depth, sampled from the broker by one small process.

``python -m kiban.worker exporter`` (one per deployment; it runs no tasks) exports

- ``kiban_queue_length{queue}``: messages waiting in each queue, all of Celery's priority
  levels together (with the Redis transport a queue is one list per priority step: the base
  name for priority 0 and ``<queue><sep><step>`` above it, ``sep`` = ``"\\x06\\x16"`` and
  steps 0, 3, 6, 9 by default; the names come from kombu's own channel, so a changed
  ``priority_steps``, ``sep`` or ``global_keyprefix`` transport option is followed);
- ``kiban_queue_unacked``: messages delivered to a worker and not yet acknowledged (kombu's
  ``unacked`` hash: work in flight, re-delivered after the visibility timeout if its worker
  died);
- ``kiban_queue_sample_timestamp_seconds``: when the broker last answered.

The queues: every queue of the message registry (``ingest``, ``encode``, ``index``,
``report``, ``train``), each encoder pool's ``encode.<pool>`` (``KIBAN_ENCODE_POOLS``), the
``deadletter`` list, and any named with ``--queues``. Sampled every ``--interval`` seconds
(default 2). It is the only exporter of these series: the workers do not sample queues, so
the depth stays visible when a queue's consumers are down — exactly when it matters.
While the broker does not answer, the last depths are kept for ``STALE_AFTER`` seconds and
then removed (a gap, not a stale number); the timestamp says since when.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from kiban.celery_app import app
from kiban.messages import task_queues
from kiban.settings import Settings
from kiban.telemetry import QUEUE_LENGTH, QUEUE_SAMPLED, QUEUE_UNACKED, redact

log = logging.getLogger(__name__)

DEAD_LETTER_QUEUE = "deadletter"  # kiban.tasks.DEAD_LETTER_QUEUE (not imported: no Qdrant here)
DEFAULT_INTERVAL = 2.0
#: Depths older than this (seconds without an answer from the broker) are removed.
STALE_AFTER = 30.0
#: Socket timeouts of the exporter's own broker connection: a hung broker is one failed round.
SOCKET_TIMEOUT = 5.0


def watched_queues(settings: Settings, extra: Iterable[str] = ()) -> tuple[str, ...]:
    """The registry's queues, each encoder pool's queue, ``deadletter``, then ``extra``."""
    queues = dict.fromkeys(task_queues().values())
    for pool in settings.encode_pools.values():
        queues[f"encode.{pool}"] = None
    queues[DEAD_LETTER_QUEUE] = None
    queues.update(dict.fromkeys(extra))
    return tuple(queues)


class QueueSampler:
    """Reads the depth of ``queues`` from the broker through kombu's Redis channel."""

    def __init__(self, queues: Iterable[str]) -> None:
        self.queues = tuple(queues)
        self._conn: Any = None

    def _channel(self) -> Any:
        if self._conn is None:
            conn = app.connection_for_read(
                transport_options={
                    "socket_timeout": SOCKET_TIMEOUT,
                    "socket_connect_timeout": SOCKET_TIMEOUT,
                }
            )
            try:
                conn.ensure_connection(max_retries=1)
            except Exception:
                with contextlib.suppress(Exception):
                    conn.release()
                raise
            self._conn = conn
        return self._conn.default_channel

    def keys(self, channel: Any, queue: str) -> list[str]:
        """The broker keys holding ``queue``'s messages: one per priority step."""
        return list(dict.fromkeys(channel._q_for_pri(queue, p) for p in channel.priority_steps))

    def sample(self) -> tuple[dict[str, int], int]:
        """(depth of each queue, unacknowledged messages); raises when the broker is away."""
        try:
            channel = self._channel()
            client = channel.client
            layout = [(queue, self.keys(channel, queue)) for queue in self.queues]
            with client.pipeline(transaction=False) as pipe:
                for _, keys in layout:
                    for key in keys:
                        pipe.llen(key)
                pipe.hlen(channel.unacked_key)
                answers = pipe.execute()
        except Exception:
            self.close()  # a fresh connection next round
            raise
        depths: dict[str, int] = {}
        at = 0
        for queue, keys in layout:
            depths[queue] = sum(int(n) for n in answers[at : at + len(keys)])
            at += len(keys)
        return depths, int(answers[at])

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.release()
            self._conn = None


class Sampler(Protocol):
    def sample(self) -> tuple[dict[str, int], int]: ...


class QueueExporter:
    """One sampling round at a time: sets the gauges, or keeps them briefly on a failure."""

    def __init__(
        self,
        sampler: Sampler,
        clock: Callable[[], float] = time.time,
        stale_after: float = STALE_AFTER,
    ) -> None:
        self.sampler = sampler
        self.clock = clock
        self.stale_after = stale_after
        self.last_success: float | None = None
        self.failing = False

    def round(self) -> bool:
        """Sample once; True when the broker answered."""
        try:
            depths, unacked = self.sampler.sample()
        except Exception as exc:  # noqa: BLE001 - a broker away is a gap, never a crash
            if not self.failing:
                log.warning("queue exporter: broker not answering: %s", redact(str(exc)))
                self.failing = True
            if self.last_success is None or self.clock() - self.last_success > self.stale_after:
                QUEUE_LENGTH.clear()
                QUEUE_UNACKED.set(float("nan"))  # unknown, not zero
            return False
        for queue, depth in depths.items():
            QUEUE_LENGTH.labels(queue).set(depth)
        QUEUE_UNACKED.set(unacked)
        self.last_success = self.clock()
        QUEUE_SAMPLED.set(self.last_success)
        if self.failing:
            log.info("queue exporter: broker answering again")
            self.failing = False
        return True


def run_exporter(
    settings: Settings, extra_queues: Iterable[str] = (), interval: float = DEFAULT_INTERVAL
) -> None:
    """Sample the queues every ``interval`` seconds until the process is stopped (blocks)."""
    queues = watched_queues(settings, extra_queues)
    exporter = QueueExporter(QueueSampler(queues))
    log.info(
        "queue exporter: %s every %.1fs, broker %s",
        ",".join(queues),
        interval,
        redact(settings.broker_url),
    )
    while True:
        started = time.monotonic()
        exporter.round()
        time.sleep(max(0.0, interval - (time.monotonic() - started)))
