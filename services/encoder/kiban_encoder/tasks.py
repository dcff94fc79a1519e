"""Celery tasks of the encoder container: encode a chunk, index a shard."""

from __future__ import annotations

from typing import Any

from kiban.celery_app import app
from kiban.messages import TASK_NAMES, EncodeChunk, IndexShard
from kiban.tasks import run_task, vector_index
from kiban_encoder.encode import encode_chunk
from kiban_encoder.index import index_shard


@app.task(name=TASK_NAMES["encode_chunk"], acks_late=True)
def encode_chunk_task(message: dict[str, Any]) -> dict[str, Any]:
    meta = run_task(TASK_NAMES["encode_chunk"], message, EncodeChunk, encode_chunk)
    return meta.model_dump(mode="json")


@app.task(name=TASK_NAMES["index_shard"], acks_late=True)
def index_shard_task(message: dict[str, Any]) -> int:
    return int(
        run_task(
            TASK_NAMES["index_shard"],
            message,
            IndexShard,
            lambda msg, ctx: index_shard(msg, ctx, vector_index(ctx.settings)),
        )
    )
