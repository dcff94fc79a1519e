"""Metrics that are right: series from start-up, outcomes of task runs (a failure never counts
as a success), throughput as counters, the queue exporter's rounds, unique node names and the
metrics bind address. The exporter against a real Redis, and everything against a real
Prometheus: tests/integration/test_prometheus.py."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal

import pytest
from prometheus_client import REGISTRY

from kiban import exporter, worker
from kiban.context import Context
from kiban.local_queue import LocalQueue
from kiban.messages import ChunkMessage, task_queues
from kiban.settings import Settings, use_settings
from kiban.tasks import DEAD_LETTER_QUEUE, kiban_task
from kiban.telemetry import (
    OUTCOMES,
    QUEUE_LENGTH,
    init_model_series,
    init_task_series,
    record_encoded,
)
from kiban.transient import TransientError


def value(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


# -- series exist from start-up ---------------------------------------------------------------


def test_task_series_start_at_zero_for_every_outcome() -> None:
    init_task_series([("kiban.test.init", "q-init")])
    for outcome in OUTCOMES:
        assert (
            value("kiban_tasks_total", task="kiban.test.init", queue="q-init", outcome=outcome) == 0
        )
    assert value("kiban_dead_letters_total", task="kiban.test.init") == 0
    assert value("kiban_dead_letters_total", task="(unknown)") is not None  # stray messages
    assert value("kiban_task_retries_total", task="kiban.test.init") == 0
    assert value("kiban_task_failures_total", task="kiban.test.init", reason="invalid_message") == 0
    assert value("kiban_task_duration_seconds_count", task="kiban.test.init") == 0


def test_model_series_start_at_zero_per_provider() -> None:
    init_model_series(["m-init"], ["CUDAExecutionProvider", "CPUExecutionProvider"], encode=True)
    for provider in ("CUDAExecutionProvider", "CPUExecutionProvider"):
        assert value("kiban_images_encoded_total", model="m-init", provider=provider) == 0
        assert value("kiban_encode_seconds_total", model="m-init", provider=provider) == 0
    assert value("kiban_points_upserted_total", model="m-init") is None  # not an indexer
    init_model_series(["m-init"], index=True)
    assert value("kiban_points_upserted_total", model="m-init") == 0


def test_throughput_is_two_counters_not_a_last_chunk_gauge() -> None:
    record_encoded("m-rate", "CPUExecutionProvider", 100, 4.0)
    record_encoded("m-rate", "CPUExecutionProvider", 3, 1.0)  # a short tail chunk
    labels = {"model": "m-rate", "provider": "CPUExecutionProvider"}
    assert value("kiban_images_encoded_total", **labels) == 103
    assert value("kiban_encode_seconds_total", **labels) == 5.0
    assert value("kiban_encode_images_per_second", model="m-rate") is None  # gone


def test_a_worker_initialises_what_it_serves(tmp_path: Path) -> None:
    """The encoder (a pool's queue too), the indexer with the report queue in Qdrant local
    mode, ingest's quarantine reasons, the models of the registry."""
    pytest.importorskip("kiban_encoder.tasks")
    pytest.importorskip("kiban_reporter.tasks")
    pytest.importorskip("kiban_ingest.tasks")
    from kiban.store import open_store

    settings = Settings(home=tmp_path, store_uri=(tmp_path / "store").as_uri())
    store = open_store(settings.resolved_store_uri, create=True)
    store.put("models/init-model/card.json", b"{}")
    store.put("models/init-model/model.onnx", b"")
    assert worker.registry_models(settings) == ["init-model"]

    assert worker.served_tasks(["encode.gpu"]) == [("kiban.encoder.encode_chunk", "encode.gpu")]
    served = worker.served_tasks(["index", "report"])
    assert ("kiban.encoder.index_shard", "index") in served
    assert ("kiban.reporter.evaluate_batch", "report") in served
    assert all(task != "kiban.encoder.encode_chunk" for task, _ in served)

    worker.init_series("encoder", ("encode.gpu",), settings)
    assert (
        value(
            "kiban_tasks_total",
            task="kiban.encoder.encode_chunk",
            queue="encode.gpu",
            outcome="failure",
        )
        is not None
    )
    assert (
        value("kiban_images_encoded_total", model="init-model", provider="CPUExecutionProvider")
        == 0
    )
    assert value("kiban_worker_consuming", service="encoder", queue="encode.gpu") == 0
    worker.init_series("indexer", ("index", "report"), settings)
    assert value("kiban_points_upserted_total", model="init-model") == 0
    assert (
        value(
            "kiban_tasks_total",
            task="kiban.reporter.evaluate_batch",
            queue="report",
            outcome="success",
        )
        is not None  # embedded runs in this process may have counted some
    )
    worker.init_series("ingest", ("ingest",), settings)
    for reason in ("corrupt", "not_image", "other"):  # other tests may have counted some
        assert value("kiban_images_quarantined_total", reason=reason) is not None


def test_registry_models_never_stops_a_worker(tmp_path: Path) -> None:
    settings = Settings(
        home=tmp_path, store_uri="s3://no-such-bucket/x", s3_endpoint_url="http://127.0.0.1:9"
    )
    assert worker.registry_models(settings) == []


# -- outcomes: a failure is never a success -----------------------------------------------------

BEHAVIOUR: list[Callable[[Any], Any]] = []


class OutcomeProbe(ChunkMessage):
    """A test-only message (outside the registry)."""

    task: ClassVar[str] = "kiban.test.outcome_probe"
    queue: ClassVar[str] = "probe-q"
    service: ClassVar[str] = "test"
    kind: Literal["outcome-probe"] = "outcome-probe"


@kiban_task(OutcomeProbe)
def outcome_probe(msg: OutcomeProbe, ctx: Context) -> Any:
    return BEHAVIOUR[0](msg)


MESSAGE = {"batch_id": "b", "model": "m", "chunk": 0}


@pytest.fixture
def queue(tmp_path: Path) -> Iterator[LocalQueue]:
    use_settings(Settings(home=tmp_path, task_retries=2))
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    yield LocalQueue(clock=lambda: now[0], sleep=sleep)
    BEHAVIOUR.clear()
    use_settings(None)


def outcomes() -> dict[str, float]:
    task = OutcomeProbe.task
    return {
        o: value("kiban_tasks_total", task=task, queue="probe-q", outcome=o) or 0 for o in OUTCOMES
    }


def test_outcomes_success_retry_failure(queue: LocalQueue) -> None:
    before = outcomes()
    stamp_before = value("kiban_task_last_success_timestamp_seconds", task=OutcomeProbe.task)

    BEHAVIOUR[:] = [lambda _: "ok"]
    queue.send(OutcomeProbe.task, {"message": MESSAGE}, "probe-q")
    queue.run_until_empty()
    after_success = outcomes()
    assert after_success["success"] == before["success"] + 1
    stamp = value("kiban_task_last_success_timestamp_seconds", task=OutcomeProbe.task)
    assert stamp is not None and stamp != stamp_before

    calls: list[int] = []

    def flaky(_: Any) -> None:
        calls.append(1)
        raise TransientError("S3 is restarting")

    BEHAVIOUR[:] = [flaky]
    queue.send(OutcomeProbe.task, {"message": MESSAGE}, "probe-q")
    queue.run_until_empty()
    after = outcomes()
    assert after["retry"] == after_success["retry"] + 2  # KIBAN_TASK_RETRIES=2, then it fails
    assert after["failure"] == after_success["failure"] + 1
    assert after["success"] == after_success["success"]  # a failed run never counts as success
    assert value("kiban_task_last_success_timestamp_seconds", task=OutcomeProbe.task) == stamp

    queue.send(OutcomeProbe.task, {"message": {"batch_id": "../bad"}}, "probe-q")  # invalid
    queue.run_until_empty()
    assert outcomes()["failure"] == after["failure"] + 1
    assert outcomes()["success"] == after["success"]


# -- the queue exporter -----------------------------------------------------------------------


def test_exporter_watches_every_queue_pools_and_dead_letters(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, encode_pools={"vit": "gpu", "clip": "gpu", "cnn": "cpu"})
    queues = exporter.watched_queues(settings, ["extra"])
    assert set(task_queues().values()) <= set(queues)
    assert {"encode.gpu", "encode.cpu", "deadletter", "extra"} <= set(queues)
    assert len(queues) == len(set(queues))
    assert exporter.DEAD_LETTER_QUEUE == DEAD_LETTER_QUEUE


class FakeSampler:
    def __init__(self) -> None:
        self.answer: tuple[dict[str, int], int] | None = None

    def sample(self) -> tuple[dict[str, int], int]:
        if self.answer is None:
            raise ConnectionError("redis://:secret@broker:6379 refused")
        return self.answer


def test_exporter_keeps_depths_briefly_then_drops_them(caplog: pytest.LogCaptureFixture) -> None:
    now = [1000.0]
    sampler = FakeSampler()
    round_ = exporter.QueueExporter(sampler, clock=lambda: now[0], stale_after=30)
    sampler.answer = ({"fx-encode": 5, "fx-deadletter": 1}, 2)
    assert round_.round()
    assert value("kiban_queue_length", queue="fx-encode") == 5
    assert value("kiban_queue_unacked") == 2
    assert value("kiban_queue_sample_timestamp_seconds") == 1000.0

    sampler.answer = None  # the broker goes away
    now[0] += 10
    assert not round_.round() and not round_.round()
    assert value("kiban_queue_length", queue="fx-encode") == 5  # kept for a while
    assert value("kiban_queue_sample_timestamp_seconds") == 1000.0  # says since when
    assert sum("not answering" in r.message for r in caplog.records) == 1  # logged once
    assert "secret" not in caplog.text
    now[0] += 30
    round_.round()
    assert value("kiban_queue_length", queue="fx-encode") is None  # a gap, not a stale number

    sampler.answer = ({"fx-encode": 0}, 0)
    assert round_.round()
    assert value("kiban_queue_length", queue="fx-encode") == 0
    QUEUE_LENGTH.clear()


# -- node names, the command line, the bind address ------------------------------------------


def test_node_names_are_unique_per_process() -> None:
    assert worker.node_name("encoder") == f"encoder-{os.getpid()}@%h"
    assert worker.node_name("encoder") != worker.node_name("indexer")


def test_exporter_is_a_service_of_the_worker_command_line() -> None:
    assert "exporter" in worker.SERVICES
    args = worker.build_parser().parse_args(
        ["exporter", "--interval", "0.5", "--metrics-port", "9100"]
    )
    assert (args.service, args.interval, args.metrics_port) == ("exporter", 0.5, 9100)
    with pytest.raises(SystemExit):
        worker.build_parser().parse_args(["exporter", "--interval", "0"])


def test_metrics_bind_to_the_configured_host(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls: list[tuple[int, str]] = []
    monkeypatch.setattr(
        "prometheus_client.start_http_server", lambda port, addr: calls.append((port, addr))
    )
    worker._start_metrics(9100, Settings(home=tmp_path).metrics_host)
    worker._start_metrics(9101, "0.0.0.0")  # noqa: S104 - what the chart sets
    worker._start_metrics(0, "0.0.0.0")  # noqa: S104 - port 0: no metrics at all
    assert calls == [(9100, "127.0.0.1"), (9101, "0.0.0.0")]  # noqa: S104
