"""The reporter's task work: stored shards of a batch → metrics per model → report."""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from datetime import datetime, timezone

from kiban.context import Context
from kiban.messages import EvaluateBatch
from kiban.models.registry import load_card
from kiban.records import (
    latest_report_version,
    read_batch_info,
    read_quarantine,
    read_records,
    report_prefix,
)
from kiban_reporter.cost import summarise_cost
from kiban_reporter.embeddings import load_batch_embeddings
from kiban_reporter.markdown import render_markdown
from kiban_reporter.metrics import RetrievalResult, compare, evaluate
from kiban_reporter.report import BatchSummary, ModelSection, Protocol, Report

log = logging.getLogger(__name__)

BOOTSTRAP_RESAMPLES = 1000
SEED = 0


def headline_k(ks: list[int]) -> int:
    """MV@5 is the paper's headline; otherwise the largest k asked for."""
    return 5 if 5 in ks else max(ks)


def next_version(ctx: Context, batch_id: str) -> str:
    latest = latest_report_version(ctx.store, batch_id)
    return f"{int(latest) + 1:04d}" if latest else "0001"


def evaluate_batch(msg: EvaluateBatch, ctx: Context) -> Report:
    info = read_batch_info(ctx.store, msg.batch_id)
    records = read_records(ctx.store, msg.batch_id)
    quarantine = read_quarantine(ctx.store, msg.batch_id)
    ks = sorted(set(msg.k))
    hk = headline_k(ks)
    grouped = any(r.group for r in records)
    scored = info.labelled
    warnings: list[str] = []
    if not scored:
        warnings.append("batch has no labels: embedded and indexed, not scored")

    sections: list[ModelSection] = []
    results: dict[str, RetrievalResult] = {}
    for model in msg.models:
        card = load_card(ctx.store, model)
        emb = load_batch_embeddings(ctx.store, info, records, model)
        result = None
        if scored and len(emb.records):
            result = evaluate(
                emb.vectors,
                [r.label for r in emb.records],
                [r.group for r in emb.records] if grouped else None,
                ks=ks,
                bootstrap=BOOTSTRAP_RESAMPLES,
                seed=SEED,
                name=model,
            )
            results[model] = result
            warnings.extend(f"{model}: {w}" for w in result.warnings)
        sections.append(
            ModelSection(
                name=model,
                family=card.family,
                source=card.source,
                architecture=card.architecture,
                weights=card.weights,
                pretrained=card.pretrained,
                embedding_dim=card.embedding_dim,
                params=card.params,
                model_sha256=card.sha256,
                parity_min_cosine=card.parity.min_cosine if card.parity else None,
                images_encoded=len(emb.records),
                encode_failures=emb.failures,
                retrieval=result.summary() if result else None,
                cost=summarise_cost(
                    emb.timings,
                    card,
                    ctx.settings.price_per_hour,
                    ctx.settings.price_currency,
                    ctx.settings.device_label,
                ),
            )
        )
        if not card.pretrained:
            warnings.append(
                f"{model}: no trained weights (random initialisation) — a baseline only"
            )

    comparisons = []
    verdicts = []
    for a, b in itertools.combinations([m for m in msg.models if m in results], 2):
        if results[a].n_queries != results[b].n_queries:
            warnings.append(f"{a} vs {b}: different query sets, not paired")
            continue
        pair = compare(results[a], results[b])
        comparisons.append(pair.summary())
        warnings.extend(f"{a} vs {b}: {w}" for w in pair.warnings)
        for diff in pair.differences:
            if diff.key == "mv_macro_f1" and diff.k == hk:
                verdicts.append(diff.verdict)

    reasons = Counter(q.reason.split(":")[0] for q in quarantine)
    report = Report(
        version=next_version(ctx, msg.batch_id),
        request_id=msg.request_id,
        batch_id=msg.batch_id,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        batch=BatchSummary(
            source=info.source,
            manifest=info.manifest,
            label_source=info.label_source,
            n_listed=info.n_listed,
            n_accepted=info.n_accepted,
            n_quarantined=info.n_quarantined,
            n_duplicates=info.n_duplicates,
            labelled=info.labelled,
            classes=info.classes,
            quarantine_reasons=dict(sorted(reasons.items())),
            quarantine=[q.model_dump() for q in quarantine[:100]],
        ),
        protocol=Protocol(
            name=("leave-one-group-out" if grouped else "leave-one-out") if scored else "none",
            ks=ks,
            headline_k=hk,
            bootstrap_resamples=BOOTSTRAP_RESAMPLES,
            seed=SEED,
            confidence=0.95,
        ),
        models=sections,
        comparisons=comparisons,
        verdicts=verdicts,
        warnings=warnings,
    )
    prefix = f"{report_prefix(msg.batch_id)}/{report.version}"
    ctx.store.put(f"{prefix}/report.json", report.to_json().encode())
    ctx.store.put(f"{prefix}/report.md", render_markdown(report).encode())
    log.info("report %s/%s written", msg.batch_id, report.version)
    return report
