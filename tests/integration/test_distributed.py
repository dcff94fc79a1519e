"""The distributed stack with real processes: redis-server, SeaweedFS, one Celery worker per
service. Faults are real too: SIGKILL of an encoder mid-chunk, a broker restart mid-batch,
bad and pickled messages, a re-sent trigger, secrets in the environment."""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest

from kiban.celery_app import app, configure
from kiban.messages import IngestBatch, RunPlan
from kiban.pipeline import run_batch
from kiban.settings import Settings, use_settings
from kiban.status import batch_status
from kiban.store import open_store
from kiban.workflow import dispatch
from kiban_cli.stack import LocalStack
from kiban_cli.synthetic import generate_texture_dataset
from tests.integration.stack_fixtures import running_stack, stack_settings

pytestmark = pytest.mark.integration

REDIS_PASSWORD = "redis-pw-7f3a9c"  # noqa: S105 - throwaway test credential
QDRANT_KEY = "qdrant-key-51be0d"


_settings = stack_settings


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    home = tmp_path_factory.mktemp("stack")
    nights = tmp_path_factory.mktemp("nights")
    today = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    generate_texture_dataset(nights / today, n_classes=3, per_class=6, size=64)
    with running_stack(
        home,
        [
            ("ingest", "ingest"),
            ("encoder", "encoder-0"),
            ("encoder", "encoder-1"),
            ("indexer", "indexer"),
        ],
        redis_password=REDIS_PASSWORD,
        extra_env={
            "KIBAN_VISIBILITY_TIMEOUT": "8",  # killed workers' tasks come back quickly
            "KIBAN_CHUNK_SIZE": "12",
            "KIBAN_QDRANT_API_KEY": QDRANT_KEY,  # unused in local mode; must never leak
            "KIBAN_TASK_RETRIES": "8",
            "KIBAN_RETRY_BACKOFF_SECONDS": "1",
            "KIBAN_THREADS": "1",
            # the nightly schedule, every minute for the test
            "KIBAN_SCHEDULE_CRON": "* * * * *",
            "KIBAN_SCHEDULE_SOURCE": f"{nights.as_uri()}/{{date}}/",
            "KIBAN_SCHEDULE_MANIFEST": f"{nights.as_uri()}/{{date}}/manifest.csv",
            "KIBAN_SCHEDULE_MODELS": "effnet-lite0",
            # file:// sources in messages only under the tests' temp root (issue 9 §3)
            "KIBAN_ALLOWED_ROOTS": str(tmp_path_factory.getbasetemp()),
        },
    ) as stack:
        yield stack


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("images")
    generate_texture_dataset(root, n_classes=4, per_class=12, size=96, groups_per_class=4)
    return root


@pytest.fixture(scope="module")
def client_settings(stack: LocalStack, tmp_path_factory: pytest.TempPathFactory, exported_models):
    settings = _settings(stack, tmp_path_factory.mktemp("client"))
    from kiban.models.registry import publish

    store = open_store(settings.resolved_store_uri, settings.s3_endpoint_url, create=True)
    for card, path in exported_models.values():
        publish(store, card, path)  # type: ignore[arg-type]
    return settings


MODELS = ["effnet-lite0", "vit-s-32-random"]


def _metrics(report: dict) -> dict[str, list]:
    return {
        m["name"]: [
            (x["k"], x["mv_accuracy"]["value"], x["mv_macro_f1"]["value"], x["map_at_k"]["value"])
            for x in m["retrieval"]["metrics"]
        ]
        for m in report["models"]
    }


@pytest.fixture(scope="module")
def embedded_reference(images: Path, tmp_path_factory: pytest.TempPathFactory, exported_models):
    """The same batch on the embedded default: what every distributed run must reproduce."""
    from kiban.models.registry import publish

    home = tmp_path_factory.mktemp("embedded")
    settings = Settings(  # explicit: the stack's KIBAN_* variables are in this environment
        home=home,
        mode="embedded",
        chunk_size=12,
        store_uri=(home / "store").as_uri(),
        s3_endpoint_url=None,
        qdrant_path=home / "qdrant",
    )
    store = open_store(settings.resolved_store_uri, create=True)
    for card, path in exported_models.values():
        publish(store, card, path)  # type: ignore[arg-type]
    report = run_batch(
        settings,
        images.as_uri(),
        MODELS,
        manifest=(images / "manifest.csv").as_uri(),
        batch_id="ref",
    )
    use_settings(None)
    return _metrics(report)


