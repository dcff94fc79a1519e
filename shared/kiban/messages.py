"""Queue messages: small, versioned, validated — and the one registry of them.

A message names work (batch, model, chunk) and never carries images or vectors; those
live in the object store. Any Celery producer can send one as the JSON keyword argument
``message`` to the message class's ``task`` on its ``queue``.

Each message class carries its task name, queue and serving service, so routing,
dispatch, the workers' queues and the README's message section are all derived from
``registry()``: adding a message is one class here plus its handler in a service's
``tasks.py`` (``@kiban_task(NewMessage)``).
"""

from __future__ import annotations

import functools
import re
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, TypeVar, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from kiban.errors import InvalidMessageError

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
Name = Annotated[str, Field(pattern=NAME_PATTERN)]

# Resource bounds: no single message may take a worker to gigabytes. The reporter keeps
# ``queries x max(k)`` neighbours (12 bytes each: an int64 index, a float32 score), so
# k <= 100 keeps them under the embeddings' own size; bootstrap keeps ``resamples x metrics
# x models`` floats; an encoder holds one chunk's vectors (``chunk_size x dim x 4`` bytes).
MAX_K = 100
MAX_K_VALUES = 20
MAX_MODELS = 32
MAX_BATCHES = 1000
MAX_URI_CHARS = 4096
MAX_CHUNK_SIZE = 20_000
MAX_CHUNK_INDEX = 1_000_000
MAX_PAGE_INDEX = 10_000_000
MAX_BOOTSTRAP = 20_000
MAX_QUERY_SAMPLE = 1_000_000
MAX_ANN_CHECK_QUERIES = 10_000
MAX_SEED = 2**32 - 1

K = Annotated[int, Field(ge=1, le=MAX_K)]
Uri = Annotated[str, Field(min_length=1, max_length=MAX_URI_CHARS)]


if TYPE_CHECKING:
    from kiban.settings import Settings

_REGISTRY: dict[str, type[Message]] = {}
M = TypeVar("M", bound="Message")


class Message(BaseModel):
    """Base of every queue message; concrete subclasses register themselves by ``kind``.

    A concrete message declares ``kind`` (a Literal with a default) and the class
    variables below; abstract bases (no ``task``) are not registered.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    task: ClassVar[str] = ""  # Celery task name, e.g. "kiban.encoder.encode_chunk"
    queue: ClassVar[str] = ""  # default queue
    service: ClassVar[str] = ""  # the worker (`kiban worker SERVICE`) that serves it
    example: ClassVar[dict[str, Any]] = {}  # fields of the README's example

    version: Literal[1] = 1

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        if not cls.task or cls.__module__ != __name__:
            return  # an abstract base, or a test's private message: not part of the contract
        kind = cls.model_fields["kind"].default
        if not isinstance(kind, str) or not (cls.queue and cls.service):
            raise TypeError(f"{cls.__name__} needs a default kind, a queue and a service")
        if kind in _REGISTRY and _REGISTRY[kind] is not cls:
            raise TypeError(f"message kind {kind!r} registered twice")
        _REGISTRY[kind] = cls

    def route(self, settings: Settings) -> str:
        """The queue this message goes to (a message may route by its content)."""
        return self.queue


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
    query_split: str = Field(
        "test", min_length=1, max_length=64, description="split protocol: query split"
    )
    test_fraction: float = Field(
        0.2, gt=0, lt=1, description="split protocol without manifest splits: share of groups"
    )
    history_batches: list[Name] = Field(
        default_factory=list,
        max_length=MAX_BATCHES,
        description="cross-batch: batches forming the index",
    )
    query_sample: int | None = Field(
        None,
        ge=1,
        le=MAX_QUERY_SAMPLE,
        description="Evaluate a class-stratified, seeded sample of this many queries",
    )
    bootstrap: int = Field(1000, ge=0, le=MAX_BOOTSTRAP, description="Bootstrap resamples for CIs")
    seed: int = Field(
        0, ge=0, le=MAX_SEED, description="Seeds sampling and bootstrap: same seed, same numbers"
    )
    ann_check_queries: int = Field(
        200,
        ge=0,
        le=MAX_ANN_CHECK_QUERIES,
        description="Queries compared between Qdrant and exact top-k",
    )


class RunPlan(BaseModel):
    """What follows a stage: which models encode the batch, and whether to evaluate it.

    Carried along the chain of messages so each stage can send the next one, and the
    last index task of a batch can trigger its evaluation — with no coordinator process.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    models: list[Name] = Field(default_factory=list, max_length=MAX_MODELS)
    evaluate: bool = True
    k: list[K] = Field(default_factory=lambda: [1, 3, 5], min_length=1, max_length=MAX_K_VALUES)
    protocol: EvaluationProtocol = Field(default_factory=EvaluationProtocol)
    volume_images_per_night: int | None = Field(
        None, ge=1, le=10**12, description="Cost projection volume for the evaluation."
    )


