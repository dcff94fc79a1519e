"""A stray or malformed broker entry never kills a worker (issue 9 §5), on a real
redis-server, SeaweedFS and a real ingest worker process.

Each case of ``CASES`` puts one entry on the ``ingest`` queue — pushed raw onto the Redis list,
or published through kombu/Celery — and expects one dead letter in the store with its reason
(task ``(unknown)`` where the entry names none) while the same worker process keeps running.
Then a normal message is processed by that same process, the worker's log shows neither a
crash, a reconnect, a secret nor a whole payload, and `kiban deadletter` lists and shows the
letters, replays a fixed message through the broker and drains the ``deadletter`` list.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import pickle
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kiban.celery_app import app, configure
from kiban.messages import IngestBatch, RunPlan
from kiban.settings import Settings
from kiban.store import ObjectStore, open_store
from kiban.workflow import dispatch
from kiban_cli.stack import LocalStack
from kiban_cli.synthetic import generate_texture_dataset
from tests.integration.stack_fixtures import running_stack, stack_settings

pytestmark = pytest.mark.integration

LIMIT = 16 * 1024  # KIBAN_MAX_MESSAGE_BYTES of this stack
REDIS_PASSWORD = "stray-redis-pw-91c2"  # noqa: S105 - throwaway test credential
SECRET = "hunter2-in-a-stray"  # noqa: S105 - a "secret" inside a stray entry


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    with running_stack(
        tmp_path_factory.mktemp("stray-stack"),
        [("ingest", "ingest")],
        redis_password=REDIS_PASSWORD,
        extra_env={
            "KIBAN_MAX_MESSAGE_BYTES": str(LIMIT),
            "KIBAN_ALLOWED_ROOTS": str(tmp_path_factory.getbasetemp()),
        },
    ) as stack:
        yield stack


@pytest.fixture(scope="module")
def settings(stack: LocalStack, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    settings = stack_settings(stack, tmp_path_factory.mktemp("stray-client"))
    configure(settings)
    return settings


def _consumers(settings: Settings) -> set[int]:
    """Redis client IDs blocked in BRPOP: the worker's consuming connection."""
    return {int(c["id"]) for c in _redis(settings).client_list() if c.get("cmd") == "brpop"}


def _wait_consumers(settings: Settings, timeout: float = 60) -> set[int]:
    deadline = time.monotonic() + timeout
    while not (found := _consumers(settings)):
        assert time.monotonic() < deadline, "no worker consumes the queue"
        time.sleep(0.2)
    return found


@pytest.fixture(scope="module")
def worker(stack: LocalStack, settings: Settings) -> tuple[int, set[int]]:
    """The ingest worker's PID and broker connection once it consumes: every case must
    leave that process running on that same connection (no crash, no reconnect)."""
    proc = stack.procs["ingest"]
    try:
        connections = _wait_consumers(settings)
    except AssertionError:
        pytest.fail(f"the ingest worker did not start: {proc.log()[-3000:]}")
    assert proc.alive()
    return proc.pid, connections


def _store(settings: Settings) -> ObjectStore:
    return open_store(settings.resolved_store_uri, settings.s3_endpoint_url)


def _redis(settings: Settings) -> Any:
    import redis

    return redis.Redis.from_url(settings.broker_url)


# --- the ways an entry gets onto the queue ------------------------------------------------


def envelope(
    data: bytes, headers: Any, content_type: str = "application/json", **extra: Any
) -> bytes:
    """A Redis list entry as kombu writes one (base64 body, properties, headers)."""
    entry = {
        "body": base64.b64encode(data).decode(),
        "content-encoding": "utf-8",
        "content-type": content_type,
        "headers": headers,
        "properties": {
            "delivery_tag": os.urandom(8).hex(),
            "body_encoding": "base64",
            "delivery_info": {"exchange": "", "routing_key": "ingest"},
            "priority": 0,
        },
        **extra,
    }
    return json.dumps(entry).encode()


def push(entry: bytes) -> Callable[[Settings], bytes]:
    def send(settings: Settings) -> bytes:
        _redis(settings).lpush("ingest", entry)
        return entry

    return send


def publish(body: bytes, content_type: str, headers: dict[str, Any]) -> Callable[[Settings], bytes]:
    """Through kombu, as any producer would: a well-formed envelope around ``body``."""

    def send(settings: Settings) -> bytes:
        with app.connection_for_write() as conn:
            channel = conn.default_channel
            channel.basic_publish(
                channel.prepare_message(
                    body, content_type=content_type, content_encoding="binary", headers=headers
                ),
                exchange="",
                routing_key="ingest",
            )
        return body

    return send


