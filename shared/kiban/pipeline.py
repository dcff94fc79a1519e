"""Run one batch to its report: send the trigger, follow progress in the stores.

``kiban run`` sends the same IngestBatch trigger an operations team would put on the
queue; the stages chain themselves (see ``kiban.workflow``). Embedded, the in-process
queue runs the chain in this process (in a background thread, so progress can be
shown); distributed, workers run it and this function only watches the stores. Either
way a chunk that fails for good is stated in the report; a batch-level failure (ingest,
evaluation) ends the run at once with the dead letter's reason.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from kiban.celery_app import configure
from kiban.errors import KibanError
from kiban.messages import (
    ChunkMessage,
    EvaluateBatch,
    EvaluationProtocol,
    IngestBatch,
    RunPlan,
    by_task,
)
from kiban.models.registry import load_card
from kiban.records import report_prefix, report_versions
from kiban.settings import Settings, use_settings
from kiban.status import BatchStatus, NewDeadLetters, batch_status, letter_batch
from kiban.store import ObjectStore, open_store
from kiban.workflow import dispatch, evaluation_request_id

ProgressFn = Callable[[BatchStatus], None]


def default_batch_id(source: str, manifest: str | None) -> str:
    """Deterministic: the same source (and manifest) is the same batch, so re-runs are no-ops."""
    tail = re.sub(r"[^A-Za-z0-9._-]+", "-", source.rstrip("/").rsplit("/", 1)[-1]).strip("-._")
    digest = hashlib.sha256(f"{source}\n{manifest or ''}".encode()).hexdigest()[:8]
    return f"{(tail or 'batch')[:40]}-{digest}"


def find_report(store: ObjectStore, batch_id: str, request_id: str) -> dict[str, Any] | None:
    """The newest report of ``batch_id`` written for this evaluation request."""
    for version in reversed(report_versions(store, batch_id)):
        report = json.loads(store.get(f"{report_prefix(batch_id)}/{version}/report.json"))
        if report.get("request_id") == request_id:
            return dict(report)
    return None


def dooms_batch(task: str) -> bool:
    """A failed chunk leaves the rest of its batch to finish; any other failed stage does not."""
    kind = by_task(task)
    return kind is None or not issubclass(kind, ChunkMessage)


class DeadLetterWatch(NewDeadLetters):
    """New batch-level dead letters about one batch."""

    def __init__(self, store: ObjectStore, batch_id: str) -> None:
        self.batch_id = batch_id
        super().__init__(store)

    def reason(self, letter: dict[str, Any]) -> str | None:
        if letter_batch(letter) == self.batch_id and dooms_batch(str(letter.get("task"))):
            return f"{letter['task']}: {letter['reason']}"
        return None


def run_batch(
    settings: Settings,
    source: str,
    models: list[str],
    manifest: str | None = None,
    batch_id: str | None = None,
    ks: list[int] | None = None,
    progress: ProgressFn | None = None,
    timeout: float = 24 * 3600,
    poll_seconds: float = 0.5,
    protocol: EvaluationProtocol | None = None,
    volume_images_per_night: int | None = None,
) -> dict[str, Any]:
    """Ingest, encode with every model, index and evaluate one batch; returns the report.

    ``volume_images_per_night`` sets the report's cost projection; the run plan carries it to
    the evaluation in both modes (default: the reporter's KIBAN_VOLUME_IMAGES_PER_NIGHT).
    """
    use_settings(settings)
    configure(settings)
    store = open_store(
        settings.resolved_store_uri, settings.s3_endpoint_url, settings.s3_region, create=True
    )
    for model in models:  # fail before any work if a model is unknown
        load_card(store, model)
    batch_id = batch_id or default_batch_id(source, manifest)
    plan = RunPlan(
        models=models,
        evaluate=True,
        k=ks or [1, 3, 5],
        protocol=protocol or EvaluationProtocol(),
        volume_images_per_night=volume_images_per_night,
    )
    trigger = IngestBatch(
        batch_id=batch_id,
        source=source,
        manifest=manifest,
        chunk_size=settings.chunk_size,
        plan=plan,
    )
    request_id = evaluation_request_id(batch_id, plan)
    dead_letters = DeadLetterWatch(store, batch_id)

    errors: list[BaseException] = []
    if settings.mode == "embedded":

        def work() -> None:
            try:
                dispatch(trigger, settings)
            except BaseException as exc:  # re-raised in the caller's thread
                errors.append(exc)

        runner = threading.Thread(target=work, name="kiban-embedded", daemon=True)
        runner.start()
        alive = runner.is_alive
    else:
        dispatch(trigger, settings)
        alive = lambda: True  # noqa: E731 - workers run the chain; we only watch

    deadline = time.monotonic() + timeout
    while True:
        running = alive()
        if progress is not None:
            progress(batch_status(store, batch_id, models, detailed=False))
        if errors:
            raise errors[0]
        failed = dead_letters.new_reasons()
        if failed:  # a stage gave up on this batch: say why instead of waiting for the timeout
            raise KibanError(f"batch {batch_id} failed — dead-lettered {'; '.join(failed)}")
        report = find_report(store, batch_id, request_id)
        if report is not None and (not running or settings.mode == "distributed"):
            return report
        if not running:
            raise KibanError(f"batch {batch_id} finished without a report (see `kiban status`)")
        if time.monotonic() > deadline:
            raise KibanError(f"batch {batch_id}: no report after {timeout:.0f}s")
        time.sleep(poll_seconds)


def evaluate_stored(
    settings: Settings,
    batch_id: str,
    models: list[str],
    ks: list[int],
    protocol: EvaluationProtocol,
    timeout: float = 24 * 3600,
    poll_seconds: float = 0.5,
    volume_images_per_night: int | None = None,
) -> dict[str, Any]:
    """Re-evaluate a batch from its stored embeddings (no re-encoding): a new report version."""
    use_settings(settings)
    configure(settings)
    store = open_store(
        settings.resolved_store_uri, settings.s3_endpoint_url, settings.s3_region, create=True
    )
    status = batch_status(store, batch_id, models, detailed=False)
    if not status.ingested:
        raise KibanError(f"no batch {batch_id!r} in {store.uri}")
    for progress in status.models:
        if progress.encoded + progress.failed < progress.chunks:
            raise KibanError(
                f"batch {batch_id!r} has {progress.encoded}/{progress.chunks} chunks encoded "
                f"with {progress.model!r}; run it first (kiban run)"
            )
    request_id = uuid.uuid4().hex[:16]
    message = EvaluateBatch(
        batch_id=batch_id,
        models=models,
        k=ks,
        protocol=protocol,
        request_id=request_id,
        volume_images_per_night=volume_images_per_night,
    )
    dead_letters = DeadLetterWatch(store, batch_id)
    dispatch(message, settings)
    deadline = time.monotonic() + timeout
    while (report := find_report(store, batch_id, request_id)) is None:
        failed = dead_letters.new_reasons()
        if failed:
            raise KibanError(f"evaluation of {batch_id} failed — dead-lettered {'; '.join(failed)}")
        if settings.mode == "embedded" or time.monotonic() > deadline:
            raise KibanError(f"evaluation of {batch_id} wrote no report")
        time.sleep(poll_seconds)
    return report
