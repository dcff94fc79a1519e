"""The evaluation of a batch too large to hold: a query sample, exact against the full index.

Up to ``KIBAN_EVAL_EXACT_MAX_VECTORS`` images the reporter loads every vector and searches
every query of the protocol exactly (``kiban_reporter.evaluation``). Above it, holding the
batch does not fit a worker (a million 512-d vectors are 2 GB per model, plus ~1 KB of Python
objects per record), and all-vs-all grows with N². Then:

Pass 1 (records, one chunk file at a time, never ``records.jsonl``): each row's label, group
and training-set hits as compact integer arrays, each model's encode counts, failures,
timings and Qdrant payload size; no key and no vector is kept. The protocol's queries are
cut to a seeded, class-stratified sample (the request's ``query_sample``, else
``KIBAN_EVAL_SAMPLE_QUERIES``) by the same rule as in memory.

Pass 2 (per model, shards one at a time): gather the sampled queries' vectors, then rank them
against every shard with ``exact_knn`` and merge the running top-k exactly
(``kiban_reporter.metrics.knn_stream``): the same neighbours, similarities and candidate
counts as the in-memory search with the same sample. Metrics, intervals, per-class reports,
paired comparisons, decision and cost are then computed by the same code as in memory.

Protocols: leave-one-out, leave-one-group-out, auto and split (manifest splits, or the hash
rule of ``kiban.splits`` from each row's unit fraction). Not done at this size, each stated
in the report's warnings: the cross-batch protocol (its history is more batches to hold),
the learning curves (they re-search the index many times) and the ANN check (it maps
Qdrant's answers back to rows by key).

Row order, the tie rule, is key order: chunks are contiguous slices of the key-sorted records
(kiban.records), so the rows are numbered chunk by chunk, each chunk's keys sorted; a chunk
plan that breaks that order is refused by name rather than ranked differently.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from kiban.context import Context
from kiban.messages import EvaluateBatch
from kiban.records import BatchInfo, ImageRecord, read_chunk_records
from kiban.shards import ShardMeta, read_meta, read_shard
from kiban.splits import SPLIT_RULE, unit_fraction
from kiban_reporter.ann_check import AnnCheck
from kiban_reporter.cost import point_payload_size
from kiban_reporter.leakage import Leakage, exclude_queries, leakage_from_hits
from kiban_reporter.metrics.evaluate import score_neighbours
from kiban_reporter.metrics.inputs import NORM_TOLERANCE, EncodedInputs
from kiban_reporter.metrics.knn_stream import StreamedKnn
from kiban_reporter.metrics.results import RetrievalResult
from kiban_reporter.protocols import ProtocolPlan, SplitAssignment, apply_sample, split_warnings

#: Protocols the streamed evaluation scores; the others are stated as not scored.
STREAMED_PROTOCOLS = ("auto", "leave-one-out", "leave-one-group-out", "split")


@dataclass
class ModelEncoded:
    """What one model encoded: the report's encode counts and cost inputs."""

    images_encoded: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    timings: list[ShardMeta] = field(default_factory=list)
    payload_total: int = 0

    @property
    def payload(self) -> float | None:
        """Mean Qdrant payload bytes per point, as ``cost.payload_bytes`` computes it."""
        return self.payload_total / self.images_encoded if self.images_encoded else None


@dataclass
class ChunkSpan:
    """A chunk's share of the rows: ``offset`` .. ``offset + count`` (its common keys)."""

    index: int
    offset: int
    count: int


@dataclass
class BatchScan:
    """Pass 1: the batch as compact arrays (one entry per row encoded by every model)."""

    n_rows: int
    label_codes: NDArray[np.int64]  # -1: no label
    classes: list[str]
    group_codes: NDArray[np.int64]  # sorted group names, then one code per ungrouped row
    grouped: bool
    n_groups_named: int
    n_without_group: int
    spans: list[ChunkSpan]
    encoded: dict[str, ModelEncoded]
    metas: dict[str, dict[int, ShardMeta]]
    n_left_out: int
    hits: dict[str, tuple[int, NDArray[np.bool_]]]
    split_codes: NDArray[np.int64] | None = None  # manifest split per row (-1: none)
    split_names: list[str] = field(default_factory=list)
    unit_fractions: NDArray[np.float64] | None = None  # kiban.splits rule of group or sha256

    @property
    def labelled(self) -> NDArray[np.bool_]:
        return self.label_codes >= 0

    @property
    def n_unlabelled(self) -> int:
        return int(np.count_nonzero(self.label_codes < 0))


