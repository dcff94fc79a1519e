"""Chaos with the DEFAULT redelivery settings: an encoder SIGKILLed mid-chunk has its chunk
redone by another worker within the documented bound (docs/deployment.md, *Redelivery*:
``kiban.liveness.redelivery_bound(KIBAN_VISIBILITY_TIMEOUT)`` after the death, then the time
to encode the chunk), not after hours; `kiban status` shows the chunk orphaned meanwhile.

Nothing about redelivery is configured here (no KIBAN_VISIBILITY_TIMEOUT, no retry settings):
only one ONNX thread per worker, so that two encoders share a small machine, and the allowed
source root. About 1.5 minutes, most of it the default visibility timeout."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from kiban.celery_app import configure
from kiban.liveness import redelivery_bound
from kiban.messages import IngestBatch, RunPlan
from kiban.settings import Settings
from kiban.status import batch_status
from kiban.store import open_store
from kiban.workflow import dispatch
from kiban_cli.stack import LocalStack
from kiban_cli.synthetic import generate_texture_dataset
from tests.integration.stack_fixtures import running_stack, stack_settings

pytestmark = pytest.mark.integration

MODELS = ["effnet-lite0", "vit-s-32-random"]
#: Encoding the re-delivered 48-image chunk once it is back on its queue, on a shared CPU
#: (the other encoder may first finish the chunk it is on).
ENCODE_ALLOWANCE_SECONDS = 60


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    with running_stack(
        tmp_path_factory.mktemp("stack"),
        [
            ("ingest", "ingest"),
            ("encoder", "encoder-0"),
            ("encoder", "encoder-1"),
            ("indexer", "indexer"),
        ],
        extra_env={
            "KIBAN_THREADS": "1",
            "KIBAN_ALLOWED_ROOTS": str(tmp_path_factory.getbasetemp()),
        },
    ) as stack:
        yield stack


def _tasks(log: str, state: str) -> set[str]:
    return set(re.findall(r"encode_chunk\[([0-9a-f-]+)\] " + state, log))


def test_a_sigkilled_encoders_chunk_is_redone_within_the_documented_bound(
    stack: LocalStack,
    tmp_path_factory: pytest.TempPathFactory,
    exported_models,
) -> None:
    from kiban.models.registry import publish

    settings: Settings = stack_settings(stack, tmp_path_factory.mktemp("client"))
    assert "KIBAN_VISIBILITY_TIMEOUT" not in stack.env
    bound = redelivery_bound(settings.visibility_timeout)  # the default: 60 s + one sweep
    store = open_store(settings.resolved_store_uri, settings.s3_endpoint_url, create=True)
    for card, path in exported_models.values():
        publish(store, card, path)  # type: ignore[arg-type]
    images = tmp_path_factory.mktemp("images")
    generate_texture_dataset(images, n_classes=4, per_class=12, size=96, groups_per_class=4)
    configure(settings)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("KIBAN_")},
        **stack.env,
        "KIBAN_HOME": str(tmp_path_factory.mktemp("status-home")),
    }

    for attempt in range(3):  # the kill must land while a chunk is being encoded
        victim = stack.procs["encoder-0"]
        mark = len(victim.log())
        batch = f"chaos-{attempt}"
        dispatch(
            IngestBatch(
                batch_id=batch,
                source=images.as_uri(),
                manifest=(images / "manifest.csv").as_uri(),
                chunk_size=48,
                plan=RunPlan(models=MODELS),
            ),
            settings,
        )
        deadline = time.monotonic() + 120
        while not _tasks(victim.log()[mark:], "received"):
            assert time.monotonic() < deadline, "encoder-0 never received a chunk"
            time.sleep(0.01)
        victim.kill()  # SIGKILL to the whole process group, mid-task
        killed_at = time.monotonic()
        log = victim.log()[mark:]
        orphans = _tasks(log, "received") - _tasks(log, "succeeded")
        if orphans:
            break
        stack.start_worker("encoder", "encoder-0")
    else:
        pytest.fail("could not kill encoder-0 in the middle of a chunk in 3 tries")

    # on-call's view while it waits: the chunk is in flight, orphaned, with its countdown
    out = subprocess.run(
        [sys.executable, "-m", "kiban_cli.main", "status", "--live", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    view = json.loads(out.stdout)
    orphaned = [f for f in view["in_flight"] if f["id"] in orphans]
    assert orphaned and orphaned[0]["state"] == "orphaned", view["in_flight"]
    assert orphaned[0]["batch"] == batch and orphaned[0]["redelivery_in"] <= bound

    survivor = stack.procs["encoder-1"]
    deadline = killed_at + bound + ENCODE_ALLOWANCE_SECONDS
    while not orphans <= _tasks(survivor.log(), "succeeded"):
        assert time.monotonic() < deadline, (
            f"the killed chunk was not redone within {bound:.0f}s + {ENCODE_ALLOWANCE_SECONDS}s"
        )
        time.sleep(0.5)
    redone_after = time.monotonic() - killed_at
    assert redone_after <= bound + ENCODE_ALLOWANCE_SECONDS

    deadline = time.monotonic() + 180
    while True:
        state = batch_status(store, batch, MODELS)
        if state.report_versions and all(m.indexed == m.chunks for m in state.models):
            break
        assert time.monotonic() < deadline, f"batch {batch} not evaluated: {state}"
        time.sleep(0.5)
    assert all(m.images_encoded == 48 for m in state.models)
    assert state.report_versions == ["0001"]  # evaluated exactly once
    print(f"killed chunk redone {redone_after:.0f}s after the SIGKILL (bound {bound:.0f}s)")