class IngestBatch(Message):
    """List, validate and label a source prefix as batch ``batch_id``, then run ``plan``."""

    task: ClassVar[str] = "kiban.ingest.batch"
    queue: ClassVar[str] = "ingest"
    service: ClassVar[str] = "ingest"
    example: ClassVar[dict[str, Any]] = {
        "batch_id": "night-2026-11-28",
        "source": "s3://images/incoming/2026-11-28/",
        "manifest": "s3://images/incoming/2026-11-28/manifest.csv",
        "plan": {"models": ["kimianet", "plip"]},
    }

    kind: Literal["ingest_batch"] = "ingest_batch"
    batch_id: Name
    source: Uri = Field(
        description="file:///dir, s3://bucket/prefix or synthetic://textures?n=N (load tests)"
    )
    manifest: Uri | None = Field(None, description="URI of a CSV/JSONL manifest")
    chunk_size: int = Field(256, ge=1, le=MAX_CHUNK_SIZE, description="Images per chunk")
    plan: RunPlan = Field(default_factory=RunPlan)


RUN_PATTERN = r"^[0-9a-f]{32}$"


class ValidatePage(Message):
    """Read, hash and validate one listing page of an ingest run (any ingest worker).

    Written by the IngestBatch task (the planner) as soon as the page is listed; the result
    goes to ``batches/<batch_id>/ingest/validated/``. Idempotent: a page already validated
    with the same content and image limits is not read again.
    """

    task: ClassVar[str] = "kiban.ingest.validate_page"
    queue: ClassVar[str] = "ingest"
    service: ClassVar[str] = "ingest"
    example: ClassVar[dict[str, Any]] = {
        "batch_id": "night-2026-11-28",
        "run": "6f1c0d3a9b2e4c5d8e7f6a5b4c3d2e1f",
        "page": 0,
    }

    kind: Literal["validate_page"] = "validate_page"
    batch_id: Name
    run: str = Field(pattern=RUN_PATTERN, description="The ingest run (set by the planner)")
    page: int = Field(ge=0, le=MAX_PAGE_INDEX)


class ReduceIngest(Message):
    """De-duplicate an ingest run's pages in key order, write chunk records as they fill
    (sending their encode messages), then the batch's records, quarantine and batch.json."""

    task: ClassVar[str] = "kiban.ingest.reduce"
    queue: ClassVar[str] = "ingest"
    service: ClassVar[str] = "ingest"
    example: ClassVar[dict[str, Any]] = {
        "batch_id": "night-2026-11-28",
        "run": "6f1c0d3a9b2e4c5d8e7f6a5b4c3d2e1f",
        "plan": {"models": ["kimianet", "plip"]},
    }

    kind: Literal["reduce_ingest"] = "reduce_ingest"
    batch_id: Name
    run: str = Field(pattern=RUN_PATTERN, description="The ingest run (set by the planner)")
    chunk_size: int = Field(256, ge=1, le=MAX_CHUNK_SIZE, description="Images per chunk")
    plan: RunPlan = Field(default_factory=RunPlan)


class ChunkMessage(Message):
    """One planned chunk of a batch with one model: the unit of encoder and indexer work."""

    batch_id: Name
    model: Name
    chunk: int = Field(ge=0, le=MAX_CHUNK_INDEX)
    plan: RunPlan | None = None