def _chunk_common(
    records: list[ImageRecord], models: Sequence[str], metas: Mapping[str, ShardMeta | None]
) -> tuple[list[ImageRecord], dict[str, list[ImageRecord]]]:
    """The chunk's records encoded by every model (key order), and each model's own.

    A shard holds its chunk's records minus its failures (kiban_encoder.encode), so the
    records and the small meta files say which keys it has without reading its vectors.
    """
    own: dict[str, list[ImageRecord]] = {}
    for model in models:
        meta = metas[model]
        if meta is None:
            own[model] = []
            continue
        failed = {k for k, _ in meta.failures}
        own[model] = [r for r in records if r.key not in failed]
    common_keys = set.intersection(*({r.key for r in v} for v in own.values()))
    common = sorted((r for r in records if r.key in common_keys), key=lambda r: r.key)
    return common, own


def scan_batch(
    ctx: Context,
    info: BatchInfo,
    models: Sequence[str],
    trained: Mapping[str, frozenset[str]],
    splits: bool = False,
) -> BatchScan:
    """Pass 1 over the chunk record files and shard metas: compact arrays, no vectors.

    ``splits``: also each row's manifest split and split-rule fraction (split protocol).
    """
    labels: list[NDArray[np.int64]] = []
    groups: list[NDArray[np.int64]] = []
    label_index: dict[str, int] = {}
    group_index: dict[str, int] = {}
    hit_parts: dict[str, list[NDArray[np.bool_]]] = {m: [] for m in trained}
    split_index: dict[str, int] = {}
    split_parts: list[NDArray[np.int64]] = []
    fraction_parts: list[NDArray[np.float64]] = []
    encoded = {m: ModelEncoded() for m in models}
    metas: dict[str, dict[int, ShardMeta]] = {m: {} for m in models}
    spans: list[ChunkSpan] = []
    offset = 0
    n_left_out = 0
    last_key: str | None = None
    for chunk in sorted(info.chunks, key=lambda c: c.start):
        records = read_chunk_records(ctx.store, info.batch_id, chunk.index)
        chunk_metas = {m: read_meta(ctx.store, m, info.batch_id, chunk.index) for m in models}
        common, own = _chunk_common(records, models, chunk_metas)
        union = set().union(*({r.key for r in v} for v in own.values()))
        n_left_out += len(union) - len(common)
        for model in models:
            meta = chunk_metas[model]
            if meta is None:
                continue
            metas[model][chunk.index] = meta
            stats = encoded[model]
            stats.timings.append(meta)
            stats.failures.extend((str(k), str(reason)) for k, reason in meta.failures)
            stats.images_encoded += len(own[model])
            stats.payload_total += sum(
                point_payload_size(r, info.batch_id, info.source) for r in own[model]
            )
        if common:
            if last_key is not None and common[0].key <= last_key:
                raise ValueError(
                    f"batch {info.batch_id}: chunk {chunk.index} starts at key "
                    f"{common[0].key!r}, not after the previous chunk's last key; the streamed "
                    "evaluation needs chunks that are consecutive slices of the key-sorted records"
                )
            last_key = common[-1].key
        labels.append(_codes([r.label for r in common], label_index))
        groups.append(_codes([r.group for r in common], group_index))
        for model, images in trained.items():
            hit_parts[model].append(
                np.fromiter((r.sha256 in images for r in common), dtype=bool, count=len(common))
            )
        if splits:
            split_parts.append(_codes([r.split for r in common], split_index))
            fraction_parts.append(
                np.fromiter(
                    (unit_fraction(r.group or r.sha256) for r in common),
                    dtype=np.float64,
                    count=len(common),
                )
            )
        spans.append(ChunkSpan(chunk.index, offset, len(common)))
        offset += len(common)
    n = offset
    classes = sorted(label_index)
    label_codes = _recode(_cat(labels), label_index, classes)
    names = sorted(group_index)
    raw_groups = _cat(groups)
    group_codes = _recode(raw_groups, group_index, names)
    ungrouped = np.flatnonzero(raw_groups < 0)
    group_codes[ungrouped] = len(names) + np.arange(ungrouped.size)
    return BatchScan(
        n_rows=n,
        label_codes=label_codes,
        classes=classes,
        group_codes=group_codes,
        grouped=bool(group_index),
        n_groups_named=len(names),
        n_without_group=int(ungrouped.size),
        spans=spans,
        encoded=encoded,
        metas=metas,
        n_left_out=n_left_out,
        hits={m: (len(trained[m]), _cat(hit_parts[m], bool)) for m in trained},
        split_codes=_recode(_cat(split_parts), split_index, sorted(split_index))
        if splits
        else None,
        split_names=sorted(split_index),
        unit_fractions=_cat(fraction_parts, np.float64) if splits else None,
    )


