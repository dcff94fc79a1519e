"""The task rules, run through the embedded queue with real Celery task objects: transient
errors retried by Celery with backoff, others dead-lettered once, FIFO without nesting."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal

import pytest

from kiban.context import Context
from kiban.errors import KibanError
from kiban.local_queue import LocalQueue
from kiban.messages import ChunkMessage, NightlyRun
from kiban.schedule import beat_schedule, nightly_batch
from kiban.settings import Settings, use_settings
from kiban.tasks import kiban_task
from kiban.transient import TransientError
from kiban.worker import resolve

MESSAGE = {"batch_id": "b", "model": "m", "chunk": 0}

# What the probe task does on each call; tests replace it.
BEHAVIOUR: list[Callable[[Any], Any]] = []
EVENTS: list[str] = []


class Probe(ChunkMessage):
    """A test-only message (not part of the registry: it is defined outside kiban.messages)."""

    task: ClassVar[str] = "kiban.test.probe"
    queue: ClassVar[str] = "test"
    service: ClassVar[str] = "test"
    kind: Literal["probe"] = "probe"


@kiban_task(Probe)
def probe(msg: Probe, ctx: Context) -> Any:
    return BEHAVIOUR[0](msg)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


@pytest.fixture
def queue(tmp_path: Path) -> Iterator[tuple[LocalQueue, FakeClock]]:
    use_settings(Settings(home=tmp_path, task_retries=3))  # type: ignore[call-arg]
    clock = FakeClock()
    BEHAVIOUR.clear()
    EVENTS.clear()
    yield LocalQueue(clock=clock, sleep=clock.sleep), clock


def _letters(tmp_path: Path, task: str = "kiban.test.probe") -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in (tmp_path / "store").rglob(f"deadletter/{task}/*")]


def test_transient_errors_are_retried_by_celery_with_growing_backoff(queue, tmp_path) -> None:
    q, clock = queue
    calls: list[int] = []

    def flaky(msg: Probe) -> str:
        calls.append(1)
        if len(calls) < 3:
            raise TransientError.from_cause("Qdrant", ConnectionRefusedError("restarting"))
        return "done"

    BEHAVIOUR.append(flaky)
    q.send(Probe.task, {"message": MESSAGE}, "test")
    assert q.run_until_empty() == 3 and len(calls) == 3
    # full jitter: the n-th retry waits a whole number of seconds in [0, 1 x 2^n]
    assert len(clock.slept) <= 2 and all(0 <= s <= 2 for s in clock.slept)
    assert clock.now <= 1 + 2
    assert not _letters(tmp_path)


def test_lasting_transient_error_is_dead_lettered_after_bounded_retries(queue, tmp_path) -> None:
    q, _ = queue
    calls: list[int] = []

    def down(msg: Probe) -> None:
        calls.append(1)
        raise TransientError.from_cause("S3", ConnectionRefusedError("S3 down"))

    BEHAVIOUR.append(down)
    q.send(Probe.task, {"message": MESSAGE}, "test")
    q.run_until_empty()
    assert len(calls) == 4  # the first attempt and KIBAN_TASK_RETRIES=3 retries
    (letter,) = _letters(tmp_path)
    assert letter["reason"].startswith("after 3 retries: ConnectionRefusedError: S3 down")
    assert letter["payload"] == MESSAGE


def test_permanent_error_is_not_retried(queue, tmp_path) -> None:
    q, clock = queue
    calls: list[int] = []

    def broken(msg: Probe) -> None:
        calls.append(1)
        raise KibanError("model file corrupt")

    BEHAVIOUR.append(broken)
    q.send(Probe.task, {"message": MESSAGE}, "test")
    q.run_until_empty()
    assert len(calls) == 1 and clock.slept == []
    (letter,) = _letters(tmp_path)
    assert "model file corrupt" in letter["reason"]


def test_a_chunk_failure_is_recorded_for_the_report(queue, tmp_path) -> None:
    from kiban.progress import read_failures
    from kiban.store import open_store

    q, _ = queue
    BEHAVIOUR.append(lambda msg: (_ for _ in ()).throw(ValueError("bad chunk")))
    q.send(Probe.task, {"message": MESSAGE}, "test")
    q.run_until_empty()
    (failure,) = read_failures(open_store((tmp_path / "store").as_uri()), "b")
    assert (failure.model, failure.chunk, failure.task) == ("m", 0, "kiban.test.probe")
    assert failure.reason == "ValueError: bad chunk"


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"message": {"batch_id": "b"}}, "model: Field required"),
        ({"message": {**MESSAGE, "chunk": -1}}, "chunk: Input should be greater"),
        ({"msg": MESSAGE}, "exactly one keyword argument 'message'"),
        ({"message": "not an object"}, "invalid Probe message"),
    ],
)
def test_invalid_message_is_dead_lettered_without_running(queue, tmp_path, kwargs, reason) -> None:
    q, _ = queue
    BEHAVIOUR.append(lambda msg: pytest.fail("must not run"))
    q.send(Probe.task, kwargs, "test")
    q.run_until_empty()
    (letter,) = _letters(tmp_path)
    assert reason in letter["reason"]


def test_dead_letter_reason_is_redacted(queue, tmp_path) -> None:
    q, _ = queue

    def leaky(msg: Probe) -> None:
        raise KibanError("cannot reach redis://:hunter2@broker:6379/0")

    BEHAVIOUR.append(leaky)
    q.send(Probe.task, {"message": MESSAGE}, "test")
    q.run_until_empty()
    (path,) = (tmp_path / "store").rglob("deadletter/kiban.test.probe/*")
    assert "hunter2" not in path.read_text()


def test_fifo_one_task_at_a_time_and_retries_wait_in_the_queue(queue) -> None:
    """A task's follow-up messages run after it has finished, in the order sent; a retry
    waits its backoff in the queue while the others run (no nesting, no blocking)."""
    q, _ = queue
    attempts: dict[int, int] = {}

    def work(msg: Probe) -> None:
        EVENTS.append(f"start {msg.chunk}")
        attempts[msg.chunk] = attempts.get(msg.chunk, 0) + 1
        if msg.chunk == 0:
            for chunk in (1, 2, 3):
                q.send(Probe.task, {"message": {**MESSAGE, "chunk": chunk}}, "test")
            q.run_until_empty()  # re-entrant: returns at once, the outer loop runs them
        if msg.chunk == 1 and attempts[1] == 1:
            EVENTS.append("end 1 (transient)")
            raise TransientError.from_cause("S3", TimeoutError("slow"))
        EVENTS.append(f"end {msg.chunk}")

    BEHAVIOUR.append(work)
    q.send(Probe.task, {"message": MESSAGE}, "test")
    assert q.run_until_empty() == 5
    assert EVENTS[:7] == [
        "start 0",
        "end 0",
        "start 1",
        "end 1 (transient)",
        "start 2",
        "end 2",
        "start 3",
    ]
    assert EVENTS[-2:] == ["start 1", "end 1"]


def test_registry_drives_routing_and_worker_queues(tmp_path: Path) -> None:
    from kiban.messages import EncodeChunk, registry, service_queues, task_queues

    kinds = registry()
    assert "probe" not in kinds  # a test's message is not part of the contract
    assert task_queues()["kiban.encoder.encode_chunk"] == "encode"
    assert service_queues("indexer") == ("index",)
    pooled = Settings(home=tmp_path, encode_pools={"vit": "gpu"})  # type: ignore[call-arg]
    assert EncodeChunk(batch_id="b", model="vit", chunk=0).route(pooled) == "encode.gpu"
    assert EncodeChunk(batch_id="b", model="cnn", chunk=0).route(pooled) == "encode"


def test_nightly_batch_fills_the_date(tmp_path: Path) -> None:
    settings = Settings(  # type: ignore[call-arg]
        home=tmp_path,
        schedule_source="s3://img/in/{date}/",
        schedule_models=["a", "b"],
        schedule_manifest="s3://img/in/{date}/m.csv",
    )
    batch = nightly_batch(NightlyRun(date="2026-11-28"), settings)
    assert batch.batch_id == "nightly-2026-11-28"
    assert batch.source == "s3://img/in/2026-11-28/"
    assert batch.manifest == "s3://img/in/2026-11-28/m.csv"
    assert batch.plan.models == ["a", "b"]
    with pytest.raises(KibanError, match="KIBAN_SCHEDULE_SOURCE"):
        nightly_batch(NightlyRun(), Settings(home=tmp_path))  # type: ignore[call-arg]
    cron = Settings(home=tmp_path, schedule_cron="30 3 * * 1-5")  # type: ignore[call-arg]
    entry = beat_schedule(cron)["kiban-nightly"]
    assert entry["task"] == "kiban.ingest.nightly"
    assert entry["schedule"].hour == {3} and entry["schedule"].minute == {30}


def test_local_qdrant_makes_the_indexer_the_single_writer(tmp_path: Path) -> None:
    local = Settings(home=tmp_path)  # type: ignore[call-arg]
    assert resolve("indexer", local, None).queues == ("index", "report")
    with pytest.raises(KibanError, match="single|one process"):
        resolve("reporter", local, None)
    server = Settings(home=tmp_path, qdrant_url="http://qdrant:6333")  # type: ignore[call-arg]
    assert resolve("indexer", server, None).queues == ("index",)
    assert resolve("reporter", server, None).queues == ("report",)
    assert resolve("encoder", server, ["encode.gpu"]).queues == ("encode.gpu",)
    with pytest.raises(KibanError, match="unknown service"):
        resolve("mystery", server, None)
