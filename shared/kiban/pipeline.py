"""The embedded runner: one batch through ingest → encode → index → evaluate.

It sends the same messages to the same Celery tasks a distributed deployment uses; in
embedded mode Celery runs them in this process. Tasks are addressed by name, so this
library never imports a service.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from typing import Any

from kiban.celery_app import app, configure, load_service_tasks
from kiban.errors import KibanError
from kiban.messages import TASK_NAMES, EncodeChunk, EvaluateBatch, IndexShard, IngestBatch, Message
from kiban.models.registry import load_card
from kiban.records import BatchInfo
from kiban.settings import Settings, use_settings
from kiban.store import open_store

ProgressFn = Callable[[str, int, int], None]


def default_batch_id(source: str, manifest: str | None) -> str:
    """Deterministic: the same source (and manifest) is the same batch, so re-runs are no-ops."""
    tail = re.sub(r"[^A-Za-z0-9._-]+", "-", source.rstrip("/").rsplit("/", 1)[-1]).strip("-._")
    digest = hashlib.sha256(f"{source}\n{manifest or ''}".encode()).hexdigest()[:8]
    return f"{(tail or 'batch')[:40]}-{digest}"


def send(message: Message, settings: Settings) -> Any:
    """Run the task for ``message`` and wait for its result."""
    name = TASK_NAMES[message.kind]  # type: ignore[attr-defined]
    payload = {"message": message.model_dump(mode="json")}
    if settings.mode == "embedded":
        if name not in app.tasks:
            raise KibanError(f"task {name} is not installed here (missing service extra?)")
        return app.tasks[name].apply(kwargs=payload, throw=True).get()
    return app.send_task(name, kwargs=payload).get(disable_sync_subtasks=False)


def run_batch(
    settings: Settings,
    source: str,
    models: list[str],
    manifest: str | None = None,
    batch_id: str | None = None,
    ks: list[int] | None = None,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Ingest, encode with every model, index and evaluate one batch; returns the report."""
    use_settings(settings)
    configure(settings)
    load_service_tasks()
    store = open_store(
        settings.resolved_store_uri, settings.s3_endpoint_url, settings.s3_region, create=True
    )
    for model in models:  # fail before any work if a model is unknown
        load_card(store, model)
    batch_id = batch_id or default_batch_id(source, manifest)
    tick = progress or (lambda stage, done, total: None)

    tick("ingest", 0, 1)
    info = BatchInfo.model_validate(
        send(
            IngestBatch(
                batch_id=batch_id, source=source, manifest=manifest,
                chunk_size=settings.chunk_size,
            ),
            settings,
        )
    )
    tick("ingest", 1, 1)
    total = len(info.chunks) * len(models)
    done = 0
    for model in models:
        for chunk in info.chunks:
            send(EncodeChunk(batch_id=batch_id, model=model, chunk=chunk.index), settings)
            send(IndexShard(batch_id=batch_id, model=model, chunk=chunk.index), settings)
            done += 1
            tick("encode", done, total)
    tick("evaluate", 0, 1)
    report = send(
        EvaluateBatch(batch_id=batch_id, models=models, k=ks or [1, 3, 5]), settings
    )
    tick("evaluate", 1, 1)
    return dict(report)