def _codes(values: Sequence[str | None], index: dict[str, int]) -> NDArray[np.int64]:
    """Each value's code in ``index`` (new values get the next code; missing: -1), so a
    million rows cost 8 bytes each instead of a Python string."""
    return np.fromiter(
        (index.setdefault(v, len(index)) if v else -1 for v in values),
        dtype=np.int64,
        count=len(values),
    )


def _cat(parts: list[NDArray], dtype: type = np.int64) -> NDArray:
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def _recode(raw: NDArray[np.int64], index: dict[str, int], names: list[str]) -> NDArray[np.int64]:
    """Codes in order of first appearance → codes in sorted-name order (``-1`` kept)."""
    remap = np.empty(len(names), dtype=np.int64)
    for new, name in enumerate(names):
        remap[index[name]] = new
    out = np.full(raw.size, -1, dtype=np.int64)
    known = raw >= 0
    out[known] = remap[raw[known]]
    return out


@dataclass
class StreamedPlan:
    """The resolved protocol over the scanned rows, and the exclusion codes of the search."""

    plan: ProtocolPlan
    group_codes: NDArray[np.int64]  # the row itself (leave-one-out) or its group code
    grouped: bool
    leakage: Leakage


def plan_streamed(
    msg: EvaluateBatch, scan: BatchScan, sample_size: int
) -> tuple[StreamedPlan | None, list[str]]:
    """The protocol over the scanned rows, cut to the sample, with the leakage check applied.

    ``None`` (and the reason) for cross-batch, which needs the history's rows as well.
    """
    proto = msg.protocol
    if proto.name not in STREAMED_PROTOCOLS:
        return None, [
            f"protocol {proto.name} is not evaluated above KIBAN_EVAL_EXACT_MAX_VECTORS "
            f"({scan.n_rows} images): the streamed evaluation supports "
            f"{', '.join(STREAMED_PROTOCOLS)}; nothing is scored"
        ]
    if proto.name == "split":
        plan, group = _plan_split(msg, scan), scan.grouped
    else:
        plan, group = _plan_leave_out(msg, scan)
    requested = proto.query_sample if proto.query_sample is not None else sample_size
    pop = np.flatnonzero(plan.query_mask)
    plan = apply_sample(plan, scan.label_codes[pop], scan.classes, requested, proto.seed)
    leakage = leakage_from_hits(scan.hits, plan)
    plan = exclude_queries(plan, leakage)
    codes = scan.group_codes if group else np.arange(scan.n_rows, dtype=np.int64)
    return StreamedPlan(plan, codes, group, leakage), []


def _plan_leave_out(msg: EvaluateBatch, scan: BatchScan) -> tuple[ProtocolPlan, bool]:
    """``protocols.plan_auto`` / leave-one-(group-)out over the scanned rows."""
    proto = msg.protocol
    labelled = scan.labelled
    warnings: list[str] = []
    group = proto.name != "leave-one-out" and scan.grouped
    if proto.name == "leave-one-group-out" and not scan.grouped:
        warnings.append(
            "leave-one-group-out asked for, but the batch has no groups: leave-one-out instead"
        )
    plan = ProtocolPlan(
        requested=proto.name,
        name="leave-one-group-out" if group else "leave-one-out",
        query_mask=labelled.copy(),
        candidate_mask=labelled.copy(),
        groups=None,
        exclusion="the query and every image of its group" if group else "the query itself",
        warnings=warnings,
    )
    return plan, group


def _held_out(scan: BatchScan, fraction: float) -> NDArray[np.bool_]:
    """Rows whose unit is held out under ``kiban.splits.held_out_units``, from fractions.

    A unit is a group (rows share its fraction) or an ungrouped image; ingest de-duplicates
    by sha256, so such an image is its own unit. Never none, never all (as the rule says).
    """
    frac = scan.unit_fractions
    assert frac is not None
    test = frac < fraction
    unit = _unit_codes(scan)
    if frac.size and not test.any():
        test = unit == unit[int(np.argmin(frac))]
    if np.unique(unit).size > 1 and test.all():
        test &= unit != unit[int(np.argmax(frac))]
    return test


