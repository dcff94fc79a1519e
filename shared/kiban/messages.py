"""Queue messages: small, versioned, validated.

A message names work (batch, model, chunk) and never carries images or vectors; those
live in the object store. Any Celery producer can send these as JSON keyword argument
``message`` to the task named in ``TASK_NAMES``.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kiban.errors import InvalidMessageError

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
Name = Annotated[str, Field(pattern=NAME_PATTERN)]


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1] = 1


class EvaluationProtocol(BaseModel):
    """How a batch is evaluated; recorded in the report.

    - ``auto``: leave-one-group-out when the batch has groups, else leave-one-out.
    - ``leave-one-out`` / ``leave-one-group-out``: every labelled image queries all others
      (minus its own group).
    - ``split``: queries from ``query_split`` against an index of the other splits; splits
      come from the manifest, or are assigned by hashing the group (never splitting one).
    - ``cross-batch``: this batch's images query the accumulated index of earlier batches
      (``history_batches``, default: every earlier batch evaluated with the same models).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Literal["auto", "leave-one-out", "leave-one-group-out", "split", "cross-batch"] = "auto"
    query_split: str = Field("test", min_length=1, description="split protocol: query split")
    test_fraction: float = Field(
        0.2, gt=0, lt=1, description="split protocol without manifest splits: share of groups"
    )
    history_batches: list[Name] = Field(
        default_factory=list, description="cross-batch: batches forming the index"
    )
    query_sample: int | None = Field(
        None, ge=1, description="Evaluate a class-stratified, seeded sample of this many queries"
    )
    bootstrap: int = Field(1000, ge=0, le=100_000, description="Bootstrap resamples for CIs")
    seed: int = Field(0, ge=0, description="Seeds sampling and bootstrap: same seed, same numbers")
    ann_check_queries: int = Field(
        200, ge=0, le=100_000, description="Queries compared between Qdrant and exact top-k"
    )


class RunPlan(BaseModel):
    """What follows a stage: which models encode the batch, and whether to evaluate it.

    Carried along the chain of messages so each stage can send the next one, and the
    last index task of a batch can trigger its evaluation — with no coordinator process.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    models: list[Name] = Field(default_factory=list)
    evaluate: bool = True
    k: list[Annotated[int, Field(ge=1, le=1000)]] = Field(default_factory=lambda: [1, 3, 5])
    protocol: EvaluationProtocol = Field(default_factory=EvaluationProtocol)


class IngestBatch(Message):
    """List, validate and label a source prefix as batch ``batch_id``, then run ``plan``."""

    kind: Literal["ingest_batch"] = "ingest_batch"
    batch_id: Name
    source: str = Field(min_length=1, description="file:///dir or s3://bucket/prefix")
    manifest: str | None = Field(None, description="URI of a CSV/JSONL manifest")
    chunk_size: int = Field(256, ge=1, le=100_000)
    plan: RunPlan = Field(default_factory=RunPlan)


class EncodeChunk(Message):
    """Encode one planned chunk of a batch with one model and write one shard."""

    kind: Literal["encode_chunk"] = "encode_chunk"
    batch_id: Name
    model: Name
    chunk: int = Field(ge=0)
    plan: RunPlan | None = None


class IndexShard(Message):
    """Upsert one stored shard into the model's Qdrant collection."""

    kind: Literal["index_shard"] = "index_shard"
    batch_id: Name
    model: Name
    chunk: int = Field(ge=0)
    plan: RunPlan | None = None


class EvaluateBatch(Message):
    """Compute the retrieval and cost report of a batch for some models."""

    kind: Literal["evaluate_batch"] = "evaluate_batch"
    batch_id: Name
    models: list[Name] = Field(min_length=1)
    k: list[Annotated[int, Field(ge=1, le=1000)]] = Field(default_factory=lambda: [1, 3, 5])
    protocol: EvaluationProtocol = Field(default_factory=EvaluationProtocol)
    request_id: str | None = Field(
        None, max_length=64, description="Set by the workflow; recorded in the report."
    )


class NightlyRun(Message):
    """Sent by the schedule: ingest and evaluate the night's prefix (KIBAN_SCHEDULE_*)."""

    kind: Literal["nightly_run"] = "nightly_run"
    date: str | None = Field(
        None, pattern=r"^\d{4}-\d{2}-\d{2}$", description="YYYY-MM-DD; default: today (UTC)"
    )


class ReindexModel(Message):
    """Re-upsert a model's stored shards into Qdrant (no re-encoding)."""

    kind: Literal["reindex_model"] = "reindex_model"
    model: Name
    batches: list[Name] = Field(default_factory=list, description="Default: every batch.")


class ExportReport(Message):
    """Copy a batch's report (JSON + Markdown) to another object-store prefix."""

    kind: Literal["export_report"] = "export_report"
    batch_id: Name
    report_version: str | None = Field(None, pattern=r"^\d{4}$", description="Default: the latest.")
    destination: str = Field(min_length=1, description="file:///dir or s3://bucket/prefix")


TASK_NAMES: dict[str, str] = {
    "ingest_batch": "kiban.ingest.batch",
    "encode_chunk": "kiban.encoder.encode_chunk",
    "index_shard": "kiban.encoder.index_shard",
    "evaluate_batch": "kiban.reporter.evaluate_batch",
    "nightly_run": "kiban.ingest.nightly",
    "reindex_model": "kiban.encoder.reindex_model",
    "export_report": "kiban.reporter.export_report",
}

_MODELS: dict[str, type[Message]] = {
    "ingest_batch": IngestBatch,
    "encode_chunk": EncodeChunk,
    "index_shard": IndexShard,
    "evaluate_batch": EvaluateBatch,
    "nightly_run": NightlyRun,
    "reindex_model": ReindexModel,
    "export_report": ExportReport,
}


def message_types() -> dict[str, type[Message]]:
    """Every message kind and its schema (the README documents each with an example)."""
    return dict(_MODELS)


def parse_message(payload: Any, expected: type[Message]) -> Message:
    """Validate ``payload`` as ``expected``; raise InvalidMessageError with the reason."""
    try:
        return expected.model_validate(payload)
    except ValidationError as exc:
        reasons = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in exc.errors()
        )
        raise InvalidMessageError(f"invalid {expected.__name__} message: {reasons}") from None


def is_valid_name(value: str) -> bool:
    return re.match(NAME_PATTERN, value) is not None
