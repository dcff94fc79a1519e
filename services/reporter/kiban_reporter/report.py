"""The report document: a versioned JSON schema; the Markdown is rendered from it.

Schema ``kiban.report`` version 2 (every field documented in docs/report.md). Reports are never
overwritten: each evaluation writes ``reports/<batch>/<version>/`` with the next version.

v3 over v2: ``decision`` (first line, Pareto front, non-inferiority), ``learning_curves``,
``trend``, ``leakage``, and the cost section's projection, latency, device-seconds and storage.

v2 over v1: ``protocol`` records the requested and resolved protocol, query / candidate counts,
the split assignment, the cross-batch history and the query sample; every model has an
``ann_check`` (Qdrant vs exact top-k). All v1 keys keep their meaning.

``models[i].retrieval`` and ``comparisons`` are the metrics engine's own result types, so the
JSON written is exactly their ``model_dump(mode="json")`` and a report read back with
``Report.model_validate`` is typed all the way down.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from kiban.progress import ChunkFailure
from kiban.records import LabelConflict
from kiban_reporter.ann_check import AnnCheck
from kiban_reporter.cost import CostSummary
from kiban_reporter.decision_schema import Decision, LeakageCheck, LearningCurves, Trend
from kiban_reporter.metrics import PairComparison, RetrievalResult
from kiban_reporter.protocols import CrossBatchHistory, QuerySample, SplitAssignment

REPORT_SCHEMA = "kiban.report"
REPORT_SCHEMA_VERSION = 3


class BatchSummary(BaseModel):
    source: str
    manifest: str | None
    label_source: str
    n_listed: int
    n_accepted: int
    n_quarantined: int
    n_duplicates: int
    labelled: bool
    classes: list[str]
    quarantine_reasons: dict[str, int] = Field(description="Reason (first clause) → count.")
    quarantine: list[dict[str, str | None]] = Field(description="Up to 100 entries.")
    n_label_conflicts: int = Field(
        0, description="Byte-identical images whose keys carry different labels."
    )
    label_conflicts: list[LabelConflict] = Field(
        default_factory=list,
        description="Up to 100 label conflicts: the record keeps the label of its first key "
        "(code-point order); the other keys' labels are dropped.",
    )


class SearchScope(BaseModel):
    """What is exact at which size: every query in memory, or a sample streamed over shards."""

    mode: Literal["in-memory", "streamed"] = Field(
        description="in-memory: every vector loaded, the protocol's queries searched exactly; "
        "streamed: the batch is above KIBAN_EVAL_EXACT_MAX_VECTORS, a seeded class-stratified "
        "query sample is searched exactly against the full index, one shard at a time"
    )
    statement: str = Field(description="the scope in one sentence, as the report states it")
    n_rows: int = Field(description="images of this batch (encoded by every model)")
    exact_max_vectors: int = Field(description="KIBAN_EVAL_EXACT_MAX_VECTORS when evaluated")
    n_shards: int | None = Field(None, description="streamed: shards read per model and pass")


class Protocol(BaseModel):
    name: str = Field(
        description="resolved: leave-one-out | leave-one-group-out | split | cross-batch | "
        "none (not scored)"
    )
    requested: str = Field(
        "auto",
        description="as asked: auto | leave-one-out | leave-one-group-out | split | cross-batch",
    )
    exclusion: str | None = Field(None, description="what a query never matches")
    ordering: str = Field(
        "rows sorted by (batch, key); equal similarities rank the smaller (batch, key) first",
        description="the tie rule's key",
    )
    ks: list[int]
    headline_k: int
    bootstrap_resamples: int
    seed: int
    confidence: float
    n_images: int = Field(0, description="rows evaluated (this batch + history)")
    n_queries: int = Field(0, description="query images (after the sample)")
    n_candidates: int = Field(0, description="searchable images")
    n_left_out: int = Field(
        0, description="images of this batch not encoded by every model (left out)"
    )
    query_split: str | None = None
    split: SplitAssignment | None = None
    history: CrossBatchHistory | None = None
    query_sample: QuerySample | None = None
    ann_check_queries: int = 0
    search: SearchScope | None = Field(
        None, description="exact all-vs-all in memory or sampled and streamed (null: older reports)"
    )
    definitions: str = "docs/report.md#definitions"


class ModelSection(BaseModel):
    name: str
    family: str
    source: str
    architecture: str
    weights: str
    pretrained: bool
    embedding_dim: int
    params: int
    model_sha256: str
    parity_min_cosine: float | None
    images_encoded: int
    encode_failures: list[tuple[str, str]]
    retrieval: RetrievalResult | None = Field(
        description="kiban_reporter.metrics.RetrievalResult (its per-query arrays are never "
        "written), or null when not scored."
    )
    cost: CostSummary
    ann_check: AnnCheck | None = Field(
        None, description="Qdrant's top-k vs the exact top-k (null when not scored)"
    )


class Report(BaseModel):
    schema_name: str = Field(REPORT_SCHEMA, alias="schema")
    schema_version: int = REPORT_SCHEMA_VERSION
    version: str
    request_id: str | None
    batch_id: str
    created_at: str
    batch: BatchSummary
    protocol: Protocol
    models: list[ModelSection]
    comparisons: list[PairComparison] = Field(
        description="kiban_reporter.metrics.PairComparison per model pair."
    )
    verdicts: list[str] = Field(description="One line per model pair on the headline metric.")
    failed_chunks: list[ChunkFailure] = Field(
        default_factory=list,
        description="Chunks a stage gave up on (dead-lettered): left out, with the reason.",
    )
    decision: Decision | None = Field(
        None, description="Which model to run and why (null when nothing was scored)."
    )
    learning_curves: LearningCurves | None = None
    trend: Trend | None = None
    leakage: list[LeakageCheck] = Field(
        default_factory=list, description="Trained models' training sets vs this evaluation."
    )
    warnings: list[str]

    model_config = {"populate_by_name": True}

    def to_json(self) -> str:
        return self.model_dump_json(indent=2, by_alias=True)
