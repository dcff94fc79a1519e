"""Celery tasks of the encoder container: encode a chunk, index a shard."""

from __future__ import annotations

from typing import Any

from kiban.celery_app import app
from kiban.context import Context
from kiban.messages import TASK_NAMES, EncodeChunk, IndexShard
from kiban.records import read_batch_info
from kiban.tasks import run_task, vector_index
from kiban.workflow import after_encode, after_index
from kiban_encoder.encode import encode_chunk
from kiban_encoder.index import index_shard


def _encode(msg: EncodeChunk, ctx: Context) -> dict[str, Any]:
    meta = encode_chunk(msg, ctx)
    after_encode(msg, ctx.settings)
    return meta.model_dump(mode="json")


def _index(msg: IndexShard, ctx: Context) -> int:
    n = index_shard(msg, ctx, vector_index(ctx.settings))
    after_index(msg, read_batch_info(ctx.store, msg.batch_id), ctx.store, ctx.settings)
    return n


@app.task(name=TASK_NAMES["encode_chunk"], acks_late=True)
def encode_chunk_task(message: dict[str, Any]) -> dict[str, Any]:
    return run_task(TASK_NAMES["encode_chunk"], message, EncodeChunk, _encode)  # type: ignore[no-any-return]


@app.task(name=TASK_NAMES["index_shard"], acks_late=True)
def index_shard_task(message: dict[str, Any]) -> int:
    return int(run_task(TASK_NAMES["index_shard"], message, IndexShard, _index))
