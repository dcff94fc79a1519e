"""The reporter's task work: stored shards → protocol → metrics per model → ANN check → report.

The evaluation reads embeddings from the shards in the object store, never from Qdrant, so it
is exact, reproducible and possible while the vector database is down; Qdrant is consulted
only for the ANN check (``kiban_reporter.ann_check``), whose failure is a warning.
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING

import numpy as np

from kiban.context import Context
from kiban.errors import StoreError
from kiban.messages import EvaluateBatch
from kiban.models.card import ModelCard
from kiban.models.registry import load_card
from kiban.progress import ChunkFailure, read_failures
from kiban.records import (
    BatchInfo,
    QuarantineEntry,
    latest_report_version,
    read_batch_info,
    read_quarantine,
    read_records,
    report_prefix,
)
from kiban.shards import ShardMeta, is_complete, shard_batches
from kiban_reporter.ann_check import AnnCheck, ann_check
from kiban_reporter.cost import cost_warnings, payload_bytes, summarise_cost
from kiban_reporter.decision import decide
from kiban_reporter.decision_schema import LearningCurves
from kiban_reporter.embeddings import BatchEmbeddings, load_batch_embeddings
from kiban_reporter.html import render_html
from kiban_reporter.leakage import Leakage, check_leakage, exclude_queries, training_sets
from kiban_reporter.learning_curve import learning_curves
from kiban_reporter.markdown import render_markdown
from kiban_reporter.metrics import PairComparison, RetrievalResult, compare, evaluate
from kiban_reporter.protocols import EvalRow, ProtocolPlan, plan_protocol
from kiban_reporter.report import BatchSummary, ModelSection, Protocol, Report, SearchScope
from kiban_reporter.streamed import plan_streamed, scan_batch, score_streamed
from kiban_reporter.trend import build_trend

if TYPE_CHECKING:
    from kiban.vectors import VectorIndex

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
        is_complete(ctx.store, m, info.batch_id, c.index) for m in models for c in info.chunks
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
    ids = shard_batches(ctx.store, msg.models[0]) if discovered else set(given)
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


def _load_batch(
    ctx: Context, info: BatchInfo, models: list[str]
) -> tuple[dict[str, BatchEmbeddings], BatchRows, int]:
    """A batch's stored embeddings per model, and the rows every model encoded."""
    records = read_records(ctx.store, info.batch_id)
    per_model = {m: load_batch_embeddings(ctx.store, info, records, m) for m in models}
    rows, vectors, n_left_out = _common_rows(info.batch_id, per_model)
    return per_model, BatchRows(info.batch_id, rows, vectors), n_left_out


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


@dataclass(frozen=True)
class BatchRows:
    """One batch's share of the evaluation: its rows in key order, each model's vectors."""

    batch_id: str
    rows: list[EvalRow]
    vectors: dict[str, np.ndarray]


@dataclass
class EvaluationRows:
    """What every model is scored on — the same rows for all, so they compare fairly.

    ``rows`` are this batch's images (and, cross-batch, the history's) in (batch, key) order,
    the tie rule; ``vectors`` are aligned with them. ``current`` keeps this batch's embeddings
    as loaded, for each model's encode counts and cost.
    """

    rows: list[EvalRow]
    vectors: dict[str, np.ndarray]
    current: dict[str, BatchEmbeddings]
    n_left_out: int
    history: list[str] = field(default_factory=list)
    discovered: bool = False
    warnings: list[str] = field(default_factory=list)


@dataclass
class ModelScore:
    """One model's outcome: exact metrics and the ANN check (``None`` when not scored)."""

    result: RetrievalResult | None = None
    ann: AnnCheck | None = None
    warnings: list[str] = field(default_factory=list)


@dataclass
class Comparisons:
    """The paired comparisons of the scored models, their headline verdicts, and warnings."""

    pairs: list[PairComparison] = field(default_factory=list)
    verdicts: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _load_history(
    ctx: Context, msg: EvaluateBatch, info: BatchInfo
) -> tuple[list[BatchRows], bool, list[str]]:
    """Cross-batch: the earlier batches' rows, whether they were discovered, and warnings.

    History batches only supply candidates, so only their common rows are kept.
    """
    infos, discovered, warnings = resolve_history(ctx, msg, info)
    parts: list[BatchRows] = []
    for other in infos:
        _, part, n_left_out = _load_batch(ctx, other, msg.models)
        if n_left_out:
            warnings.append(
                f"cross-batch: {n_left_out} images of {other.batch_id} are not encoded by every "
                "model; left out"
            )
        parts.append(part)
    return parts, discovered, warnings


