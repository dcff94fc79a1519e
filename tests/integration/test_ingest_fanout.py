"""Ingest fanned out over two real Celery ingest workers (real redis-server, SeaweedFS store)
plus an encoder: pages of 7 entries validated by whichever worker takes them, the reducer
de-duplicating in key order and sending chunks to the encoder while later pages are still
validated. The outputs must equal an embedded run of the same source byte for byte (except
``created_at``) — also when an ingest worker is SIGKILLed in the middle of a page."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kiban.celery_app import configure
from kiban.context import Context
from kiban.messages import IngestBatch, RunPlan
from kiban.records import batch_prefix
from kiban.settings import Settings
from kiban.shards import read_meta
from kiban.store import ObjectStore, open_store
from kiban.workflow import dispatch
from kiban_cli.stack import LocalStack
from kiban_cli.synthetic import encode, generate_texture_dataset, problem_files, sample_images
from kiban_ingest.ingest import ingest_batch
from kiban_ingest.run_files import validated_key
from tests.integration.stack_fixtures import running_stack, stack_settings

pytestmark = pytest.mark.integration

PAGE_SIZE = 7
CHUNK_SIZE = 10
MODEL = "effnet-lite0"


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fanout-source")
    generate_texture_dataset(root, n_classes=3, per_class=14, size=192, seed=4)
    planted_in = sorted(p for p in root.iterdir() if p.is_dir())[0]
    for planted in problem_files():
        (planted_in / planted.name).write_bytes(planted.data)
    copy = sample_images(1, seed=9)[0]
    (root / "a.png").write_bytes(encode(copy, ".png"))  # "a.png" < "a/…" < "a0…"
    (root / "zz" / "late-copy.png").parent.mkdir()
    (root / "zz" / "late-copy.png").write_bytes(encode(copy, ".png"))  # a duplicate pages later
    return root


@pytest.fixture(scope="module")
def heavy_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """512-px PNGs (a full decode each), so that a page takes long enough to be killed in."""
    root = tmp_path_factory.mktemp("heavy-source")
    for n, image in enumerate(sample_images(42, seed=11)):
        path = root / f"class-{n % 3}" / f"{n:03d}.png"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(encode(image.resize((512, 512)), ".png"))
    (root / "class-2" / "zz-copy.png").write_bytes((root / "class-0" / "000.png").read_bytes())
    return root


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    with running_stack(
        tmp_path_factory.mktemp("stack"),
        [("ingest", "ingest-0"), ("ingest", "ingest-1"), ("encoder", "encoder")],
        extra_env={
            "KIBAN_THREADS": "1",
            "KIBAN_ALLOWED_ROOTS": str(tmp_path_factory.getbasetemp()),
            "KIBAN_INGEST_PAGE_SIZE": str(PAGE_SIZE),
            "KIBAN_INGEST_PAGE_WAIT": "5",
            "KIBAN_VISIBILITY_TIMEOUT": "10",
            "KIBAN_DECODE_WORKERS": "1",
        },
    ) as stack:
        yield stack


def outputs(store: ObjectStore, batch_id: str) -> dict[str, bytes]:
    prefix = batch_prefix(batch_id)
    files = {n: store.get(f"{prefix}/{n}") for n in ("records.jsonl", "quarantine.jsonl")}
    info = json.loads(store.get(f"{prefix}/batch.json"))
    info.pop("created_at")
    info.pop("batch_id")
    files["batch.json"] = json.dumps(info, sort_keys=True).encode()
    for plan in info["chunks"]:
        files[f"chunk-{plan['index']}"] = store.get(
            f"{prefix}/chunks/chunk-{plan['index']:05d}.jsonl"
        )
    return files


def wait_for_batch(store: ObjectStore, batch_id: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not store.exists(f"{batch_prefix(batch_id)}/batch.json"):
        assert time.monotonic() < deadline, f"batch {batch_id} not ingested in {timeout:.0f}s"
        time.sleep(0.1)


def _claimed_page(
    broker_url: str, store: ObjectStore, batch: str, pid: int, deadline: float
) -> int | None:
    """A page of ``batch`` the worker process ``pid`` has claimed and not validated yet."""
    import redis

    client = redis.Redis.from_url(broker_url)
    while time.monotonic() < deadline:
        for key in client.scan_iter(f"kiban:ingest:{batch}:*"):
            holder = (client.get(key) or b"").decode()
            page = int(key.decode().rsplit(":", 1)[1])
            if holder.endswith(f"-{pid}-{page}") and not store.exists(validated_key(batch, page)):
                return page
        if store.exists(f"{batch_prefix(batch)}/batch.json"):
            return None
        time.sleep(0.005)
    return None


def test_two_ingest_workers_give_the_embedded_outputs_even_when_one_is_killed(
    stack: LocalStack,
    source: Path,
    heavy_source: Path,
    tmp_path_factory: pytest.TempPathFactory,
    exported_models,  # type: ignore[no-untyped-def]
) -> None:
    from kiban.models.registry import publish

    embedded = Context.from_settings(Settings(home=tmp_path_factory.mktemp("embedded")))
    msg = IngestBatch(batch_id="x", source=source.as_uri(), chunk_size=CHUNK_SIZE)
    ingest_batch(msg, embedded)
    expected = outputs(embedded.store, "x")
    n_chunks = len(json.loads(expected["batch.json"])["chunks"])
    assert n_chunks >= 4

    settings = stack_settings(stack, tmp_path_factory.mktemp("client"))
    store = open_store(settings.resolved_store_uri, settings.s3_endpoint_url, create=True)
    card, path = exported_models[MODEL]
    publish(store, card, path)  # type: ignore[arg-type]
    configure(settings)
    plan = RunPlan(models=[MODEL], evaluate=False)

    # 1. both workers take pages; the encoder gets every chunk
    dispatch(msg.model_copy(update={"batch_id": "calm", "plan": plan}), settings)
    wait_for_batch(store, "calm")
    assert outputs(store, "calm") == expected
    logs = [stack.procs[f"ingest-{i}"].log() for i in (0, 1)]
    done = [set(re.findall(r"(kiban\.ingest\.\w+)\[[0-9a-f-]+\] succeeded", log)) for log in logs]
    assert all(done), f"both ingest workers took part: {done}"
    assert {"kiban.ingest.batch", "kiban.ingest.validate_page", "kiban.ingest.reduce"} <= (
        done[0] | done[1]
    )
    deadline = time.monotonic() + 240
    while not all(read_meta(store, MODEL, "calm", c) for c in range(n_chunks)):
        assert time.monotonic() < deadline, "not every chunk was encoded"
        time.sleep(0.5)

    # 2. a worker SIGKILLed in the middle of a page: its claim stays, its redelivered message
    # skips the page, and the reducer validates it itself after KIBAN_INGEST_PAGE_WAIT
    heavy = msg.model_copy(update={"batch_id": "heavy", "source": heavy_source.as_uri()})
    ingest_batch(heavy, embedded)
    expected = outputs(embedded.store, "heavy")
    for attempt in range(5):
        victim = stack.procs["ingest-1"]
        marks = [len(stack.procs[f"ingest-{i}"].log()) for i in (0, 1)]
        batch = f"killed-{attempt}"
        dispatch(heavy.model_copy(update={"batch_id": batch}), settings)
        claimed = _claimed_page(
            settings.broker_url, store, batch, victim.pid, time.monotonic() + 30
        )
        if claimed is None:  # the reducer took every page first this time
            wait_for_batch(store, batch)
            continue
        victim.kill()  # SIGKILL, holding its claim, inside the page
        stack.start_worker("ingest", "ingest-1")
        wait_for_batch(store, batch)
        assert outputs(store, batch) == expected
        logs = "".join(stack.procs[f"ingest-{i}"].log()[marks[i] :] for i in (0, 1))
        assert re.search(rf"batch {batch}: page {claimed} claimed by .* validating it here", logs)
        break
    else:
        pytest.fail("could not kill ingest-1 in the middle of a page in 5 tries")
