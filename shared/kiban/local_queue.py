"""The embedded default's broker: an in-process queue run by an in-process worker loop.

Embedded mode must behave like the distributed one, only without servers: every message
is queued (never run inside the task that sent it), tasks run one at a time in FIFO
order, a ``TransientError`` is retried by Celery's own ``autoretry_for`` with its backoff
(the retry waits in the queue while other work runs), and a task that fails for good goes
through the same ``on_failure`` dead-letter path as on a worker. A failing chunk therefore
leaves every other chunk of the batch untouched, exactly as in production.

Tasks are executed with Celery's eager tracer (what ``Task.apply`` uses), minus
``apply``'s habit of running a retry immediately and recursively.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from celery.app.trace import build_tracer
from celery.exceptions import Retry
from celery.utils import uuid

from kiban.celery_app import app
from kiban.errors import KibanError

log = logging.getLogger(__name__)


@dataclass(order=True)
class Envelope:
    """One queued message: due time first, then send order (FIFO among ready messages)."""

    due: float
    seq: int
    task: str = field(compare=False)
    kwargs: dict[str, Any] = field(compare=False)
    queue: str = field(compare=False)
    retries: int = field(compare=False, default=0)


class LocalQueue:
    """FIFO queue with delayed retries, drained by ``run_until_empty`` in one thread."""

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._clock, self._sleep = clock, sleep
        self._heap: list[Envelope] = []
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self._draining = False
        self._tracers: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self._heap)

    def send(
        self,
        task: str,
        kwargs: dict[str, Any],
        queue: str,
        countdown: float = 0.0,
        retries: int = 0,
    ) -> None:
        """Queue a message for ``task``; refused at once if no installed service serves it."""
        if task not in app.tasks:
            raise KibanError(f"task {task} is not installed in this process (missing extra?)")
        due = self._clock() + max(0.0, countdown)
        with self._lock:
            heapq.heappush(self._heap, Envelope(due, next(self._seq), task, kwargs, queue, retries))

    def run_until_empty(self) -> int:
        """Run queued tasks (and whatever they send) until none is left; the count run.

        Re-entrant calls (a task that dispatches) return at once: the outer loop runs the
        new message in its turn.
        """
        with self._lock:
            if self._draining:
                return 0
            self._draining = True
        ran = 0
        try:
            while True:
                with self._lock:
                    if not self._heap:
                        return ran
                    wait = self._heap[0].due - self._clock()
                    envelope = heapq.heappop(self._heap) if wait <= 0 else None
                if envelope is None:
                    self._sleep(min(wait, 60.0))  # only delayed retries are left
                    continue
                self._execute(envelope)
                ran += 1
        finally:
            with self._lock:
                self._draining = False

    def _tracer(self, name: str) -> Any:
        if name not in self._tracers:
            self._tracers[name] = build_tracer(
                name, app.tasks[name], eager=True, propagate=False, app=app
            )
        return self._tracers[name]

    def _execute(self, envelope: Envelope) -> None:
        task_id = uuid()
        request = {
            "id": task_id,
            "task": envelope.task,
            "root_id": task_id,
            "parent_id": None,
            "retries": envelope.retries,
            "is_eager": True,  # Task.retry then returns Retry instead of publishing
            "hostname": "embedded",
            "callbacks": None,
            "errbacks": None,
            "headers": None,
            "ignore_result": True,
            "delivery_info": {
                "is_eager": True,
                "exchange": "",
                "routing_key": envelope.queue,
                "priority": None,
            },
        }
        outcome = self._tracer(envelope.task)(task_id, (), envelope.kwargs, request)
        retval = outcome.retval
        retval = getattr(retval, "exception", retval)  # ExceptionInfo
        retval = getattr(retval, "exc", retval)  # ExceptionWithTraceback
        if isinstance(retval, Retry) and retval.sig is not None:
            self.send(
                envelope.task,
                dict(retval.sig.kwargs),
                envelope.queue,
                countdown=_seconds(retval.when),
                retries=envelope.retries + 1,
            )


def _seconds(when: Any) -> float:
    if isinstance(when, (int, float)):
        return float(when)
    if isinstance(when, datetime):
        now = datetime.now(when.tzinfo or timezone.utc)
        return max(0.0, (when - now).total_seconds())
    return 0.0


QUEUE = LocalQueue()
