"""The report document: a versioned JSON schema; the Markdown is rendered from it.

Schema ``kiban.report`` version 1 (documented in docs/report.md). Reports are never
overwritten: each evaluation writes ``reports/<batch>/<version>/`` with the next version.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from kiban_reporter.cost import CostSummary

REPORT_SCHEMA = "kiban.report"
REPORT_SCHEMA_VERSION = 1


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


class Protocol(BaseModel):
    name: str = Field(description="leave-one-out | leave-one-group-out | none (unlabelled)")
    ks: list[int]
    headline_k: int
    bootstrap_resamples: int
    seed: int
    confidence: float
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
    retrieval: dict[str, Any] | None = Field(
        description="kiban_reporter.metrics.RetrievalResult, or null when not scored."
    )
    cost: CostSummary


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
    comparisons: list[dict[str, Any]] = Field(
        description="kiban_reporter.metrics.PairComparison per model pair."
    )
    verdicts: list[str] = Field(description="One line per model pair on the headline metric.")
    warnings: list[str]

    model_config = {"populate_by_name": True}

    def to_json(self) -> str:
        return self.model_dump_json(indent=2, by_alias=True)
