"""How one stage hands work to the next, the same way embedded and distributed.

Each task, when done, sends the next messages: ingest → one EncodeChunk per (model,
chunk) → IndexShard → (when the batch's last shard is indexed) EvaluateBatch. Embedded
mode runs each message's task right away in this process; distributed mode puts it on
the task's queue. There is no coordinator to lose.
"""

from __future__ import annotations

import hashlib
import logging

from kiban.celery_app import TASK_QUEUES, app
from kiban.errors import KibanError
from kiban.messages import (
    TASK_NAMES,
    EncodeChunk,
    EvaluateBatch,
    IndexShard,
    IngestBatch,
    Message,
    RunPlan,
)
from kiban.records import BatchInfo, batch_prefix
from kiban.settings import Settings
from kiban.store import ObjectStore

log = logging.getLogger(__name__)


def queue_for(message: Message, settings: Settings) -> str:
    kind = message.kind  # type: ignore[attr-defined]
    if kind == "encode_chunk":
        return settings.encode_queue_for(message.model)  # type: ignore[attr-defined]
    return TASK_QUEUES[TASK_NAMES[kind]]


def dispatch(message: Message, settings: Settings) -> None:
    """Run (embedded) or enqueue (distributed) the task that handles ``message``."""
    name = TASK_NAMES[message.kind]  # type: ignore[attr-defined]
    payload = {"message": message.model_dump(mode="json")}
    if settings.mode == "embedded":
        if name not in app.tasks:
            raise KibanError(f"task {name} is not installed in this process (missing extra?)")
        app.tasks[name].apply(kwargs=payload, throw=True)
    else:
        app.send_task(name, kwargs=payload, queue=queue_for(message, settings))


def indexed_marker(batch_id: str, model: str, chunk: int) -> str:
    return f"{batch_prefix(batch_id)}/progress/indexed/{model}/chunk-{chunk:05d}"


def after_ingest(msg: IngestBatch, info: BatchInfo, store: ObjectStore, settings: Settings) -> None:
    for model in msg.plan.models:
        for chunk in info.chunks:
            dispatch(
                EncodeChunk(batch_id=info.batch_id, model=model, chunk=chunk.index, plan=msg.plan),
                settings,
            )
    if not info.chunks:  # nothing to encode: report the quarantine straight away
        log.warning("batch %s has no accepted images", info.batch_id)
        request_evaluation(info.batch_id, msg.plan, store, settings)


def after_encode(msg: EncodeChunk, settings: Settings) -> None:
    dispatch(
        IndexShard(batch_id=msg.batch_id, model=msg.model, chunk=msg.chunk, plan=msg.plan),
        settings,
    )


def batch_complete(store: ObjectStore, info: BatchInfo, models: list[str]) -> bool:
    for model in models:
        done = {
            i.key for i in store.list(f"{batch_prefix(info.batch_id)}/progress/indexed/{model}")
        }
        if len(done) < len(info.chunks):
            return False
    return True


def claim_once(settings: Settings, store: ObjectStore, key: str) -> bool:
    """True for exactly one caller per key.

    Distributed: Redis SET NX on the broker (atomic across workers). Embedded: a marker
    object in the store (one process).
    """
    if settings.mode == "distributed":
        import redis

        client = redis.Redis.from_url(settings.broker_url)
        return bool(client.set(f"kiban:claim:{key}", "1", nx=True, ex=30 * 24 * 3600))
    marker = f"claims/{key}"
    if store.exists(marker):
        return False
    store.put(marker, b"1")
    return True


def evaluation_request_id(batch_id: str, plan: RunPlan) -> str:
    """The same run plan on the same batch is the same evaluation request (sent once)."""
    text = (
        f"{batch_id}|{','.join(plan.models)}|{','.join(map(str, plan.k))}|"
        f"{plan.protocol.model_dump_json()}"
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def after_index(msg: IndexShard, info: BatchInfo, store: ObjectStore, settings: Settings) -> None:
    """Record the chunk as indexed; the task that completes the batch triggers evaluation."""
    store.put(indexed_marker(msg.batch_id, msg.model, msg.chunk), b"")
    plan: RunPlan | None = msg.plan
    if plan is None or not plan.evaluate or not plan.models:
        return
    if batch_complete(store, info, plan.models):
        request_evaluation(msg.batch_id, plan, store, settings)


def request_evaluation(
    batch_id: str, plan: RunPlan, store: ObjectStore, settings: Settings
) -> None:
    """Send the batch's evaluation once per run plan, however many tasks get here."""
    if not plan.evaluate or not plan.models:
        return
    request = evaluation_request_id(batch_id, plan)
    if claim_once(settings, store, f"evaluate-{batch_id}-{request}"):
        dispatch(
            EvaluateBatch(
                batch_id=batch_id,
                models=plan.models,
                k=plan.k,
                protocol=plan.protocol,
                request_id=request,
            ),
            settings,
        )
