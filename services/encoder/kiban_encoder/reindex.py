"""Re-index a model from its stored shards: after a Qdrant outage, migration or wipe."""

from __future__ import annotations

from kiban.context import Context
from kiban.messages import IndexShard, ReindexModel
from kiban.workflow import dispatch


def stored_shards(ctx: Context, model: str, batches: list[str]) -> list[tuple[str, int]]:
    """(batch, chunk) of every complete shard of ``model`` (its meta file exists)."""
    found = []
    for info in ctx.store.list(f"embeddings/{model}"):
        parts = info.key.split("/")  # embeddings/<model>/<batch>/chunk-00000.json
        is_meta = len(parts) == 4 and parts[3].startswith("chunk-") and parts[3].endswith(".json")
        if is_meta and (not batches or parts[2] in batches):
            found.append((parts[2], int(parts[3][6:11])))
    return sorted(found)


def reindex_model(msg: ReindexModel, ctx: Context) -> int:
    """Send one IndexShard per stored shard (indexing is idempotent); returns the count."""
    shards = stored_shards(ctx, msg.model, msg.batches)
    for batch_id, chunk in shards:
        dispatch(IndexShard(batch_id=batch_id, model=msg.model, chunk=chunk), ctx.settings)
    return len(shards)