class EncodeChunk(ChunkMessage):
    """Encode one planned chunk of a batch with one model and write one shard."""

    task: ClassVar[str] = "kiban.encoder.encode_chunk"
    queue: ClassVar[str] = "encode"
    service: ClassVar[str] = "encoder"
    example: ClassVar[dict[str, Any]] = {
        "batch_id": "night-2026-11-28",
        "model": "plip",
        "chunk": 0,
    }

    kind: Literal["encode_chunk"] = "encode_chunk"

    def route(self, settings: Settings) -> str:
        """Encoder pools: ``KIBAN_ENCODE_POOLS`` sends a model's chunks to ``encode.<pool>``."""
        return settings.encode_queue_for(self.model)


class IndexShard(ChunkMessage):
    """Upsert one stored shard into the model's Qdrant collection."""

    task: ClassVar[str] = "kiban.encoder.index_shard"
    queue: ClassVar[str] = "index"
    service: ClassVar[str] = "indexer"
    example: ClassVar[dict[str, Any]] = {
        "batch_id": "night-2026-11-28",
        "model": "plip",
        "chunk": 0,
    }

    kind: Literal["index_shard"] = "index_shard"


class EvaluateBatch(Message):
    """Compute the retrieval and cost report of a batch for some models."""

    task: ClassVar[str] = "kiban.reporter.evaluate_batch"
    queue: ClassVar[str] = "report"
    service: ClassVar[str] = "reporter"
    example: ClassVar[dict[str, Any]] = {
        "batch_id": "night-2026-11-28",
        "models": ["kimianet", "plip"],
        "protocol": {"name": "leave-one-group-out"},
    }

    kind: Literal["evaluate_batch"] = "evaluate_batch"
    batch_id: Name
    models: list[Name] = Field(min_length=1, max_length=MAX_MODELS)
    k: list[K] = Field(default_factory=lambda: [1, 3, 5], min_length=1, max_length=MAX_K_VALUES)
    protocol: EvaluationProtocol = Field(default_factory=EvaluationProtocol)
    request_id: str | None = Field(
        None, max_length=64, description="Set by the workflow; recorded in the report."
    )
    volume_images_per_night: int | None = Field(
        None,
        ge=1,
        le=10**12,
        description="Cost projection volume; default KIBAN_VOLUME_IMAGES_PER_NIGHT.",
    )


class NightlyRun(Message):
    """Sent by the schedule: ingest and evaluate the night's prefix (KIBAN_SCHEDULE_*)."""

    task: ClassVar[str] = "kiban.ingest.nightly"
    queue: ClassVar[str] = "ingest"
    service: ClassVar[str] = "ingest"
    example: ClassVar[dict[str, Any]] = {"date": "2026-11-28"}

    kind: Literal["nightly_run"] = "nightly_run"
    date: str | None = Field(
        None, pattern=r"^\d{4}-\d{2}-\d{2}$", description="YYYY-MM-DD; default: today (UTC)"
    )


class ReindexModel(Message):
    """Re-upsert a model's stored shards into Qdrant (no re-encoding)."""

    task: ClassVar[str] = "kiban.encoder.reindex_model"
    queue: ClassVar[str] = "index"
    service: ClassVar[str] = "indexer"
    example: ClassVar[dict[str, Any]] = {"model": "plip"}

    kind: Literal["reindex_model"] = "reindex_model"
    model: Name
    batches: list[Name] = Field(
        default_factory=list, max_length=MAX_BATCHES, description="Default: every batch."
    )


class ExportReport(Message):
    """Copy a batch's report (JSON + Markdown) to another object-store prefix."""

    task: ClassVar[str] = "kiban.reporter.export_report"
    queue: ClassVar[str] = "report"
    service: ClassVar[str] = "reporter"
    example: ClassVar[dict[str, Any]] = {
        "batch_id": "night-2026-11-28",
        "destination": "s3://reports-team/kiban/",
    }

    kind: Literal["export_report"] = "export_report"
    batch_id: Name
    report_version: str | None = Field(None, pattern=r"^\d{4}$", description="Default: the latest.")
    destination: Uri = Field(description="file:///dir or s3://bucket/prefix")