def _unit_codes(scan: BatchScan) -> NDArray[np.int64]:
    """One code per split unit: the group code (ungrouped rows already have their own)."""
    return scan.group_codes


def _plan_split(msg: EvaluateBatch, scan: BatchScan) -> ProtocolPlan:
    """``protocols.plan_split`` over the scanned rows (manifest splits, else the hash rule)."""
    proto = msg.protocol
    assert scan.split_codes is not None
    names = scan.split_names
    unit = _unit_codes(scan)
    if (scan.split_codes >= 0).any():
        source = "manifest"
        codes = scan.split_codes
        other = None
        fraction = None
        rule = "splits from the manifest; images without a split are candidates"
        q = names.index(proto.query_split) if proto.query_split in names else -2
        is_query = codes == q
        labels = [*names]
        row_label = codes  # -1: "(none)"
    else:
        source = "hash"
        other = "index" if proto.query_split != "index" else "candidates"
        fraction, rule = proto.test_fraction, SPLIT_RULE
        is_query = _held_out(scan, proto.test_fraction)
        labels = sorted({proto.query_split, other})
        row_label = np.where(is_query, labels.index(proto.query_split), labels.index(other))
    images: dict[str, int] = {}
    units: dict[str, int] = {}
    for code, label in [(-1, "(none)"), *enumerate(labels)]:
        rows = row_label == code
        if rows.any():
            images[label] = int(np.count_nonzero(rows))
            units[label] = int(np.unique(unit[rows]).size)
    grouped_rows = scan.group_codes < scan.n_groups_named
    query_groups = np.unique(scan.group_codes[grouped_rows & is_query])
    other_groups = np.unique(scan.group_codes[grouped_rows & ~is_query])
    split = SplitAssignment(
        source=source,
        query_split=proto.query_split,
        other_split=other,
        rule=rule,
        test_fraction=fraction,
        images=dict(sorted(images.items())),
        units=dict(sorted(units.items())),
        n_without_split=int(np.count_nonzero(row_label == -1)) if source == "manifest" else 0,
        n_groups_across_splits=int(np.intersect1d(query_groups, other_groups).size),
    )
    labelled = scan.labelled
    return ProtocolPlan(
        requested=proto.name,
        name="split",
        query_mask=is_query & labelled,
        candidate_mask=~is_query & labelled,
        groups=None,
        exclusion=(
            "images of the query's group (groups never span splits when hashed)"
            if scan.grouped
            else "nothing (queries and candidates are disjoint)"
        ),
        split=split,
        warnings=split_warnings(split, proto.query_split, bool(is_query.any()), scan.grouped),
    )


def _chunk_rows(
    ctx: Context, info: BatchInfo, models: Sequence[str], scan: BatchScan
) -> Iterator[tuple[ChunkSpan, list[str]]]:
    """Each chunk's span and its common keys in row order (the record file read again)."""
    for span in scan.spans:
        if not span.count:
            continue
        records = read_chunk_records(ctx.store, info.batch_id, span.index)
        metas = {m: scan.metas[m].get(span.index) for m in models}
        common, _ = _chunk_common(records, models, metas)
        if len(common) != span.count:
            raise ValueError(
                f"batch {info.batch_id}: chunk {span.index} changed during the evaluation"
            )
        yield span, [r.key for r in common]


def _shard_rows(
    ctx: Context, info: BatchInfo, model: str, chunk: int, keys: list[str]
) -> NDArray[np.float32]:
    """The shard's vectors for ``keys`` in that order (a key it lacks is an error, named)."""
    shard = read_shard(ctx.store, model, info.batch_id, chunk)
    where = {k: i for i, k in enumerate(shard.keys)}
    missing = [k for k in keys if k not in where]
    if missing:
        raise ValueError(
            f"{model}: shard of chunk {chunk} of batch {info.batch_id} lacks {len(missing)} "
            f"keys its records and meta list (first {missing[0]!r})"
        )
    return shard.vectors[np.fromiter((where[k] for k in keys), dtype=np.int64, count=len(keys))]


