"""Celery tasks of the encoder container: encode a chunk, index a shard."""

from __future__ import annotations

from kiban.context import Context
from kiban.messages import EncodeChunk, IndexShard, ReindexModel
from kiban.shards import ShardMeta
from kiban.tasks import kiban_task, vector_index
from kiban.workflow import after_encode, after_index
from kiban_encoder.encode import encode_chunk
from kiban_encoder.index import index_shard
from kiban_encoder.reindex import reindex_model


@kiban_task(EncodeChunk)
def encode_chunk_task(msg: EncodeChunk, ctx: Context) -> ShardMeta:
    """Encode one chunk into a shard (skipped if done), then ask for it to be indexed."""
    meta = encode_chunk(msg, ctx)
    after_encode(msg, ctx.settings)
    return meta


@kiban_task(IndexShard)
def index_shard_task(msg: IndexShard, ctx: Context) -> int:
    """Upsert a stored shard into Qdrant; the batch's last shard triggers its evaluation."""
    n = index_shard(msg, ctx, vector_index(ctx.settings))
    after_index(msg, None, ctx.store, ctx.settings)  # batch.json read after the marker
    return n


@kiban_task(ReindexModel)
def reindex_model_task(msg: ReindexModel, ctx: Context) -> int:
    """Queue an index task for every stored shard of a model."""
    return reindex_model(msg, ctx)
