"""Where a batch stands, read from the stores alone: any process can answer it.

Ingested = batch.json exists; encoded = a complete shard (``kiban.shards``) exists;
indexed = the index task's marker exists; failed = a stage gave up on the chunk
(``kiban.progress``); evaluated = a report version exists.

One poisoned record never fails the whole answer: a batch.json, shard meta or dead letter
that does not parse is listed as "unreadable: <reason>" (the reason names the problem, never
the file's content) and the rest is read; markers for chunks outside the batch's plan are
not counted.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from kiban.errors import KibanError
from kiban.progress import failed_chunks, indexed_chunks
from kiban.records import batch_prefix, read_batch_info, report_versions
from kiban.shards import list_shards, meta_key, read_meta
from kiban.store import ObjectStore


def unreadable_reason(exc: BaseException) -> str:
    """Why a stored record could not be read, without quoting what it contains."""
    if isinstance(exc, ValidationError):
        errors = exc.errors(include_url=False, include_input=False)
        if not errors:
            return "invalid record"
        first = errors[0]
        where = ".".join(str(p) for p in first["loc"])
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        return f"{where + ': ' if where else ''}{first['msg']}{more}"
    if isinstance(exc, json.JSONDecodeError):
        return f"invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
    if isinstance(exc, UnicodeDecodeError):
        return "not UTF-8 text"
    if isinstance(exc, KibanError):  # store errors name the key and the problem
        return str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return f"cannot be read ({type(exc).__name__})"


class ModelProgress(BaseModel):
    model: str
    chunks: int
    encoded: int
    indexed: int
    failed: int = 0  # chunks dead-lettered for good
    images_encoded: int | None = None  # None: not read (a progress poll)
    encode_failures: int | None = None


class BatchStatus(BaseModel):
    batch_id: str
    ingested: bool
    n_accepted: int = 0
    n_quarantined: int = 0
    n_duplicates: int = 0
    chunks: int = 0
    models: list[ModelProgress] = []
    report_versions: list[str] = []
    dead_letters: int = 0
    unreadable: list[str] = []  # "<key>: <reason>" for each stored record that did not parse

    @property
    def latest_report(self) -> str | None:
        return self.report_versions[-1] if self.report_versions else None


def _count(store: ObjectStore, prefix: str) -> int:
    return sum(1 for _ in store.list(prefix))


def letter_batch(letter: dict[str, Any]) -> str | None:
    """The batch a dead-lettered message was about, when its payload names one."""
    payload = letter.get("payload")
    if isinstance(payload, dict) and isinstance(payload.get("kwargs"), dict):
        payload = payload["kwargs"].get("message")  # wrong arguments: the raw call
    batch = payload.get("batch_id") if isinstance(payload, dict) else None
    if not isinstance(batch, str):  # a truncated payload is text: the record names the batch
        batch = letter.get("batch_id")
    return batch if isinstance(batch, str) else None


def read_dead_letter(store: ObjectStore, key: str) -> dict[str, Any]:
    """The stored dead letter, always with ``task`` and ``reason``; one that cannot be read
    or is not a JSON object comes back as ``{"task": <from its key>, "reason": "unreadable:
    …", "unreadable": True}`` (no payload: it names no batch)."""
    parts = key.split("/")
    task = parts[1] if len(parts) > 2 else "?"
    try:
        letter = json.loads(store.get(key))
        reason = None if isinstance(letter, dict) else "a JSON value that is not an object"
    except Exception as exc:
        reason = unreadable_reason(exc)
    if reason is not None:
        return {"task": task, "reason": f"unreadable: {reason}", "unreadable": True, "key": key}
    letter.setdefault("task", task)
    letter.setdefault("reason", "(no reason recorded)")
    return letter


class NewDeadLetters:
    """Dead letters stored under ``prefix`` since this watch began, each read once; ``reason``
    says which concern the watcher (its line) and which do not (None)."""

    def __init__(self, store: ObjectStore, prefix: str = "deadletter") -> None:
        self.store, self.prefix = store, prefix
        self.seen = {info.key for info in store.list(prefix)}

    def reason(self, letter: dict[str, Any]) -> str | None:
        raise NotImplementedError

    def new_reasons(self) -> list[str]:
        reasons = []
        for info in self.store.list(self.prefix):
            if info.key in self.seen:
                continue
            self.seen.add(info.key)
            reason = self.reason(read_dead_letter(self.store, info.key))
            if reason is not None:
                reasons.append(reason)
        return reasons


def dead_letter_count(store: ObjectStore, batch_id: str | None = None) -> int:
    if batch_id is None:
        return _count(store, "deadletter")
    return sum(
        1
        for info in store.list("deadletter")
        if letter_batch(read_dead_letter(store, info.key)) == batch_id
    )


def batch_status(
    store: ObjectStore,
    batch_id: str,
    models: list[str] | None = None,
    detailed: bool = True,
) -> BatchStatus:
    """Where the batch stands. ``detailed=False`` only lists keys — no shard metadata or
    dead letter is read — so a progress bar can poll it cheaply on a large batch."""
    info_key = f"{batch_prefix(batch_id)}/batch.json"
    if not store.exists(info_key):
        return BatchStatus(batch_id=batch_id, ingested=False)
    try:
        info = read_batch_info(store, batch_id)
    except Exception as exc:
        return BatchStatus(
            batch_id=batch_id,
            ingested=False,
            report_versions=report_versions(store, batch_id),
            dead_letters=dead_letter_count(store, batch_id) if detailed else 0,
            unreadable=[f"{info_key}: {unreadable_reason(exc)}"],
        )
    if models is None:
        models = sorted({ref.model for ref in list_shards(store) if ref.batch_id == batch_id})
    planned = {c.index for c in info.chunks}
    progress = []
    unreadable: list[str] = []
    for model in models:
        shards = [ref for ref in list_shards(store, model, batch_id) if ref.chunk in planned]
        entry = ModelProgress(
            model=model,
            chunks=len(info.chunks),
            encoded=len(shards),
            indexed=len(indexed_chunks(store, batch_id, model) & planned),
            failed=len(failed_chunks(store, batch_id, model) & planned),
        )
        if detailed:
            entry.images_encoded = entry.encode_failures = 0
            for ref in shards:
                try:
                    meta = read_meta(store, model, batch_id, ref.chunk)
                except Exception as exc:
                    key = meta_key(model, batch_id, ref.chunk)
                    unreadable.append(f"{key}: {unreadable_reason(exc)}")
                    continue
                if meta is not None:
                    entry.images_encoded += meta.n_images
                    entry.encode_failures += len(meta.failures)
        progress.append(entry)
    versions = report_versions(store, batch_id)
    return BatchStatus(
        batch_id=batch_id,
        ingested=True,
        n_accepted=info.n_accepted,
        n_quarantined=info.n_quarantined,
        n_duplicates=info.n_duplicates,
        chunks=len(info.chunks),
        models=progress,
        report_versions=versions,
        dead_letters=dead_letter_count(store, batch_id) if detailed else 0,
        unreadable=unreadable,
    )


def list_batches(store: ObjectStore) -> list[dict[str, object]]:
    """One row per ingested batch, oldest first; a batch whose batch.json cannot be read is
    a row with ``unreadable`` set (its reason) and no counts, listed first."""
    rows: list[dict[str, object]] = []
    for info in store.list("batches"):
        parts = info.key.split("/")
        if len(parts) == 3 and parts[2] == "batch.json":
            row: dict[str, object] = {"batch": parts[1], "unreadable": None}
            try:
                batch = read_batch_info(store, parts[1])
                row.update(
                    created=batch.created_at,
                    accepted=batch.n_accepted,
                    quarantined=batch.n_quarantined,
                    duplicates=batch.n_duplicates,
                )
            except Exception as exc:
                row.update(
                    created=None,
                    accepted=None,
                    quarantined=None,
                    duplicates=None,
                    unreadable=unreadable_reason(exc),
                )
            try:
                row["reports"] = len(report_versions(store, parts[1]))
            except Exception:
                row["reports"] = None
            rows.append(row)
    return sorted(rows, key=lambda r: (r["created"] is not None, str(r["created"])))


def recent_dead_letters(
    store: ObjectStore, limit: int, batch_id: str | None = None
) -> list[dict[str, object]]:
    """The newest dead letters (task, reason), optionally only those naming ``batch_id``."""
    keys = sorted((i.key for i in store.list("deadletter")), key=lambda k: k.rsplit("/", 1)[-1])
    letters = []
    for key in reversed(keys):
        letter = read_dead_letter(store, key)
        if batch_id is not None and letter_batch(letter) != batch_id:
            continue
        letters.append(letter)
        if len(letters) >= limit:
            break
    return letters


# -- the live view: workers, work in flight, queues (`kiban status` in distributed mode) ----

#: How long `kiban status` waits for the broker and for Celery's ping answers.
BROKER_WAIT_SECONDS = 2.0
PING_SECONDS = 1.0
#: In-flight messages listed at most (the broker's ``unacked`` hash is read this far).
MAX_IN_FLIGHT = 100


class InFlight(BaseModel):
    """A task delivered to a worker and not yet acknowledged."""

    task: str | None
    id: str | None
    batch: str | None = None
    model: str | None = None
    chunk: int | str | None = None
    worker: str | None = None  # node name of the worker running or holding it
    state: Literal["running", "held", "orphaned"]
    seconds: float | None = None  # running for (running); since the last lease renewal (else)
    redelivery_in: float | None = None  # orphaned: seconds until it is back on its queue


class WorkerState(BaseModel):
    """One worker as seen from its heartbeat, Celery's ping and the local stack's record."""

    name: str | None = None  # the name `kiban up` gave it (encoder-0), when it started it
    node: str | None = None  # Celery node name
    pid: int | None = None
    host: str | None = None
    state: Literal["alive", "not answering", "dead"]
    answers_ping: bool = False
    heartbeat_age: float | None = None
    queues: list[str] = []
    metrics: str | None = None  # host:port of its /metrics
    tasks: list[InFlight] = []
    restarts: int = 0  # by `kiban up`'s supervisor
    last_exit: str | None = None
    crash_loop: bool = False


class QueueDepth(BaseModel):
    queue: str
    waiting: int  # all priority levels together


class LiveStatus(BaseModel):
    mode: str
    broker: str | None = None  # redacted
    reachable: bool = False
    problem: str | None = None
    visibility_timeout: int | None = None
    workers: list[WorkerState] = []
    in_flight: list[InFlight] = []
    queues: list[QueueDepth] = []
    processes: dict[str, str] = {}  # other processes `kiban up` started: name → running | dead
    running_batches: list[BatchStatus] = []


def pid_running(pid: object) -> bool:
    import os

    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _unacked(client: Any, key_prefix: str, limit: int) -> list[tuple[dict[str, Any], float]]:
    """(message summary, lease time) of the first ``limit`` unacknowledged messages."""
    from kiban.liveness import UNACKED_INDEX_KEY, UNACKED_KEY, describe_raw_message

    out = []
    for tag, raw in client.hscan_iter(f"{key_prefix}{UNACKED_KEY}", count=limit):
        try:
            payload = json.loads(raw)[0]
            summary = describe_raw_message(payload) if isinstance(payload, dict) else {}
        except Exception:
            summary = {}
        summary["tag"] = tag.decode() if isinstance(tag, bytes) else str(tag)
        out.append(summary)
        if len(out) >= limit:
            break
    if not out:
        return []
    with client.pipeline(transaction=False) as pipe:
        for summary in out:
            pipe.zscore(f"{key_prefix}{UNACKED_INDEX_KEY}", summary["tag"])
        scores = pipe.execute()
    return [
        (s, float(score) if score is not None else 0.0)
        for s, score in zip(out, scores, strict=True)
    ]


def _ping(timeout: float) -> set[str]:
    from kiban.celery_app import app

    answers = app.control.ping(timeout=timeout) or []
    return {node for answer in answers if isinstance(answer, dict) for node in answer}


def live_status(
    settings: Any,
    store: ObjectStore | None = None,
    recorded: dict[str, Any] | None = None,
    unfinished: list[str] | None = None,
    ping_timeout: float = PING_SECONDS,
) -> LiveStatus:
    """Workers, what they run, the queues and the batches in progress, from the broker.

    ``recorded`` is what `kiban up` wrote in its state file (``procs``: name → pid, service,
    metrics port, supervision), so a worker it started that died is listed as dead rather
    than simply absent; ``unfinished`` are batches to show progress for besides those named
    by work in flight. The broker is given ``BROKER_WAIT_SECONDS``; unreachable, the answer
    says so and lists only what the record knows."""
    import socket
    import time

    import redis

    from kiban.liveness import read_heartbeats
    from kiban.telemetry import redact

    if settings.mode != "distributed":
        return LiveStatus(mode=settings.mode, problem="no workers: tasks run in the process "
                          "that sends them (KIBAN_MODE=embedded)")  # fmt: skip
    status = LiveStatus(
        mode=settings.mode,
        broker=redact(settings.broker_url),
        visibility_timeout=settings.visibility_timeout,
    )
    procs = dict((recorded or {}).get("procs", {}))
    now = time.time()
    heartbeats: list[dict[str, Any]] = []
    unacked: list[tuple[dict[str, Any], float]] = []
    pinged: set[str] = set()
    prefix = ""
    try:
        client = redis.Redis.from_url(
            settings.broker_url,
            socket_timeout=BROKER_WAIT_SECONDS,
            socket_connect_timeout=BROKER_WAIT_SECONDS,
            retry_on_timeout=False,
        )
        client.ping()
        heartbeats = read_heartbeats(client, prefix)
        unacked = _unacked(client, prefix, MAX_IN_FLIGHT)
        status.reachable = True
    except Exception as exc:  # noqa: BLE001 - one line, and the rest of the answer
        status.problem = f"broker unreachable: {redact(str(exc))[:300]}"
    if status.reachable:
        from kiban.celery_app import configure
        from kiban.exporter import QueueSampler, watched_queues

        configure(settings)
        sampler = QueueSampler(watched_queues(settings))
        try:
            depths, _ = sampler.sample()
            status.queues = [QueueDepth(queue=q, waiting=n) for q, n in depths.items()]
        except Exception as exc:  # noqa: BLE001
            status.problem = f"queue depths unreadable: {redact(str(exc))[:300]}"
        finally:
            sampler.close()
        try:
            pinged = _ping(ping_timeout)
        except Exception as exc:  # noqa: BLE001
            status.problem = f"ping failed: {redact(str(exc))[:300]}"

    # a record outliving its process (SIGKILL: no goodbye) is no live worker
    here = socket.gethostname()
    heartbeats = [
        hb
        for hb in heartbeats
        if not (hb.get("host") == here and isinstance(hb.get("pid"), int)) or pid_running(hb["pid"])
    ]

    # in flight: running on a live worker, held by one (reserved), or orphaned
    held_by: dict[str, str] = {}
    running: dict[str, InFlight] = {}
    for hb in heartbeats:
        for tag in hb.get("held") or []:
            held_by[str(tag)] = hb["node"]
        for task in hb.get("tasks") or []:
            if isinstance(task, dict):
                started = task.get("started")
                running[str(task.get("id"))] = InFlight(
                    task=_text(task.get("task")),
                    id=_text(task.get("id")),
                    batch=_text(task.get("batch")),
                    model=_text(task.get("model")),
                    chunk=_chunk(task.get("chunk")),
                    worker=hb["node"],
                    state="running",
                    seconds=round(now - started, 1) if isinstance(started, (int, float)) else None,
                )
    in_flight = list(running.values())
    for summary, leased in unacked:
        if summary.get("id") in running:
            continue
        holder = held_by.get(summary["tag"])
        age = round(now - leased, 1) if leased else None
        in_flight.append(
            InFlight(
                task=_text(summary.get("task")),
                id=_text(summary.get("id")),
                batch=_text(summary.get("batch")),
                model=_text(summary.get("model")),
                chunk=_chunk(summary.get("chunk")),
                worker=holder,
                state="held" if holder else "orphaned",
                seconds=age,
                redelivery_in=None
                if holder or age is None
                else max(0.0, round(settings.visibility_timeout - age, 1)),
            )
        )
    status.in_flight = in_flight

    # workers: heartbeats (alive), the stack's record (dead or silent), ping-only nodes
    by_pid = {(hb.get("host"), hb.get("pid")): hb for hb in heartbeats}
    seen_nodes: set[str] = set()
    workers: list[WorkerState] = []
    for name, proc in sorted(procs.items()):
        if not isinstance(proc, dict):
            continue
        if proc.get("service") not in WORKER_SERVICES:
            status.processes[name] = "running" if pid_running(proc.get("pid")) else "dead"
            continue
        beat = by_pid.get((here, proc.get("pid")))
        entry = _worker(beat, now, pinged, running, here) if beat else None
        if entry is None:
            alive = pid_running(proc.get("pid"))
            entry = WorkerState(pid=proc.get("pid"), state="not answering" if alive else "dead")
        entry.name = name
        if entry.metrics is None and proc.get("metrics_port"):
            entry.metrics = f"127.0.0.1:{proc['metrics_port']}"
        entry.restarts = int(proc.get("restarts") or 0)
        entry.last_exit = proc.get("last_exit")
        entry.crash_loop = bool(proc.get("crash_loop"))
        if entry.node:
            seen_nodes.add(entry.node)
        workers.append(entry)
    for hb in heartbeats:
        if hb["node"] not in seen_nodes:
            workers.append(_worker(hb, now, pinged, running, here))
            seen_nodes.add(hb["node"])
    for node in sorted(pinged - seen_nodes):
        workers.append(WorkerState(node=node, state="alive", answers_ping=True))
    status.workers = workers

    if store is not None:
        wanted = dict.fromkeys(f.batch for f in in_flight if f.batch)
        wanted.update(dict.fromkeys(unfinished or []))
        for batch in list(wanted)[:10]:
            with contextlib.suppress(Exception):
                models = sorted({f.model for f in in_flight if f.batch == batch and f.model})
                state = batch_status(store, batch, models or None, detailed=False)
                if state.ingested:
                    status.running_batches.append(state)
    return status


#: Services whose processes are Celery workers (the others: beat, the queue exporter).
WORKER_SERVICES = ("ingest", "encoder", "indexer", "reporter", "trainer")


def _text(value: object) -> str | None:
    return str(value)[:200] if value is not None else None


def _chunk(value: object) -> int | str | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else _text(value)


def _worker(
    hb: dict[str, Any], now: float, pinged: set[str], running: dict[str, InFlight], here: str
) -> WorkerState:
    """A worker from its heartbeat record: dead when its process is gone (on this machine),
    not answering when it missed two beats and the ping, else alive."""
    seen = hb.get("seen")
    age = now - seen if isinstance(seen, (int, float)) else None
    interval = hb.get("renew_interval")
    late = 2 * (interval if isinstance(interval, (int, float)) else 10.0) + 2
    pid = hb.get("pid") if isinstance(hb.get("pid"), int) else None
    answers = hb["node"] in pinged
    state: Literal["alive", "not answering", "dead"] = "alive"
    if hb.get("host") == here and pid is not None and not pid_running(pid):
        state = "dead"
    elif not answers and (age is None or age > late):
        state = "not answering"
    return WorkerState(
        node=hb["node"],
        pid=pid,
        host=_text(hb.get("host")),
        state=state,
        answers_ping=answers,
        heartbeat_age=round(age, 1) if age is not None else None,
        queues=[str(q) for q in hb.get("queues") or []],
        metrics=_text(hb.get("metrics")),
        tasks=[f for f in running.values() if f.worker == hb["node"]],
    )
