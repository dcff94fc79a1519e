"""How one stage hands work to the next, the same way embedded and distributed.

Each task, when done, sends the next messages: ingest → one EncodeChunk per (model,
chunk) → IndexShard → (when the batch's last chunk is done) EvaluateBatch. A chunk is
done when it is indexed or has failed for good; a failed chunk is stated in the report.
Distributed mode puts each message on its queue (``Message.route``); embedded mode puts
it on the in-process queue (``kiban.local_queue``). There is no coordinator to lose.
"""

from __future__ import annotations

import hashlib
import logging

from kiban.celery_app import app, load_service_tasks
from kiban.context import Context
from kiban.messages import (
    ChunkMessage,
    EncodeChunk,
    EvaluateBatch,
    IndexShard,
    IngestBatch,
    Message,
    RunPlan,
)
from kiban.progress import ChunkFailure, chunks_done, mark_failed, mark_indexed
from kiban.records import BatchInfo, read_batch_info_if_ingested
from kiban.settings import Settings
from kiban.store import ObjectStore
from kiban.transient import broker_is_transient, translated

log = logging.getLogger(__name__)


def dispatch(message: Message, settings: Settings) -> None:
    """Queue the task that handles ``message``: on the broker, or on the in-process queue.

    Embedded, the first dispatch in a thread also runs the queue until it is empty, so a
    caller (``kiban run``, ``kiban trigger``) returns when the work it started is done.
    """
    payload = {"message": message.model_dump(mode="json")}
    queue = message.route(settings)
    if settings.mode == "embedded":
        from kiban.local_queue import QUEUE

        load_service_tasks()  # embedded: every installed service runs in this process
        QUEUE.send(message.task, payload, queue)
        QUEUE.run_until_empty()
        return
    with translated("broker", broker_is_transient):
        app.send_task(message.task, kwargs=payload, queue=queue)


def after_ingest(msg: IngestBatch, info: BatchInfo, store: ObjectStore, settings: Settings) -> None:
    """Every chunk of an ingested batch to every model (a batch ingest found unchanged)."""
    for chunk in info.chunks:
        encode_chunk_with_plan(info.batch_id, chunk.index, msg.plan, settings)
    if not info.chunks:  # nothing to encode: report the quarantine straight away
        log.warning("batch %s has no accepted images", info.batch_id)
        request_evaluation(info.batch_id, msg.plan, store, settings)


def encode_chunk_with_plan(batch_id: str, chunk: int, plan: RunPlan, settings: Settings) -> None:
    """One EncodeChunk per model of ``plan``; ingest's reducer sends them as soon as the
    chunk's records are final, before the rest of the batch is validated."""
    for model in plan.models:
        dispatch(EncodeChunk(batch_id=batch_id, model=model, chunk=chunk, plan=plan), settings)


def after_reduce(plan: RunPlan, info: BatchInfo, store: ObjectStore, settings: Settings) -> None:
    """Ingest's reducer has written batch.json (its chunks were sent as they filled).

    No chunk: the quarantine is reported at once. Otherwise every chunk may already be
    indexed (encoders ran while ingest was finishing), and then no index task will look
    again: the reducer checks completion itself, as ``after_index`` would.
    """
    if not info.chunks:
        log.warning("batch %s has no accepted images", info.batch_id)
        request_evaluation(info.batch_id, plan, store, settings)
    elif plan.evaluate and plan.models and batch_complete(store, info, plan.models):
        request_evaluation(info.batch_id, plan, store, settings)


def after_encode(msg: EncodeChunk, settings: Settings) -> None:
    dispatch(
        IndexShard(batch_id=msg.batch_id, model=msg.model, chunk=msg.chunk, plan=msg.plan),
        settings,
    )


def batch_complete(store: ObjectStore, info: BatchInfo, models: list[str]) -> bool:
    """Every chunk of every model is indexed or failed for good."""
    wanted = {c.index for c in info.chunks}
    return all(wanted <= chunks_done(store, info.batch_id, model) for model in models)


def claim_once(settings: Settings, store: ObjectStore, key: str) -> bool:
    """True for exactly one caller per key.

    Distributed: Redis SET NX on the broker (atomic across workers). Embedded: a marker
    object in the store (one process).
    """
    if settings.mode == "distributed":
        import redis

        with translated("broker", broker_is_transient):
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


def after_index(
    msg: IndexShard, info: BatchInfo | None, store: ObjectStore, settings: Settings
) -> None:
    """Record the chunk as indexed; the task that completes the batch triggers evaluation.

    ``info`` None: batch.json is read *after* the marker is written, so that either this
    task or ingest's reducer (which writes batch.json, then checks the markers) sees the
    batch complete; a batch whose batch.json is not written yet is not complete.
    """
    mark_indexed(store, msg.batch_id, msg.model, msg.chunk)
    if info is None:
        info = read_batch_info_if_ingested(store, msg.batch_id)
    _evaluate_if_complete(msg, info, store, settings)


def after_failure(msg: Message, ctx: Context, task: str, reason: str) -> None:
    """A task failed for good (already dead-lettered). A chunk's failure is recorded, and
    the batch goes on: when every other chunk is done, it is evaluated without it."""
    if not isinstance(msg, ChunkMessage):
        return
    failure = ChunkFailure(model=msg.model, chunk=msg.chunk, task=task, reason=reason)
    mark_failed(ctx.store, msg.batch_id, failure)
    info = read_batch_info_if_ingested(ctx.store, msg.batch_id)
    _evaluate_if_complete(msg, info, ctx.store, ctx.settings)


def _evaluate_if_complete(
    msg: ChunkMessage, info: BatchInfo | None, store: ObjectStore, settings: Settings
) -> None:
    plan: RunPlan | None = msg.plan
    if info is None or plan is None or not plan.evaluate or not plan.models:
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
                volume_images_per_night=plan.volume_images_per_night,
            ),
            settings,
        )
