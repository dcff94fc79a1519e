"""Re-index a model from its stored shards: after a Qdrant outage, migration or wipe."""

from __future__ import annotations

from kiban.context import Context
from kiban.messages import IndexShard, ReindexModel
from kiban.shards import list_shards
from kiban.workflow import dispatch


def reindex_model(msg: ReindexModel, ctx: Context) -> int:
    """Send one IndexShard per complete stored shard (indexing is idempotent); the count."""
    shards = sorted(
        ref
        for ref in list_shards(ctx.store, msg.model)
        if not msg.batches or ref.batch_id in msg.batches
    )
    for ref in shards:
        dispatch(IndexShard(batch_id=ref.batch_id, model=ref.model, chunk=ref.chunk), ctx.settings)
    return len(shards)
