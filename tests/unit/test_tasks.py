"""The task wrapper's rules: transient errors retried with backoff, others dead-lettered."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from kiban.context import Context
from kiban.errors import InvalidMessageError, KibanError
from kiban.messages import EncodeChunk, NightlyRun
from kiban.schedule import beat_schedule, nightly_batch
from kiban.settings import Settings
from kiban.tasks import is_transient, run_task
from kiban.worker import resolve

MESSAGE = {"batch_id": "b", "model": "m", "chunk": 0}


def _settings(tmp_path: Path, **kw: object) -> Settings:
    return Settings(home=tmp_path, task_retries=3, retry_backoff_seconds=1.0, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (ConnectionRefusedError(), True),
        (TimeoutError(), True),
        (EndpointConnectionError(endpoint_url="http://x"), True),
        (ClientError({"Error": {"Code": "SlowDown"}, "ResponseMetadata": {}}, "PutObject"), True),
        (ClientError({"Error": {"Code": "NoSuchKey"}, "ResponseMetadata": {}}, "GetObject"), False),
        (KibanError("bad manifest"), False),
        (ValueError("bug"), False),
        (__import__("redis").exceptions.ConnectionError("down"), True),
    ],
)
def test_transient_classification(exc: BaseException, transient: bool) -> None:
    assert is_transient(exc) is transient


def test_transient_errors_are_retried_with_growing_backoff(tmp_path: Path) -> None:
    calls: list[int] = []
    sleeps: list[float] = []

    def flaky(msg: EncodeChunk, ctx: Context) -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionRefusedError("qdrant restarting")
        return "done"

    result = run_task("t", MESSAGE, EncodeChunk, flaky, _settings(tmp_path), sleep=sleeps.append)
    assert result == "done" and len(calls) == 3
    assert len(sleeps) == 2 and 0.8 <= sleeps[0] <= 1.2 and 1.6 <= sleeps[1] <= 2.4
    assert not list((tmp_path / "store").rglob("deadletter/**/*.json"))


def test_lasting_transient_error_is_dead_lettered_after_bounded_retries(tmp_path: Path) -> None:
    def down(msg: EncodeChunk, ctx: Context) -> None:
        raise ConnectionRefusedError("S3 down")

    with pytest.raises(ConnectionRefusedError):
        run_task("t", MESSAGE, EncodeChunk, down, _settings(tmp_path), sleep=lambda s: None)
    (letter,) = (tmp_path / "store").rglob("deadletter/t/*.json")
    record = json.loads(letter.read_text())
    assert record["reason"].startswith("after 3 retries: ConnectionRefusedError")
    assert record["payload"] == MESSAGE


def test_permanent_error_is_not_retried(tmp_path: Path) -> None:
    calls: list[int] = []

    def broken(msg: EncodeChunk, ctx: Context) -> None:
        calls.append(1)
        raise KibanError("model file corrupt")

    with pytest.raises(KibanError):
        run_task("t", MESSAGE, EncodeChunk, broken, _settings(tmp_path), sleep=lambda s: None)
    assert len(calls) == 1
    (letter,) = (tmp_path / "store").rglob("deadletter/t/*.json")
    assert "model file corrupt" in json.loads(letter.read_text())["reason"]


def test_invalid_message_is_dead_lettered_without_running(tmp_path: Path) -> None:
    def never(msg: EncodeChunk, ctx: Context) -> None:
        raise AssertionError("must not run")

    with pytest.raises(InvalidMessageError):
        run_task("t", {"batch_id": "b"}, EncodeChunk, never, _settings(tmp_path))
    (letter,) = (tmp_path / "store").rglob("deadletter/t/*.json")
    assert "model" in json.loads(letter.read_text())["reason"]


def test_dead_letter_reason_is_redacted(tmp_path: Path) -> None:
    def leaky(msg: EncodeChunk, ctx: Context) -> None:
        raise KibanError("cannot reach redis://:hunter2@broker:6379/0")

    with pytest.raises(KibanError):
        run_task("t", MESSAGE, EncodeChunk, leaky, _settings(tmp_path), sleep=lambda s: None)
    (letter,) = (tmp_path / "store").rglob("deadletter/t/*.json")
    assert "hunter2" not in letter.read_text()


def test_nightly_batch_fills_the_date(tmp_path: Path) -> None:
    settings = _settings(
        tmp_path,
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
        nightly_batch(NightlyRun(), _settings(tmp_path))
    entry = beat_schedule(_settings(tmp_path, schedule_cron="30 3 * * 1-5"))["kiban-nightly"]
    assert entry["task"] == "kiban.ingest.nightly"
    assert entry["schedule"].hour == {3} and entry["schedule"].minute == {30}


def test_local_qdrant_makes_the_indexer_the_single_writer(tmp_path: Path) -> None:
    local = _settings(tmp_path)
    assert resolve("indexer", local, None).queues == ("index", "report")
    with pytest.raises(KibanError, match="single|one process"):
        resolve("reporter", local, None)
    server = _settings(tmp_path, qdrant_url="http://qdrant:6333")
    assert resolve("indexer", server, None).queues == ("index",)
    assert resolve("reporter", server, None).queues == ("report",)
    assert resolve("encoder", server, ["encode.gpu"]).queues == ("encode.gpu",)
    with pytest.raises(KibanError, match="unknown service"):
        resolve("mystery", server, None)