def _concatenate(
    parts: Sequence[BatchRows], cards: dict[str, ModelCard]
) -> tuple[list[EvalRow], dict[str, np.ndarray]]:
    """All parts' rows in (batch, key) order and each model's vectors stacked to match.

    The protocols and the metrics rank ties by row order, so the order is part of the result.
    With no row at all each model gets an empty ``[0, dim]`` matrix.
    """
    ordered = sorted(parts, key=lambda p: p.batch_id)
    rows = [r for p in ordered for r in p.rows]
    vectors = {
        m: (
            np.concatenate([p.vectors[m] for p in ordered if p.rows])
            if rows
            else np.zeros((0, card.embedding_dim), np.float32)
        )
        for m, card in cards.items()
    }
    return rows, vectors


def left_out_warning(n_left_out: int) -> str:
    """The same words whichever path evaluated: images some model did not encode."""
    return (
        f"{n_left_out} images are not encoded by every model; left out so that the models "
        "are compared on the same images"
    )


def load_evaluation_rows(
    ctx: Context, msg: EvaluateBatch, info: BatchInfo, cards: dict[str, ModelCard]
) -> EvaluationRows:
    """The rows and vectors to score: this batch and, for a scored cross-batch, its history.

    Images some model did not encode are left out (and warned), so that every model is scored
    on exactly the same images.
    """
    # The full embeddings are kept: the report states each model's own encode count,
    # failures and cost, not just those of the common rows.
    current, part, n_left_out = _load_batch(ctx, info, msg.models)
    warnings: list[str] = []
    if n_left_out:
        warnings.append(left_out_warning(n_left_out))
    history: list[BatchRows] = []
    discovered = False
    if info.labelled and msg.protocol.name == "cross-batch":
        history, discovered, history_warnings = _load_history(ctx, msg, info)
        warnings.extend(history_warnings)
    rows, vectors = _concatenate([part, *history], cards)
    return EvaluationRows(
        rows=rows,
        vectors=vectors,
        current=current,
        n_left_out=n_left_out,
        history=[p.batch_id for p in history],
        discovered=discovered,
        warnings=warnings,
    )


def plan_evaluation(
    msg: EvaluateBatch, info: BatchInfo, data: EvaluationRows
) -> ProtocolPlan | None:
    """The resolved protocol, or ``None`` for a batch without labels (nothing to score)."""
    if not info.labelled:
        return None
    return plan_protocol(msg.protocol, data.rows, msg.batch_id, data.history, data.discovered)


def _is_scored(plan: ProtocolPlan | None, data: EvaluationRows) -> bool:
    """Whether metrics are computed: a plan, some rows, and for cross-batch some history.

    Cross-batch without an earlier batch has no candidate: the report says so instead.
    """
    if plan is None or not data.rows:
        return False
    return not (plan.name == "cross-batch" and not data.history)


def _ann_scope(msg: EvaluateBatch, data: EvaluationRows) -> list[str]:
    """The batches the Qdrant query is restricted to: where the candidates come from."""
    return data.history if msg.protocol.name == "cross-batch" else [msg.batch_id]


def _ann_warnings(model: str, ann: AnnCheck, asked: int) -> list[str]:
    """A failed ANN check is always worth a line; a skipped one only when it was asked for."""
    if ann.status == "failed":
        return [f"{model}: ANN check failed (Qdrant): {ann.reason}"]
    if ann.status == "skipped" and asked:
        return [f"{model}: ANN check skipped: {ann.reason}"]
    return []


