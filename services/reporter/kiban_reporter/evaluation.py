"""The reporter's task work: stored shards → protocol → metrics per model → ANN check → report.

The evaluation reads embeddings from the shards in the object store, never from Qdrant, so it
is exact, reproducible and possible while the vector database is down; Qdrant is consulted
only for the ANN check (``kiban_reporter.ann_check``), whose failure is a warning.
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from datetime import datetime, timezone

import numpy as np

from kiban.context import Context
from kiban.errors import StoreError
from kiban.messages import EvaluateBatch
from kiban.models.registry import load_card
from kiban.records import (
    BatchInfo,
    ImageRecord,
    latest_report_version,
    read_batch_info,
    read_quarantine,
    read_records,
    report_prefix,
    shard_key,
)
from kiban_reporter.ann_check import AnnCheck, ann_check
from kiban_reporter.cost import summarise_cost
from kiban_reporter.embeddings import BatchEmbeddings, load_batch_embeddings
from kiban_reporter.markdown import render_markdown
from kiban_reporter.metrics import RetrievalResult, compare, evaluate
from kiban_reporter.protocols import EvalRow, ProtocolPlan, plan_protocol
from kiban_reporter.report import BatchSummary, ModelSection, Protocol, Report

log = logging.getLogger(__name__)


def headline_k(ks: list[int]) -> int:
    """MV@5 is the paper's headline; otherwise the largest k asked for."""
    return 5 if 5 in ks else max(ks)


def next_version(ctx: Context, batch_id: str) -> str:
    latest = latest_report_version(ctx.store, batch_id)
    return f"{int(latest) + 1:04d}" if latest else "0001"


def _created(info: BatchInfo) -> datetime:
    try:
        stamp = datetime.fromisoformat(info.created_at)
    except ValueError:
        return datetime.min.replace(tzinfo=timezone.utc)
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=timezone.utc)


def _fully_encoded(ctx: Context, info: BatchInfo, models: list[str]) -> bool:
    return bool(info.chunks) and all(
        ctx.store.exists(shard_key(m, info.batch_id, c.index).removesuffix(".npz") + ".json")
        for m in models
        for c in info.chunks
    )


def resolve_history(
    ctx: Context, msg: EvaluateBatch, info: BatchInfo
) -> tuple[list[BatchInfo], bool, list[str]]:
    """Cross-batch: the earlier batches (oldest first), whether discovered, and warnings.

    Given ``history_batches``: those, each checked. Otherwise every other batch in the store
    with complete embeddings for all the models, labels, and an older ``created_at``.
    """
    warnings: list[str] = []
    given = list(msg.protocol.history_batches)
    discovered = not given
    if discovered:
        ids = {
            i.key.split("/")[2]
            for i in ctx.store.list(f"embeddings/{msg.models[0]}")
            if i.key.count("/") >= 3
        }
    else:
        ids = set(given)
    infos: list[BatchInfo] = []
    for bid in sorted(ids):
        if bid == msg.batch_id:
            if not discovered:
                warnings.append(f"cross-batch: {bid} is this batch; not used as history")
            continue
        try:
            other = read_batch_info(ctx.store, bid)
        except StoreError:
            warnings.append(f"cross-batch: history batch {bid!r} does not exist; skipped")
            continue
        if not _fully_encoded(ctx, other, msg.models):
            if not discovered:
                warnings.append(
                    f"cross-batch: {bid} is not fully encoded with {', '.join(msg.models)}; skipped"
                )
            continue
        if not other.labelled:
            if not discovered:
                warnings.append(f"cross-batch: {bid} has no labels; skipped")
            continue
        if discovered and _created(other) >= _created(info):
            continue
        infos.append(other)
    infos.sort(key=lambda b: (_created(b), b.batch_id))
    return infos, discovered, warnings


def _load_rows(
    ctx: Context, info: BatchInfo, records: list[ImageRecord], models: list[str]
) -> tuple[list[EvalRow], dict[str, np.ndarray], int]:
    """A batch's stored embeddings for every model, restricted to images all models encoded."""
    per_model = {m: load_batch_embeddings(ctx.store, info, records, m) for m in models}
    return _common_rows(info.batch_id, per_model)


def _common_rows(
    batch_id: str, per_model: dict[str, BatchEmbeddings]
) -> tuple[list[EvalRow], dict[str, np.ndarray], int]:
    """Rows encoded by every model (key order) and each model's vectors for them."""
    keysets = [{r.key for r in e.records} for e in per_model.values()]
    common = set.intersection(*keysets) if keysets else set()
    union = set.union(*keysets) if keysets else set()
    rows: list[EvalRow] = []
    vectors: dict[str, np.ndarray] = {}
    for model, emb in per_model.items():
        take = [i for i, r in enumerate(emb.records) if r.key in common]
        vectors[model] = emb.vectors[take] if take else np.zeros((0, 1), np.float32)
        if not rows:
            rows = [
                EvalRow(batch_id, r.key, r.sha256, r.label, r.group, r.split)
                for r in (emb.records[i] for i in take)
            ]
    return rows, vectors, len(union) - len(common)