def _wait_status(settings: Settings, batch: str, done, timeout: float = 240) -> object:
    store = open_store(settings.resolved_store_uri, settings.s3_endpoint_url)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = batch_status(store, batch, MODELS)
        if done(state):
            return state
        time.sleep(0.5)
    raise AssertionError(f"batch {batch} not done in {timeout}s: {state}")


def test_distributed_run_matches_embedded(
    stack: LocalStack, client_settings: Settings, images: Path, embedded_reference
) -> None:
    report = run_batch(
        client_settings,
        images.as_uri(),
        MODELS,
        manifest=(images / "manifest.csv").as_uri(),
        batch_id="dist-1",
        timeout=300,
    )
    assert _metrics(report) == embedded_reference
    assert report["batch"]["n_accepted"] == 48


def _chunk_tasks(log: str, state: str) -> set[str]:
    return set(re.findall(r"encode_chunk\[([0-9a-f-]+)\] " + state, log))


def test_sigkill_encoder_mid_batch_loses_and_doubles_nothing(
    stack: LocalStack, client_settings: Settings, images: Path, embedded_reference
) -> None:
    configure(client_settings)
    for attempt in range(3):  # the kill must land while a chunk is being encoded
        victim = stack.procs["encoder-0"]
        mark = len(victim.log())
        batch = f"kill-{attempt}"
        dispatch(
            IngestBatch(
                batch_id=batch,
                source=images.as_uri(),
                manifest=(images / "manifest.csv").as_uri(),
                chunk_size=48,
                plan=RunPlan(models=MODELS),
            ),
            client_settings,
        )
        deadline = time.monotonic() + 120
        while not _chunk_tasks(victim.log()[mark:], "received"):
            assert time.monotonic() < deadline, "encoder-0 never received a chunk"
            time.sleep(0.01)
        victim.kill()  # SIGKILL to the whole process group, mid-task
        log = victim.log()[mark:]
        orphans = _chunk_tasks(log, "received") - _chunk_tasks(log, "succeeded")
        state = _wait_status(
            client_settings,
            batch,
            lambda s: s.report_versions and all(m.indexed == m.chunks for m in s.models),
            timeout=300,
        )
        stack.start_worker("encoder", "encoder-0")  # leave the stack as we found it
        if orphans:
            break
    else:
        pytest.fail("could not kill encoder-0 in the middle of a chunk in 3 tries")
    # the killed worker's unacknowledged chunk was re-delivered and done by the other one
    assert orphans <= _chunk_tasks(stack.procs["encoder-1"].log(), "succeeded")
    assert all(m.images_encoded == 48 for m in state.models)
    store = open_store(client_settings.resolved_store_uri, client_settings.s3_endpoint_url)
    report = json.loads(store.get(f"reports/{batch}/{state.latest_report}/report.json"))
    assert _metrics(report) == embedded_reference
    assert state.report_versions == ["0001"]  # evaluated exactly once


def test_broker_restart_mid_batch(
    stack: LocalStack, client_settings: Settings, images: Path, embedded_reference
) -> None:
    configure(client_settings)
    dispatch(
        IngestBatch(
            batch_id="redis-1",
            source=images.as_uri(),
            manifest=(images / "manifest.csv").as_uri(),
            chunk_size=12,
            plan=RunPlan(models=MODELS),
        ),
        client_settings,
    )
    _wait_status(client_settings, "redis-1", lambda s: any(m.encoded for m in s.models), 120)
    stack.restart_redis(down_seconds=3)
    state = _wait_status(
        client_settings,
        "redis-1",
        lambda s: s.report_versions and all(m.indexed == m.chunks for m in s.models),
        timeout=300,
    )
    store = open_store(client_settings.resolved_store_uri, client_settings.s3_endpoint_url)
    report = json.loads(store.get(f"reports/redis-1/{state.latest_report}/report.json"))
    assert _metrics(report) == embedded_reference
    # an ack lost to the reconnect is expected and recovered: a warning, never CRITICAL
    for name in ("ingest", "encoder-0", "encoder-1", "indexer"):
        assert " CRITICAL " not in stack.procs[name].log(), name