def score_model(
    ctx: Context,
    msg: EvaluateBatch,
    model: str,
    data: EvaluationRows,
    plan: ProtocolPlan,
    ks: list[int],
) -> ModelScore:
    """Exact retrieval metrics of one model, then Qdrant's top-k checked against them.

    The metrics come from the stored vectors (exact, reproducible); the ANN check only tells
    how far the served index is from them, and its failure is a warning.
    """
    proto = msg.protocol
    vectors = data.vectors[model]
    result = evaluate(
        vectors,
        [r.label for r in data.rows],
        plan.groups,
        ks=ks,
        query_mask=plan.query_mask,
        candidate_mask=plan.candidate_mask,
        bootstrap=proto.bootstrap,
        seed=proto.seed,
        name=model,
    )
    ann = ann_check(
        lambda: _vector_index(ctx),
        model,
        data.rows,
        vectors,
        result,
        plan,
        _ann_scope(msg, data),
        k=max(ks),
        n_queries=proto.ann_check_queries,
        seed=proto.seed,
    )
    warnings = [f"{model}: {w}" for w in result.warnings]
    warnings.extend(_ann_warnings(model, ann, proto.ann_check_queries))
    return ModelScore(result=result, ann=ann, warnings=warnings)


@dataclass
class Encoded:
    """What one model encoded, as its report section states it (counts, failures, cost)."""

    images_encoded: int
    failures: list[tuple[str, str]]
    timings: list[ShardMeta]
    payload: float | None  # mean Qdrant payload bytes per point

    @classmethod
    def of(cls, emb: BatchEmbeddings, info: BatchInfo | None) -> Encoded:
        """From the embeddings loaded in memory (the payload estimated from their records)."""
        payload = payload_bytes(emb.records, info.batch_id, info.source) if info else None
        return cls(len(emb.records), emb.failures, emb.timings, payload)


def model_section(
    ctx: Context,
    model: str,
    card: ModelCard,
    encoded: Encoded,
    score: ModelScore,
    volume: int | None = None,
) -> ModelSection:
    """The report's entry for one model: what it is, what it encoded, its scores and cost.

    The cost's device is the encoder's, read from the shards; the Qdrant payload size is
    estimated from this batch's records; ``volume`` adds the nightly projection.
    """
    return ModelSection(
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
        images_encoded=encoded.images_encoded,
        encode_failures=encoded.failures,
        retrieval=score.result,
        cost=summarise_cost(
            encoded.timings,
            card,
            ctx.settings.price_per_hour,
            ctx.settings.price_currency,
            payload=encoded.payload,
            volume=volume,
        ),
        ann_check=score.ann,
    )


def score_models(
    ctx: Context,
    msg: EvaluateBatch,
    cards: dict[str, ModelCard],
    encoded: dict[str, Encoded],
    scorer: Callable[[str], ModelScore] | None,
) -> tuple[list[ModelSection], dict[str, RetrievalResult], list[str]]:
    """Every model's section (in request order), the scored results by model, and warnings.

    ``scorer`` scores one model (``None``: nothing is scored). An unscored model still gets a
    section: what it encoded and what that cost is useful on its own.
    """
    sections: list[ModelSection] = []
    results: dict[str, RetrievalResult] = {}
    warnings: list[str] = []
    volume = msg.volume_images_per_night or ctx.settings.volume_images_per_night
    for model in msg.models:
        card = cards[model]
        score = scorer(model) if scorer is not None else ModelScore()
        if score.result is not None:
            results[model] = score.result
        warnings.extend(score.warnings)
        section = model_section(ctx, model, card, encoded[model], score, volume)
        sections.append(section)
        warnings.extend(cost_warnings(model, section.cost))
        if not card.pretrained:
            warnings.append(
                f"{model}: no trained weights (random initialisation) — a baseline only"
            )
    return sections, results, warnings


def compare_models(
    models: Sequence[str], results: dict[str, RetrievalResult], headline: int
) -> Comparisons:
    """Every pair of scored models, paired on the same queries, in request order.

    The verdicts are the pairs' MV@``headline`` macro-F1 lines: the report's one-line answer
    to "which model is better?". A pair that cannot be paired is a warning, not a failure.
    """
    out = Comparisons()
    for a, b in itertools.combinations([m for m in models if m in results], 2):
        if results[a].per_query is None or results[b].per_query is None:
            out.warnings.append(f"{a} vs {b}: no evaluated queries, not compared")
            continue
        try:
            pair = compare(results[a], results[b])
        except ValueError as exc:
            out.warnings.append(f"{a} vs {b}: not compared ({exc})")
            continue
        out.pairs.append(pair)
        out.warnings.extend(f"{a} vs {b}: {w}" for w in pair.warnings)
        out.verdicts.extend(
            d.verdict for d in pair.differences if d.key == "mv_macro_f1" and d.k == headline
        )
    return out