def evaluate_batch(msg: EvaluateBatch, ctx: Context) -> Report:
    proto = msg.protocol
    info = read_batch_info(ctx.store, msg.batch_id)
    records = read_records(ctx.store, msg.batch_id)
    quarantine = read_quarantine(ctx.store, msg.batch_id)
    ks = sorted(set(msg.k))
    hk = headline_k(ks)
    scored = info.labelled
    warnings: list[str] = []
    if not scored:
        warnings.append("batch has no labels: embedded and indexed, not scored")

    cards = {m: load_card(ctx.store, m) for m in msg.models}

    # Rows: this batch (and, cross-batch, the history), sorted by (batch, key).
    parts: list[tuple[str, list[EvalRow], dict[str, np.ndarray]]] = []
    current = {m: load_batch_embeddings(ctx.store, info, records, m) for m in msg.models}
    rows_cur, vecs_cur, n_left_out = _common_rows(msg.batch_id, current)
    if n_left_out:
        warnings.append(
            f"{n_left_out} images are not encoded by every model; left out so that the models "
            "are compared on the same images"
        )
    parts.append((msg.batch_id, rows_cur, vecs_cur))
    history_ids: list[str] = []
    discovered = False
    if scored and proto.name == "cross-batch":
        infos, discovered, hist_warnings = resolve_history(ctx, msg, info)
        warnings.extend(hist_warnings)
        for other in infos:
            other_records = read_records(ctx.store, other.batch_id)
            hrows, hvecs, hleft = _load_rows(ctx, other, other_records, msg.models)
            if hleft:
                warnings.append(
                    f"cross-batch: {hleft} images of {other.batch_id} are not encoded by every "
                    "model; left out"
                )
            parts.append((other.batch_id, hrows, hvecs))
            history_ids.append(other.batch_id)
    parts.sort(key=lambda p: p[0])
    rows = [r for _, prows, _ in parts for r in prows]
    vectors = {
        m: (
            np.concatenate([p[2][m] for p in parts if len(p[1])])
            if rows
            else np.zeros((0, cards[m].embedding_dim), np.float32)
        )
        for m in msg.models
    }

    plan: ProtocolPlan | None = None
    if scored:
        plan = plan_protocol(proto, rows, msg.batch_id, history_ids, discovered)
        warnings.extend(plan.warnings)
    scope = history_ids if proto.name == "cross-batch" else [msg.batch_id]
    do_score = plan is not None and not (plan.name == "cross-batch" and not history_ids)

    sections: list[ModelSection] = []
    results: dict[str, RetrievalResult] = {}
    for model in msg.models:
        card = cards[model]
        emb = current[model]
        result = None
        ann: AnnCheck | None = None
        if do_score and plan is not None and rows:
            result = evaluate(
                vectors[model],
                [r.label for r in rows],
                plan.groups,
                ks=ks,
                query_mask=plan.query_mask,
                candidate_mask=plan.candidate_mask,
                bootstrap=proto.bootstrap,
                seed=proto.seed,
                name=model,
            )
            results[model] = result
            warnings.extend(f"{model}: {w}" for w in result.warnings)
            ann = ann_check(
                lambda: _vector_index(ctx),
                model,
                rows,
                vectors[model],
                result,
                plan,
                scope,
                k=max(ks),
                n_queries=proto.ann_check_queries,
                seed=proto.seed,
            )
            if ann.status == "failed":
                warnings.append(f"{model}: ANN check failed (Qdrant): {ann.reason}")
            elif ann.status == "skipped" and proto.ann_check_queries:
                warnings.append(f"{model}: ANN check skipped: {ann.reason}")
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
                ann_check=ann,
            )
        )
        if not card.pretrained:
            warnings.append(
                f"{model}: no trained weights (random initialisation) — a baseline only"
            )

    comparisons = []
    verdicts = []
    for a, b in itertools.combinations([m for m in msg.models if m in results], 2):
        if results[a].per_query is None or results[b].per_query is None:
            warnings.append(f"{a} vs {b}: no evaluated queries, not compared")
            continue
        try:
            pair = compare(results[a], results[b])
        except ValueError as exc:
            warnings.append(f"{a} vs {b}: not compared ({exc})")
            continue
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
            name=plan.name if plan is not None else "none",
            requested=proto.name,
            exclusion=plan.exclusion if plan else None,
            ks=ks,
            headline_k=hk,
            bootstrap_resamples=proto.bootstrap,
            seed=proto.seed,
            confidence=0.95,
            n_images=len(rows),
            n_queries=plan.n_queries if plan else 0,
            n_candidates=plan.n_candidates if plan else 0,
            n_left_out=n_left_out,
            query_split=proto.query_split if proto.name == "split" else None,
            split=plan.split if plan else None,
            history=plan.history if plan else None,
            query_sample=plan.sample if plan else None,
            ann_check_queries=proto.ann_check_queries,
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


def _vector_index(ctx: Context):  # type: ignore[no-untyped-def]
    from kiban.tasks import vector_index

    return vector_index(ctx.settings)