def send_task(message: Any, task: str = "kiban.ingest.batch") -> Callable[[Settings], bytes]:
    def send(settings: Settings) -> bytes:
        app.send_task(task, kwargs={"message": message}, queue="ingest")
        return json.dumps(message).encode()

    return send


def _big(n: int) -> dict[str, Any]:
    return {"batch_id": "big-1", "source": "s3://bucket/" + "x" * n}


TASK = {"task": "kiban.ingest.batch", "id": "stray-0001", "lang": "py"}


@dataclass(frozen=True)
class Case:
    name: str
    send: Callable[[Settings], bytes]
    task: str
    reason: str
    raw_sha256: bool = False  # the letter's sha256 is that of the whole broker entry
    truncated: bool = False


CASES = [
    # (a) a raw non-Celery string
    Case(
        "raw-string",
        push(f"hello, not a message \x1b[31m redis://:{SECRET}@evil/0".encode()),
        "(unknown)",
        "not a kombu message: not JSON",
        raw_sha256=True,
    ),
    Case("raw-bytes", push(b"\xff\xfe\x00binary"), "(unknown)", "not a kombu message: not JSON"),
    # (b) valid JSON that is not a Celery message
    Case(
        "json-object",
        push(b'{"hello": "world"}'),
        "(unknown)",
        "no 'properties' object",
        raw_sha256=True,
    ),
    Case("json-array", push(b"[1, 2, 3]"), "(unknown)", "the entry is an array"),
    Case(
        "json-kombu-type",
        push(b'{"__type__": "datetime", "__value__": "never"}'),
        "(unknown)",
        "not JSON (ValueError",
    ),
    Case(
        "headers-not-object",
        push(envelope(b"[[], {}, {}]", "zz")),
        "(unknown)",
        "headers is a string",
    ),
    Case(
        "task-not-a-string",
        push(envelope(b"[[], {}, {}]", {"task": ["x"], "id": "1"})),
        "(unknown)",
        "headers.task is an array",
    ),
    Case(
        "body-not-base64",
        push(envelope(b"", TASK, body="!!!")),
        "kiban.ingest.batch",
        "the body is not valid base64",
    ),
    Case(
        "no-task-header",
        publish(b"[[], {}, {}]", "application/json", {"id": "x"}),
        "(unknown)",
        "not a Celery task message (no task name)",
    ),
    # (c) a Celery-shaped message whose body is not JSON
    Case(
        "body-not-json",
        publish(b"{not json at all", "application/json", TASK),
        "kiban.ingest.batch",
        "message body does not decode as application/json",
    ),
    # (d) an unknown task name
    Case(
        "unknown-task",
        publish(b"[[], {}, {}]", "application/json", {**TASK, "task": "kiban.nope"}),
        "kiban.nope",
        "unknown task 'kiban.nope': not served by this worker",
    ),
    # (e) content types that are never deserialized
    Case(
        "pickle",
        publish(pickle.dumps(((), {"message": {}}, {})), "application/x-python-serialize", TASK),
        "kiban.ingest.batch",
        "Refusing to deserialize untrusted content of type pickle",
    ),
    Case(
        "yaml",
        publish(b"message: {}", "application/x-yaml", TASK),
        "kiban.ingest.batch",
        "Refusing to deserialize untrusted content of type yaml",
    ),
    # (f) oversize, at each level: the Redis entry, the message body, the task's message
    Case(
        "oversize-entry",
        push(envelope(json.dumps([[], {"message": _big(200_000)}, {}]).encode(), TASK)),
        "kiban.ingest.batch",
        "exceeds KIBAN_MAX_MESSAGE_BYTES",
        raw_sha256=True,
        truncated=True,
    ),
    Case(
        "oversize-body",
        send_task(_big(2 * LIMIT + 8000)),
        "kiban.ingest.batch",
        "exceeds KIBAN_MAX_MESSAGE_BYTES",
        truncated=True,
    ),
    Case(
        "oversize-message",
        send_task(_big(LIMIT + 100)),
        "kiban.ingest.batch",
        f"bytes exceeds KIBAN_MAX_MESSAGE_BYTES ({LIMIT})",
        truncated=True,
    ),
]