def batch_summary(info: BatchInfo, quarantine: Sequence[QuarantineEntry]) -> BatchSummary:
    """What was ingested: counts, labels, and the quarantine (reasons counted, 100 listed)."""
    reasons = Counter(q.reason.split(":")[0] for q in quarantine)
    return BatchSummary(
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
        n_label_conflicts=info.n_label_conflicts,
        label_conflicts=info.label_conflicts[:100],
    )


def protocol_summary(
    msg: EvaluateBatch,
    plan: ProtocolPlan | None,
    ks: list[int],
    hk: int,
    n_images: int,
    n_left_out: int,
    search: SearchScope,
) -> Protocol:
    """How the batch was evaluated, as asked and as resolved, so the numbers can be redone."""
    proto = msg.protocol
    return Protocol(
        name=plan.name if plan is not None else "none",
        requested=proto.name,
        exclusion=plan.exclusion if plan else None,
        ks=ks,
        headline_k=hk,
        bootstrap_resamples=proto.bootstrap,
        seed=proto.seed,
        confidence=0.95,
        n_images=n_images,
        n_queries=plan.n_queries if plan else 0,
        n_candidates=plan.n_candidates if plan else 0,
        n_left_out=n_left_out,
        query_split=proto.query_split if proto.name == "split" else None,
        split=plan.split if plan else None,
        history=plan.history if plan else None,
        query_sample=plan.sample if plan else None,
        ann_check_queries=proto.ann_check_queries,
        search=search,
    )


def search_scope(
    plan: ProtocolPlan | None, n_rows: int, exact_max: int, n_shards: int | None = None
) -> SearchScope:
    """The report's sentence on what is exact: every query, or a sample against everything."""
    if n_shards is None:
        if plan is not None and plan.sample is not None:
            what = (
                f"{plan.n_queries:,} sampled queries of {plan.sample.population:,}, exact "
                "against the full index (in memory)"
            )
        else:
            what = "exact all-vs-all: every query against every candidate (in memory)"
        return SearchScope(
            mode="in-memory", statement=what, n_rows=n_rows, exact_max_vectors=exact_max
        )
    if plan is not None and plan.sample is not None:
        what = (
            f"{plan.n_queries:,} sampled queries of {plan.sample.population:,}, exact against "
            f"the full index (streamed over {n_shards:,} shards"
        )
    else:
        what = f"not scored (streamed over {n_shards:,} shards"
    what += (
        f"; the batch has {n_rows:,} images, above KIBAN_EVAL_EXACT_MAX_VECTORS = {exact_max:,})"
    )
    return SearchScope(
        mode="streamed",
        statement=what,
        n_rows=n_rows,
        exact_max_vectors=exact_max,
        n_shards=n_shards,
    )


def write_report(ctx: Context, report: Report) -> None:
    """Store the report as JSON (the record), and Markdown and self-contained HTML rendered
    from it."""
    prefix = f"{report_prefix(report.batch_id)}/{report.version}"
    ctx.store.put(f"{prefix}/report.json", report.to_json().encode())
    ctx.store.put(f"{prefix}/report.md", render_markdown(report).encode())
    ctx.store.put(f"{prefix}/report.html", render_html(report).encode())
    log.info("report %s/%s written", report.batch_id, report.version)