class TrainSpecialist(Message):
    """Train a domain specialist from labelled batches and publish it to the registry.

    ``head``: a small projection on the base model's *stored* embeddings of ``batches`` (no
    image is re-read), exported with the base as one ONNX graph. ``finetune``: the base
    network's weights trained on the images. Only the training side of each batch is used:
    images whose manifest split is not ``holdout_split``, or — without manifest splits — the
    groups the split protocol's hash puts on the index side (the same rule the reporter uses).
    """

    task: ClassVar[str] = "kiban.trainer.train_specialist"
    queue: ClassVar[str] = "train"
    service: ClassVar[str] = "trainer"
    example: ClassVar[dict[str, Any]] = {
        "batches": ["night-2026-11-27", "night-2026-11-28"],
        "base": "effnet-lite0",
        "name": "effnet-head",
        "mode": "head",
    }

    kind: Literal["train_specialist"] = "train_specialist"
    batches: list[Name] = Field(min_length=1, max_length=MAX_BATCHES)
    base: str = Field(
        min_length=1,
        max_length=512,
        description="head: a registry model with stored embeddings of the batches; "
        "finetune: a registry model (its export spec is rebuilt) or an export spec",
    )
    name: Name = Field(description="Registry name of the trained model")
    mode: Literal["head", "finetune"] = "head"
    epochs: int | None = Field(
        None,
        ge=1,
        le=10_000,
        description="Default: head 40, fewer on large sets (>= 1,000 steps, >= 5); finetune 3",
    )
    seed: int = Field(0, ge=0, le=MAX_SEED)
    holdout_split: str = Field(
        "test", min_length=1, max_length=64, description="Split never trained on"
    )
    test_fraction: float = Field(
        0.2, gt=0, lt=1, description="Without manifest splits: share of groups held out"
    )
    request_id: str | None = Field(None, max_length=64)


def registry() -> dict[str, type[Message]]:
    """Every message kind and its class, in definition order (the README documents each)."""
    return dict(_REGISTRY)


def by_task(task: str) -> type[Message] | None:
    """The message class a Celery task name serves, if any."""
    return next((cls for cls in _REGISTRY.values() if cls.task == task), None)


def task_queues() -> dict[str, str]:
    """Task name → default queue, for Celery's routing table."""
    return {cls.task: cls.queue for cls in _REGISTRY.values()}


def service_queues(service: str) -> tuple[str, ...]:
    """The queues a service's worker consumes by default, in registry order."""
    return tuple(dict.fromkeys(c.queue for c in _REGISTRY.values() if c.service == service))


def _format_errors(name: str, exc: ValidationError) -> InvalidMessageError:
    reasons = "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in exc.errors()
    )
    return InvalidMessageError(f"invalid {name} message: {reasons}")


def parse_message(payload: Any, expected: type[M]) -> M:
    """Validate ``payload`` as ``expected``; raise InvalidMessageError with the reason."""
    try:
        return expected.model_validate(payload)
    except ValidationError as exc:
        raise _format_errors(expected.__name__, exc) from None


@functools.cache
def _union_adapter(kinds: tuple[type[Message], ...]) -> TypeAdapter[Any]:
    union = Union[kinds]  # type: ignore[valid-type]  # noqa: UP007 - built from the registry
    return TypeAdapter(Annotated[union, Field(discriminator="kind")])


def parse_any(payload: Any) -> Message:
    """Validate a message of any registered kind, chosen by its ``kind`` field.

    The union is discriminated by ``kind``, so the reason names the one schema that was
    meant, not every schema that failed.
    """
    try:
        message = _union_adapter(tuple(_REGISTRY.values())).validate_python(payload)
    except ValidationError as exc:
        raise _format_errors("queue", exc) from None
    assert isinstance(message, Message)
    return message


def is_valid_name(value: str) -> bool:
    return re.match(NAME_PATTERN, value) is not None
