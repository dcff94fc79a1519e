"""One scenario, run in both modes: a chunk that always fails.

The batch is ingested, then one chunk's record file is made unreadable before the encode
messages are sent — exactly the messages ``after_ingest`` sends. The chunk must end as one
dead letter, every other chunk encoded and indexed, and the report written with the
failure stated. Embedded and distributed must agree.
"""

from __future__ import annotations

import json
import time
from typing import Any

from kiban.messages import EncodeChunk, IngestBatch, RunPlan
from kiban.pipeline import find_report
from kiban.records import chunk_records_key, read_batch_info
from kiban.settings import Settings
from kiban.status import batch_status, recent_dead_letters
from kiban.store import open_store
from kiban.workflow import dispatch, evaluation_request_id

FAILING_CHUNK = 1
MODEL = "effnet-lite0"


def run_with_failing_chunk(
    settings: Settings, source: str, manifest: str, batch_id: str, timeout: float = 240
) -> dict[str, Any]:
    """Run the scenario; returns what both modes are compared on."""
    store = open_store(settings.resolved_store_uri, settings.s3_endpoint_url, create=True)
    dispatch(
        IngestBatch(
            batch_id=batch_id,
            source=source,
            manifest=manifest,
            chunk_size=settings.chunk_size,
            plan=RunPlan(models=[], evaluate=False),
        ),
        settings,
    )
    deadline = time.monotonic() + timeout
    while not store.exists(f"batches/{batch_id}/batch.json"):
        assert time.monotonic() < deadline, "batch not ingested"
        time.sleep(0.3)
    info = read_batch_info(store, batch_id)
    assert len(info.chunks) >= 3, "the scenario needs several chunks"
    store.put(chunk_records_key(batch_id, FAILING_CHUNK), b"{not json\n")

    plan = RunPlan(models=[MODEL], evaluate=True, k=[1, 3, 5])
    for chunk in info.chunks:
        dispatch(
            EncodeChunk(batch_id=batch_id, model=MODEL, chunk=chunk.index, plan=plan), settings
        )

    request = evaluation_request_id(batch_id, plan)
    while (report := find_report(store, batch_id, request)) is None:
        assert time.monotonic() < deadline, f"no report: {batch_status(store, batch_id, [MODEL])}"
        time.sleep(0.5)
    status = batch_status(store, batch_id, [MODEL])
    letters = recent_dead_letters(store, 100, batch_id)
    return {
        "chunks": len(info.chunks),
        "status": status.models[0],
        "letters": letters,
        "report": report,
        "per_chunk": {c.index: c.stop - c.start for c in info.chunks},
    }


def check_outcome(outcome: dict[str, Any]) -> None:
    """What 'the rest of the batch is unaffected' means, asserted the same in both modes."""
    chunks, progress, report = outcome["chunks"], outcome["status"], outcome["report"]
    (letter,) = outcome["letters"]  # one dead letter: no retry storm, no cascading failures
    assert letter["task"] == "kiban.encoder.encode_chunk"
    assert letter["payload"]["chunk"] == FAILING_CHUNK
    assert progress.encoded == progress.indexed == chunks - 1
    assert progress.failed == 1
    (failure,) = report["failed_chunks"]
    assert (failure["model"], failure["chunk"]) == (MODEL, FAILING_CHUNK)
    assert failure["task"] == "kiban.encoder.encode_chunk" and failure["reason"]
    assert any(f"chunk {FAILING_CHUNK}" in w and MODEL in w for w in report["warnings"])
    expected = sum(n for i, n in outcome["per_chunk"].items() if i != FAILING_CHUNK)
    (section,) = report["models"]
    assert section["images_encoded"] == expected
    assert report["protocol"]["n_images"] == expected
    assert json.dumps(report)  # the report is complete JSON