def _wait_new_letters(store: ObjectStore, seen: set[str], timeout: float = 30) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        new = [i.key for i in store.list("deadletter") if i.key not in seen]
        if new:
            time.sleep(0.3)  # let a second letter (there must be none) show up too
            new = [i.key for i in store.list("deadletter") if i.key not in seen]
            return [json.loads(store.get(key)) for key in new]
        assert time.monotonic() < deadline, "no dead letter was written"
        time.sleep(0.2)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_stray_entry_is_dead_lettered_and_the_worker_goes_on(
    stack: LocalStack, settings: Settings, worker: tuple[int, set[int]], case: Case
) -> None:
    store = _store(settings)
    seen = {i.key for i in store.list("deadletter")}
    sent = case.send(settings)
    (letter,) = _wait_new_letters(store, seen)
    assert letter["task"] == case.task
    assert case.reason in letter["reason"], letter["reason"]
    assert letter["payload_truncated"] is case.truncated
    assert len(json.dumps(letter["payload"]).encode()) < 3 * 16 * 1024
    if case.raw_sha256:
        assert letter["payload_sha256"] == hashlib.sha256(sent).hexdigest()
        assert letter["payload_bytes"] == len(sent)
    proc = stack.procs["ingest"]
    assert proc.alive() and proc.pid == worker[0], proc.log()[-3000:]


def test_the_same_worker_still_serves_and_logged_nothing_it_should_not(
    stack: LocalStack, settings: Settings, worker: tuple[int, set[int]], tmp_path: Path
) -> None:
    images = tmp_path / "images"
    generate_texture_dataset(images, n_classes=2, per_class=2, size=32)
    dispatch(
        IngestBatch(
            batch_id="after-strays",
            source=images.as_uri(),
            plan=RunPlan(models=[], evaluate=False),
        ),
        settings,
    )
    store = _store(settings)
    proc = stack.procs["ingest"]
    deadline = time.monotonic() + 60
    while not store.exists("batches/after-strays/batch.json"):
        assert time.monotonic() < deadline, proc.log()[-3000:]
        time.sleep(0.2)
    # the same process, consuming on the same broker connection it started with
    assert proc.alive() and proc.pid == worker[0]
    assert _wait_consumers(settings) <= worker[1]
    log = proc.log()
    assert "Unrecoverable error" not in log
    assert "Connection to broker lost" not in log
    assert SECRET not in log and REDIS_PASSWORD not in log
    assert "x" * 1000 not in log  # no payload echoed whole
    assert "\x1b[31m" not in log
    assert log.count("stray broker entry on ") >= len([c for c in CASES if c.task == "(unknown)"])


def test_kiban_deadletter_lists_and_drains_in_distributed_mode(
    stack: LocalStack, settings: Settings, tmp_path: Path
) -> None:
    env = {**os.environ, **stack.env, "KIBAN_HOME": str(tmp_path)}

    def kiban(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "kiban_cli.main", "deadletter", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )

    listed = kiban("list", "--task", "(unknown)")
    assert listed.returncode == 0, listed.stderr
    unknown = [c for c in CASES if c.task == "(unknown)"]
    assert listed.stdout.splitlines()[0].startswith(f"{len(unknown)} dead letters in s3://")
    assert "\x1b" not in listed.stdout and SECRET not in listed.stdout
    rows = json.loads(kiban("list", "--json", "--task", "(unknown)").stdout)
    shown = kiban("show", rows[-1]["id"])  # the oldest: the first case, a raw string
    assert shown.returncode == 0, shown.stderr
    assert "hello, not a message \\x1b[31m redis://:***@evil/0" in shown.stdout
    assert "payload sha256: " in shown.stdout and "\x1b" not in shown.stdout
    assert SECRET not in shown.stdout  # the payload is shown with credentials masked
    # replay after a fix, through the broker: the same worker ingests the message
    store = _store(settings)
    source = tmp_path / "late-night"
    seen = {i.key for i in store.list("deadletter")}
    dispatch(IngestBatch(batch_id="late-1", source=source.as_uri()), settings)
    (failed,) = _wait_new_letters(store, seen)
    assert "no such directory" in failed["reason"] and not failed["payload_truncated"]
    generate_texture_dataset(source, n_classes=2, per_class=2, size=32)
    replayed = kiban("replay", failed["id"])
    assert replayed.returncode == 0, replayed.stderr
    assert "queued" in replayed.stdout
    deadline = time.monotonic() + 60
    while not store.exists("batches/late-1/batch.json"):
        assert time.monotonic() < deadline, "the replayed message was not processed"
        time.sleep(0.2)
    assert "(replayed)" in kiban("list", "--batch", "late-1").stdout
    client = _redis(settings)
    assert client.llen("deadletter") >= len(CASES) + 1
    purged = kiban("purge", "--all")
    assert purged.returncode == 0, purged.stderr
    assert "from the deadletter queue" in purged.stdout
    assert client.llen("deadletter") == 0
    assert not list(_store(settings).list("deadletter"))