def chunk_failures(
    ctx: Context, msg: EvaluateBatch, info: BatchInfo
) -> tuple[list[ChunkFailure], list[str]]:
    """The evaluated models' failed chunks, and a warning for every chunk left out.

    A chunk whose encoding failed has no shard: its images are not scored for that model
    (and, since models are compared on common rows, for none). A chunk that failed only at
    indexing still has its shard and is scored; it is missing from Qdrant.
    """
    sizes = {c.index: c.stop - c.start for c in info.chunks}
    failures = [f for f in read_failures(ctx.store, msg.batch_id) if f.model in msg.models]
    warnings = []
    failed = {(f.model, f.chunk) for f in failures}
    for f in failures:
        if is_complete(ctx.store, f.model, msg.batch_id, f.chunk):
            warnings.append(
                f"{f.model}: chunk {f.chunk} not indexed in Qdrant ({f.task} failed for good: "
                f"{f.reason}); evaluated from its stored shard"
            )
        else:
            warnings.append(
                f"{f.model}: chunk {f.chunk} failed for good in {f.task} "
                f"({sizes.get(f.chunk, 0)} images not evaluated): {f.reason}"
            )
    for model in msg.models:
        for chunk in info.chunks:
            if (model, chunk.index) in failed:
                continue
            if not is_complete(ctx.store, model, msg.batch_id, chunk.index):
                warnings.append(
                    f"{model}: chunk {chunk.index} has no embeddings yet "
                    f"({sizes[chunk.index]} images not evaluated)"
                )
    return failures, warnings


@dataclass
class Outcome:
    """What either evaluation path (in memory / streamed) hands to the report."""

    plan: ProtocolPlan | None
    n_images: int
    n_left_out: int
    search: SearchScope
    sections: list[ModelSection]
    results: dict[str, RetrievalResult]
    leakage: Leakage
    warnings: list[str]
    data: EvaluationRows | None = None  # in memory only: the learning curves re-search it


def batch_rows(info: BatchInfo) -> int:
    """The images the chunk plan holds: what decides in memory vs streamed."""
    return sum(c.stop - c.start for c in info.chunks)


def evaluate_in_memory(
    ctx: Context,
    msg: EvaluateBatch,
    info: BatchInfo,
    cards: dict[str, ModelCard],
    trained: dict[str, frozenset[str]],
    ks: list[int],
) -> Outcome:
    """Every vector loaded; the protocol's queries (or its query_sample) searched exactly."""
    warnings: list[str] = []
    data = load_evaluation_rows(ctx, msg, info, cards)
    warnings.extend(data.warnings)
    plan = plan_evaluation(msg, info, data)
    leakage = Leakage()
    if plan is not None:
        warnings.extend(plan.warnings)
        leakage = check_leakage(data.rows, plan, trained)
        plan = exclude_queries(plan, leakage)
        warnings.extend(leakage.warnings)
    final = plan
    scorer = None
    if final is not None and _is_scored(final, data):
        scorer = lambda m: score_model(ctx, msg, m, data, final, ks)  # noqa: E731
    encoded = {m: Encoded.of(data.current[m], info) for m in msg.models}
    sections, results, model_warnings = score_models(ctx, msg, cards, encoded, scorer)
    warnings.extend(model_warnings)
    scope = search_scope(plan, len(data.rows), ctx.settings.eval_exact_max_vectors)
    return Outcome(
        plan, len(data.rows), data.n_left_out, scope, sections, results, leakage, warnings, data
    )


def evaluate_streamed(
    ctx: Context,
    msg: EvaluateBatch,
    info: BatchInfo,
    cards: dict[str, ModelCard],
    trained: dict[str, frozenset[str]],
    ks: list[int],
) -> Outcome:
    """Above KIBAN_EVAL_EXACT_MAX_VECTORS: a query sample, exact against the whole index,
    one shard at a time (``kiban_reporter.streamed``); what it cannot do is stated."""
    exact_max = ctx.settings.eval_exact_max_vectors
    scan = scan_batch(ctx, info, msg.models, trained, splits=msg.protocol.name == "split")
    warnings: list[str] = []
    if scan.n_left_out:
        warnings.append(left_out_warning(scan.n_left_out))
    sp = None
    if info.labelled:
        sp, plan_warnings = plan_streamed(msg, scan, ctx.settings.eval_sample_queries)
        warnings.extend(plan_warnings)
    plan = sp.plan if sp is not None else None
    leakage = Leakage()
    if sp is not None:
        warnings.extend(sp.plan.warnings)
        leakage = sp.leakage
        warnings.extend(leakage.warnings)
    scope = search_scope(plan, scan.n_rows, exact_max, len(scan.spans))
    warnings.append(f"evaluation at scale: {scope.statement}")
    scorer = None
    if sp is not None and scan.n_rows:
        streamed_plan = sp

        def scorer(model: str) -> ModelScore:
            result, ann, model_warnings = score_streamed(
                ctx, msg, info, model, scan, streamed_plan, ks
            )
            return ModelScore(result=result, ann=ann, warnings=model_warnings)

    encoded = {
        m: Encoded(e.images_encoded, e.failures, e.timings, e.payload)
        for m, e in scan.encoded.items()
    }
    sections, results, model_warnings = score_models(ctx, msg, cards, encoded, scorer)
    warnings.extend(model_warnings)
    if results:
        warnings.append(
            "learning curves: not computed on a streamed evaluation (they re-search the "
            f"index many times; batch above KIBAN_EVAL_EXACT_MAX_VECTORS = {exact_max:,})"
        )
    return Outcome(plan, scan.n_rows, scan.n_left_out, scope, sections, results, leakage, warnings)