def test_same_trigger_twice_adds_no_work(
    stack: LocalStack, client_settings: Settings, images: Path
) -> None:
    message = IngestBatch(
        batch_id="twice-1",
        source=images.as_uri(),
        manifest=(images / "manifest.csv").as_uri(),
        chunk_size=12,
        plan=RunPlan(models=MODELS),
    )
    configure(client_settings)
    dispatch(message, client_settings)
    dispatch(message, client_settings)
    state = _wait_status(
        client_settings,
        "twice-1",
        lambda s: s.report_versions and all(m.indexed == m.chunks for m in s.models),
        300,
    )
    time.sleep(3)  # let the duplicate chain finish too
    state = batch_status(
        open_store(client_settings.resolved_store_uri, client_settings.s3_endpoint_url),
        "twice-1",
        MODELS,
    )
    assert state.report_versions == ["0001"]
    assert all(m.encoded == m.chunks == 4 and m.images_encoded == 48 for m in state.models)


def test_bad_and_failing_messages_are_dead_lettered(
    stack: LocalStack, client_settings: Settings, tmp_path: Path
) -> None:
    configure(client_settings)
    store = open_store(client_settings.resolved_store_uri, client_settings.s3_endpoint_url)
    before = sum(1 for _ in store.list("deadletter"))
    # invalid schema, an unknown argument, a task that fails for good, and pickle
    app.send_task(
        "kiban.ingest.batch", kwargs={"message": {"batch_id": "../x", "source": ""}}, queue="ingest"
    )
    app.send_task("kiban.ingest.batch", kwargs={"msg": {}}, queue="ingest")
    app.send_task(
        "kiban.ingest.batch",
        kwargs={"message": {"batch_id": "missing-1", "source": (tmp_path / "nope").as_uri()}},
        queue="ingest",
    )
    app.send_task(  # a host folder outside KIBAN_ALLOWED_ROOTS: never listed
        "kiban.ingest.batch",
        kwargs={"message": {"batch_id": "outside-1", "source": "file:///etc/"}},
        queue="ingest",
    )
    with app.connection_for_write() as conn:
        conn.default_channel.basic_publish(
            conn.default_channel.prepare_message(
                pickle.dumps(
                    ((), {"message": {"batch_id": "pickled-1", "source": "file:///"}}, {})
                ),
                content_type="application/x-python-serialize",
                content_encoding="binary",
                headers={"task": "kiban.ingest.batch", "id": "pickle-test-1", "lang": "py"},
            ),
            exchange="",
            routing_key="ingest",
        )
    deadline = time.monotonic() + 60
    while sum(1 for _ in store.list("deadletter")) < before + 4:
        assert time.monotonic() < deadline, "dead letters not written"
        time.sleep(0.3)
    letters = [json.loads(store.get(i.key)) for i in store.list("deadletter")]
    reasons = " | ".join(letter["reason"] for letter in letters)
    assert "invalid IngestBatch message: batch_id: String should match pattern" in reasons
    assert "exactly one keyword argument 'message'" in reasons
    assert "missing-1" in json.dumps([letter["payload"] for letter in letters])
    assert "ForbiddenLocationError: source file:///etc/" in reasons
    assert "outside KIBAN_ALLOWED_ROOTS" in reasons
    assert not store.exists("batches/outside-1/batch.json")
    time.sleep(1)
    assert "Refusing to deserialize untrusted content of type pickle" in stack.procs["ingest"].log()
    assert not store.exists("batches/pickled-1/batch.json")
    out = subprocess.run(
        [sys.executable, "-m", "kiban_cli.main", "status"],
        capture_output=True,
        text=True,
        env={**os.environ, **stack.env, "KIBAN_HOME": str(tmp_path)},
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "dead letters:" in out.stdout


def test_run_reports_a_failed_batch_instead_of_waiting(
    stack: LocalStack, client_settings: Settings, tmp_path: Path
) -> None:
    """A distributed `kiban run` whose ingest is dead-lettered fails at once with the reason."""
    from kiban.errors import KibanError

    started = time.monotonic()
    with pytest.raises(KibanError, match="dead-lettered kiban.ingest.batch: .*no such directory"):
        run_batch(
            client_settings,
            (tmp_path / "missing").as_uri(),
            MODELS,
            batch_id="gone-1",
            timeout=120,
        )
    assert time.monotonic() - started < 60


def test_chunk_failure_ends_as_in_embedded_mode(
    stack: LocalStack, client_settings: Settings, images: Path
) -> None:
    """The same scenario as tests/integration/test_chunk_failure.py, on real workers: one
    dead letter, the other chunks encoded and indexed, the report states the failure."""
    from tests.integration.chunk_failure import check_outcome, run_with_failing_chunk

    use_settings(client_settings)
    configure(client_settings)
    outcome = run_with_failing_chunk(
        client_settings, images.as_uri(), (images / "manifest.csv").as_uri(), "fail-dist"
    )
    check_outcome(outcome)


def test_zz_no_secret_in_logs_status_or_reports(
    stack: LocalStack, client_settings: Settings, tmp_path: Path
) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "kiban_cli.main", "status", "dist-1"],
        capture_output=True,
        text=True,
        env={**os.environ, **stack.env, "KIBAN_HOME": str(tmp_path)},
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    secret_s3 = stack.env["AWS_SECRET_ACCESS_KEY"]
    texts = {name: proc.log() for name, proc in stack.procs.items() if name != "seaweedfs"}
    texts["status"] = out.stdout + out.stderr
    store = open_store(client_settings.resolved_store_uri, client_settings.s3_endpoint_url)
    for info in store.list("reports"):
        texts[info.key] = store.get(info.key).decode()
    for info in store.list("deadletter"):
        texts[info.key] = store.get(info.key).decode()
    assert "Connected to redis://:***@" in texts["ingest"]  # the broker URL is logged, masked
    for name, text in texts.items():
        for secret in (REDIS_PASSWORD, QDRANT_KEY, secret_s3):
            assert secret not in text, f"secret leaked in {name}"