def streamed_neighbours(
    ctx: Context,
    info: BatchInfo,
    models: Sequence[str],
    model: str,
    scan: BatchScan,
    sp: StreamedPlan,
    query_rows: NDArray[np.int64],
    k: int,
    block_size: int = 1024,
) -> tuple[StreamedKnn, int]:
    """Pass 2 for one model: the queries' exact top-``k`` over every shard, and the count of
    vectors that are not L2-normalised (the in-memory path's warning)."""
    dim = 0
    gathered: dict[int, NDArray[np.float32]] = {}
    for span, keys in _chunk_rows(ctx, info, models, scan):
        lo, hi = np.searchsorted(query_rows, [span.offset, span.offset + span.count])
        if hi > lo:
            vec = _shard_rows(ctx, info, model, span.index, keys)
            dim = vec.shape[1]
            for row in query_rows[lo:hi]:
                gathered[int(row)] = vec[int(row) - span.offset].copy()
    qvec = (
        np.stack([gathered[int(r)] for r in query_rows])
        if query_rows.size
        else np.zeros((0, dim), np.float32)
    )
    knn = StreamedKnn(query_rows, qvec, sp.group_codes[query_rows], k, block_size)
    cand = sp.plan.candidate_mask
    bad = 0
    for span, keys in _chunk_rows(ctx, info, models, scan):
        vec = _shard_rows(ctx, info, model, span.index, keys)
        if not np.isfinite(vec).all():
            raise ValueError("vectors contain NaN or infinite values")
        norms = np.sqrt(np.einsum("ij,ij->i", vec, vec, dtype=np.float64))
        bad += int(np.count_nonzero(np.abs(norms - 1.0) > NORM_TOLERANCE))
        rows = np.arange(span.offset, span.offset + span.count, dtype=np.int64)
        knn.add(rows, vec, sp.group_codes[rows], cand[rows] & scan.labelled[rows])
    return knn, bad


def _inputs(scan: BatchScan, sp: StreamedPlan, n_not_normalised: int) -> EncodedInputs:
    """The metrics engine's inputs without the vectors, with the in-memory path's warnings."""
    n = scan.n_rows
    warnings: list[str] = []
    if n_not_normalised:
        warnings.append(
            f"{n_not_normalised} of {n} vectors are not L2-normalised (|norm - 1| > "
            f"{NORM_TOLERANCE}); the ranking uses raw dot products, which is not cosine "
            "similarity for them"
        )
    if scan.n_unlabelled:
        warnings.append(
            f"{scan.n_unlabelled} rows have no label; they are neither queries nor candidates"
        )
    if sp.grouped and scan.n_without_group:
        warnings.append(
            f"{scan.n_without_group} rows have no group; each is treated as its own group"
        )
    labelled = scan.labelled
    return EncodedInputs(
        vectors=np.zeros((n, 0), np.float32),
        label_codes=scan.label_codes,
        classes=scan.classes,
        group_codes=sp.group_codes,
        n_groups=int(sp.group_codes.max()) + 1 if n else 0,
        grouped=sp.grouped,
        query_rows=np.flatnonzero(sp.plan.query_mask & labelled).astype(np.int64),
        candidate_rows=np.flatnonzero(sp.plan.candidate_mask & labelled).astype(np.int64),
        n_unlabelled=scan.n_unlabelled,
        warnings=warnings,
    )


def score_streamed(
    ctx: Context,
    msg: EvaluateBatch,
    info: BatchInfo,
    model: str,
    scan: BatchScan,
    sp: StreamedPlan,
    ks: list[int],
) -> tuple[RetrievalResult, AnnCheck, list[str]]:
    """One model's metrics from its streamed exact search, by the in-memory scoring code."""
    proto = msg.protocol
    enc_q = np.flatnonzero(sp.plan.query_mask & scan.labelled).astype(np.int64)
    knn, bad = streamed_neighbours(ctx, info, msg.models, model, scan, sp, enc_q, max(ks))
    enc = _inputs(scan, sp, bad)
    result = score_neighbours(
        enc,
        knn.result() if enc_q.size else None,
        ks,
        bootstrap=proto.bootstrap,
        seed=proto.seed,
        name=model,
    )
    reason = (
        "not run on a streamed evaluation (Qdrant's answers are matched to rows by key, "
        "which this path does not hold)"
    )
    ann = AnnCheck(status="skipped", reason=reason, k=max(ks), seed=proto.seed)
    warnings = [f"{model}: {w}" for w in result.warnings]
    if proto.ann_check_queries:
        warnings.append(f"{model}: ANN check skipped: {reason}")
    return result, ann, warnings