def evaluate_batch(msg: EvaluateBatch, ctx: Context) -> Report:
    """Evaluate a batch from its stored embeddings and write the next report version.

    The steps run in a fixed order — rows, protocol, leakage check (queries any evaluated
    model was trained on leave every model's queries), models (metrics, cost), comparisons,
    decision — and the report's warnings are listed in that order. A batch above
    ``KIBAN_EVAL_EXACT_MAX_VECTORS`` images is evaluated streamed (``evaluate_streamed``).
    """
    info = read_batch_info(ctx.store, msg.batch_id)
    quarantine = read_quarantine(ctx.store, msg.batch_id)
    ks = sorted(set(msg.k))
    hk = headline_k(ks)
    warnings: list[str] = []
    if not info.labelled:
        warnings.append("batch has no labels: embedded and indexed, not scored")
    cards = {m: load_card(ctx.store, m) for m in msg.models}
    trained = training_sets(ctx.store, cards)  # a missing training set fails here, clearly
    failures, failure_warnings = chunk_failures(ctx, msg, info)
    warnings.extend(failure_warnings)
    streamed = batch_rows(info) > ctx.settings.eval_exact_max_vectors
    run = evaluate_streamed if streamed else evaluate_in_memory
    out = run(ctx, msg, info, cards, trained, ks)
    warnings.extend(out.warnings)
    comparisons = compare_models(msg.models, out.results, hk)
    warnings.extend(comparisons.warnings)
    curves = None
    if out.data is not None:
        curves = learning_curves_of(ctx, msg, out.data, out.plan, out.results, hk)
    report = Report(
        version=next_version(ctx, msg.batch_id),
        request_id=msg.request_id,
        batch_id=msg.batch_id,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        batch=batch_summary(info, quarantine),
        protocol=protocol_summary(msg, out.plan, ks, hk, out.n_images, out.n_left_out, out.search),
        models=out.sections,
        comparisons=comparisons.pairs,
        verdicts=comparisons.verdicts,
        failed_chunks=failures,
        decision=decide(out.sections, comparisons.pairs, hk, ctx.settings.noninferiority_margin),
        leakage=out.leakage.checks,
        learning_curves=curves,
        warnings=warnings,
    )
    report.trend = build_trend(ctx.store, report, ctx.settings.trend_window)
    if report.trend is not None:
        report.warnings.extend(f"trend: {m.statement}" for m in report.trend.models if m.regression)
    write_report(ctx, report)
    return report


def learning_curves_of(
    ctx: Context,
    msg: EvaluateBatch,
    data: EvaluationRows,
    plan: ProtocolPlan | None,
    results: dict[str, RetrievalResult],
    hk: int,
) -> LearningCurves | None:
    """Is the labelled set big enough? Curves over the final plan (after the leakage check).

    Reuses the evaluation's full-index predictions, so it costs less than the evaluation.
    """
    if plan is None or not results:
        return None
    return learning_curves(
        {m: data.vectors[m] for m in results},
        [r.label for r in data.rows],
        plan,
        headline_k=hk,
        sizes=ctx.settings.learning_curve_sizes,
        repeats=ctx.settings.learning_curve_repeats,
        seed=msg.protocol.seed,
        margin=ctx.settings.noninferiority_margin,
        bootstrap=msg.protocol.bootstrap,
        results=results,
    )


def _vector_index(ctx: Context) -> VectorIndex:
    """Qdrant, opened only when the ANN check runs: an unreachable one is then a warning."""
    from kiban.tasks import vector_index

    return vector_index(ctx.settings)
