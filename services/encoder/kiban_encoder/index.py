"""The writer stage: a stored shard into the model's Qdrant collection (idempotent)."""

from __future__ import annotations

from kiban.context import Context
from kiban.messages import IndexShard
from kiban.records import read_batch_source, read_chunk_records
from kiban.shards import read_shard
from kiban.telemetry import POINTS_UPSERTED
from kiban.vectors import VectorIndex


def index_shard(msg: IndexShard, ctx: Context, index: VectorIndex) -> int:
    """Upsert the shard's vectors with their payloads; returns the number of points."""
    shard = read_shard(ctx.store, msg.model, msg.batch_id, msg.chunk)
    if not shard.sha256s:
        return 0
    by_key = {r.key: r for r in read_chunk_records(ctx.store, msg.batch_id, msg.chunk)}
    source = read_batch_source(ctx.store, msg.batch_id)  # batch.json may not exist yet
    payloads = []
    for key in shard.keys:
        rec = by_key[key]
        payloads.append(
            {
                "key": rec.key,
                "sha256": rec.sha256,
                "label": rec.label,
                "group": rec.group,
                "split": rec.split,
                "batch": msg.batch_id,
                "source": source,
            }
        )
    index.ensure_collection(msg.model, int(shard.vectors.shape[1]))
    n = index.upsert(msg.model, shard.sha256s, shard.vectors, payloads)
    POINTS_UPSERTED.labels(msg.model).inc(n)
    return n