def test_beat_runs_the_nightly_batch(stack: LocalStack, client_settings: Settings) -> None:
    """Celery beat with a cron schedule ingests and evaluates the night's prefix by itself."""
    stack.start_worker("beat")
    today = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    store = open_store(client_settings.resolved_store_uri, client_settings.s3_endpoint_url)
    deadline = time.monotonic() + 150  # the next minute boundary, then the batch itself
    while not batch_status(store, f"nightly-{today}", ["effnet-lite0"]).report_versions:
        assert stack.procs["beat"].alive(), stack.procs["beat"].log()[-2000:]
        assert time.monotonic() < deadline, (
            "no nightly report: " + stack.procs["beat"].log()[-2000:]
        )
        time.sleep(1)
    state = batch_status(store, f"nightly-{today}", ["effnet-lite0"])
    assert state.n_accepted == 18
    stack.procs["beat"].stop()


def test_zy_every_image_is_one_point_per_model(stack: LocalStack, client_settings) -> None:
    """After all the runs above (kills, restarts, duplicates) each of the 48 distinct images
    is exactly one point per model. Local Qdrant allows one process: stop the indexer."""
    from kiban.vectors import VectorIndex

    stack.procs["indexer"].stop()
    index = VectorIndex(client_settings)
    try:
        assert index.count("vit-s-32-random") == 48
        assert index.count("effnet-lite0") == 48 + 18  # plus the nightly batch's images
    finally:
        index.close()
        stack.start_worker("indexer")
