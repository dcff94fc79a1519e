"""Is the labelled set big enough? Learning curves of the headline metric, pure and fast.

For every model and every size ``n`` (labelled images per class in the index), ``repeats``
seeded random subsets of the *candidate* side keep at most ``n`` images of each class (a class
with fewer keeps all); the plan's queries stay fixed and its exclusions (the query itself, its
group) still hold. Each subset is scored with MV@k macro-F1 exactly as
``kiban_reporter.metrics.evaluate`` would score it with that subset as ``candidate_mask``
(same ranking, same tie rule: equal similarities rank the smaller row index first; queries
left without a candidate are not scored). The last point is the full index.

Subsets. Repeat ``r`` draws one random order of each class's candidates with
``numpy.random.default_rng([seed, r])`` (classes in sorted order); the subset of size ``n`` is
the first ``n`` of each class's order. So subsets are nested (5 per class ⊂ 10 per class, as if
labelling went on), adding a size leaves the others unchanged, and every model is scored on the
very same subsets (the curves are paired).

Speed. Per model, the query × candidate similarities are computed once, a block of queries at a
time (``block × columns`` float32, at most ``BLOCK_BYTES``; never ``N × N``), and every subset
is scored from that block. The columns are every candidate, or — when the report's ``evaluate``
results are passed, which already hold the full index's predictions — only the union of the
subsets (for 10 classes and sizes up to 100 per class that is ≤ 5,000 columns, however large the
index). A subset's columns are gathered (a repeat's smaller subsets from its largest one: they
are nested) and ranked exactly: for k ≤ ``SMALL_K`` by k rounds of ``argmax``, which returns the
first of equal maxima (the tie rule), else by ``metrics.knn.topk_block``. A subset much wider
than M and dense enough is scored by walking the block's top-M ranking instead (its first k
subset members), falling back to the gather for the queries whose top-M holds too few. No call
of ``evaluate``: only MV@k macro-F1, from per-class counts.

Intervals (``INTERVAL``). One stream of ``bootstrap`` query resamples (the report's own: same
units, seed and draws as ``evaluate``) is shared by every point and model. Draw ``i`` is scored
on subset ``i mod repeats``, so a size point's interval is the percentile interval over draws
that vary both the labelled subset and the queries; the full-index point uses the draws alone
and so equals the report's MV@k macro-F1 interval. The last step's gain has a paired interval
(the same draw on both points).

Reading the curves. ``flattened``: the last step (largest size → all) gained less than δ
(true); it gained at least δ with its paired interval above 0 (false: still improving); it
gained at least δ but the interval includes 0 (null: within the noise). ``verdict_may_change``:
between the last two points the models' order (by value) changed, or the gap between the best
two (at the full index) moved by more than δ.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import sparse

from kiban_reporter.decision_schema import CurvePoint, LearningCurve, LearningCurves
from kiban_reporter.metrics.bootstrap import percentile_interval, resampled_units, unit_weights
from kiban_reporter.metrics.classification import class_counts, macro_f1_from_counts
from kiban_reporter.metrics.inputs import encode_inputs
from kiban_reporter.metrics.knn import _GroupIndex, topk_block
from kiban_reporter.metrics.results import RetrievalResult
from kiban_reporter.metrics.retrieval import majority_vote

BLOCK_BYTES = 64 << 20  # float32 similarities of one query block
MAX_BLOCK = 1024
DEFAULT_TOP_M = 64
SMALL_K = 16  # up to this k, top-k by rounds of argmax (see ``topk_exact``)
WALK_MIN_EXPECTED = 4.0  # walk the top-M when it should hold this many x k subset members
INTERVAL = (
    "{level}% percentile interval over {draws} draws, each a query bootstrap resample "
    "(unit: {unit}, the report's seed and draws) scored on one of the {repeats} random subsets "
    "(draw i on subset i mod {repeats}): it covers both which images were labelled and which "
    "queries were drawn. The full-index point uses the query resamples alone (the report's "
    "interval); the gain of the last step has a paired interval (same draw on both points)."
)

Key = tuple[int | None, int]  # (per-class size or None for the full index, repeat)


class PlanMasks(Protocol):
    """What the curves read of a ``ProtocolPlan``: its queries, candidates and groups."""

    @property
    def query_mask(self) -> NDArray[np.bool_]: ...

    @property
    def candidate_mask(self) -> NDArray[np.bool_]: ...

    @property
    def groups(self) -> Sequence[str | None] | None: ...


def draw_subsets(
    candidate_labels: NDArray[np.int64], sizes: Sequence[int], repeats: int, seed: int
) -> dict[Key, NDArray[np.int64]]:
    """Ascending positions (into the candidate list) of each ``(size, repeat)`` subset.

    Nested across sizes within a repeat; see the module docstring for the rule.
    """
    order = np.argsort(candidate_labels, kind="stable")
    _, counts = np.unique(candidate_labels, return_counts=True)
    members = np.split(order, np.cumsum(counts)[:-1]) if counts.size else []
    out: dict[Key, NDArray[np.int64]] = {}
    for r in range(repeats):
        rng = np.random.default_rng([seed, r])
        orders = [rng.permutation(m) for m in members]
        for n in sizes:
            out[(n, r)] = np.sort(np.concatenate([o[:n] for o in orders])).astype(np.int64)
    return out


@dataclass
class CurveProblem:
    """The plan as integer arrays, the subsets, and which queries each subset can score."""

    label_codes: NDArray[np.int64]
    classes: list[str]
    group_codes: NDArray[np.int64]
    grouped: bool
    query_rows: NDArray[np.int64]  # queries with at least one candidate in the full index
    candidate_rows: NDArray[np.int64]
    units: NDArray[np.int64]  # bootstrap unit per query (as in ``evaluate``)
    sizes: list[int]
    dropped: list[int]
    largest_class: int
    repeats: int
    subsets: dict[Key, NDArray[np.int64]] = field(default_factory=dict)
    # per key and query: candidates in the subset after the exclusions (0 = not scored)
    n_candidates: dict[Key, NDArray[np.int64]] = field(default_factory=dict)

    def scorable(self, key: Key) -> NDArray[np.bool_]:
        return self.n_candidates[key] > 0

    @property
    def keys(self) -> list[Key]:
        return [(None, 0), *[(n, r) for n in self.sizes for r in range(self.repeats)]]

    def candidate_mask(self, key: Key) -> NDArray[np.bool_]:
        """The subset as a row mask over all rows: ``evaluate``'s ``candidate_mask``."""
        mask = np.zeros(self.label_codes.size, dtype=bool)
        mask[self.candidate_rows[self.subsets[key]]] = True
        return mask


def build_problem(
    n_rows: int,
    labels: ArrayLike | Sequence[object],
    plan: PlanMasks,
    sizes: Sequence[int],
    repeats: int,
    seed: int,
) -> CurveProblem:
    """Encode the plan (as ``evaluate`` does), drop sizes not below the largest class, draw."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if any(int(s) < 1 for s in sizes):
        raise ValueError(f"sizes must be positive, got {list(sizes)}")
    # Only labels, groups and masks are encoded here; the vectors are checked per model.
    enc = encode_inputs(
        np.empty((n_rows, 0), dtype=np.float32),
        labels,
        plan.groups,
        plan.query_mask,
        plan.candidate_mask,
    )
    cand = enc.candidate_rows
    cand_labels = enc.label_codes[cand]
    counts = np.bincount(cand_labels, minlength=len(enc.classes)) if cand.size else np.zeros(0)
    largest = int(counts.max()) if counts.size else 0
    wanted = sorted({int(s) for s in sizes})
    kept = [s for s in wanted if s < largest]
    dropped = [s for s in wanted if s >= largest]

    index = _GroupIndex(enc.group_codes[cand])
    _, same_group = index.sizes(enc.group_codes[enc.query_rows])
    n_cand_all = (cand.size - same_group).astype(np.int64)
    keep = n_cand_all > 0
    qrows = enc.query_rows[keep]
    if enc.grouped:
        _, inverse = np.unique(enc.group_codes[qrows], return_inverse=True)
        units = inverse.reshape(-1).astype(np.int64)
    else:
        units = np.arange(qrows.size, dtype=np.int64)
    problem = CurveProblem(
        label_codes=enc.label_codes,
        classes=enc.classes,
        group_codes=enc.group_codes,
        grouped=enc.grouped,
        query_rows=qrows,
        candidate_rows=cand,
        units=units,
        sizes=kept,
        dropped=dropped,
        largest_class=largest,
        repeats=repeats,
    )
    problem.subsets[(None, 0)] = np.arange(cand.size, dtype=np.int64)
    problem.subsets.update(draw_subsets(cand_labels, kept, repeats, seed))
    qgroups = enc.group_codes[qrows]
    n_codes = int(enc.group_codes.max()) + 1 if enc.group_codes.size else 0
    for key, pos in problem.subsets.items():
        per_group = np.bincount(enc.group_codes[cand[pos]], minlength=n_codes)
        problem.n_candidates[key] = (pos.size - per_group[qgroups]).astype(np.int64)
    return problem


def _block_rows(n_candidates: int) -> int:
    return max(16, min(MAX_BLOCK, BLOCK_BYTES // max(1, 4 * n_candidates)))


def predict(
    vectors: ArrayLike,
    problem: CurveProblem,
    k: int,
    top_m: int = DEFAULT_TOP_M,
    full: NDArray[np.int64] | None = None,
) -> dict[Key, NDArray[np.int64]]:
    """MV@k prediction (label code, ``-1`` = none) of every query for every subset.

    One similarity block per query block, shared by every subset; see the module docstring.
    ``full``: the full index's predictions, already known (the report's ``evaluate``); then
    only the columns of the subsets' union are computed, often a small share of the index.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    vec = np.ascontiguousarray(vectors, dtype=np.float32)
    if vec.ndim != 2 or vec.shape[0] != problem.label_codes.size:
        raise ValueError(f"vectors must be [{problem.label_codes.size}, D], got shape {vec.shape}")
    if not np.isfinite(vec).all():
        raise ValueError("vectors contain NaN or infinite values")
    nq = problem.query_rows.size
    preds = {key: np.full(nq, -1, dtype=np.int64) for key in problem.keys}
    sized = [key for key in problem.keys if key[0] is not None]
    if full is not None:
        preds[(None, 0)] = np.asarray(full, dtype=np.int64).copy()
        union = [problem.subsets[key] for key in sized]
        cols = np.unique(np.concatenate(union)) if union else np.zeros(0, dtype=np.int64)
    else:
        cols = np.arange(problem.candidate_rows.size)
    cols = cols.astype(np.int64)
    nc = cols.size
    if nq == 0 or nc == 0:
        return preds
    col_rows = problem.candidate_rows[cols]
    mat = vec if nc == vec.shape[0] else vec[col_rows]
    labels_ext = np.append(problem.label_codes[col_rows], -1)  # position -1 -> no label
    index = _GroupIndex(problem.group_codes[col_rows])
    qgroups = problem.group_codes[problem.query_rows]
    n_in_cols = nc - index.sizes(qgroups)[1]
    local = {key: np.searchsorted(cols, problem.subsets[key]) for key in sized}
    m = max(k, min(top_m, nc))
    # Walk the top-M ranking when it should hold several k members of the subset (so the
    # fallback is rare) and the subset is much wider than M (so gathering it costs more).
    walked: dict[Key, NDArray[np.bool_]] = {}
    for key in sized:
        pos = local[key]
        if pos.size > 2 * m and m * pos.size >= WALK_MIN_EXPECTED * k * nc:
            member = np.zeros(nc + 1, dtype=bool)  # the last entry answers position -1
            member[pos] = True
            walked[key] = member
    # The other subsets are gathered, repeat by repeat (one repeat's columns in memory at a
    # time). A repeat's subsets are nested, so its smaller ones are gathered from its largest
    # one's columns (compact, cache-friendly) rather than from the whole block.
    gathers: list[tuple[Key, list[tuple[Key, NDArray[np.int64]]]]] = []
    for rep in range(problem.repeats):
        mine = sorted((key for key in sized if key[1] == rep and key not in walked), key=_size)
        if not mine:
            continue
        big, inner = mine[-1], []
        for key in mine[:-1]:
            at = np.searchsorted(local[big], local[key])
            if not np.array_equal(local[big][np.minimum(at, local[big].size - 1)], local[key]):
                raise AssertionError("subsets of a repeat must be nested")
            inner.append((key, at))
        gathers.append((big, inner))
    block = _block_rows(nc)
    buffer = np.empty((min(block, nq), nc), dtype=np.float32)
    for start in range(0, nq, block):
        stop = min(start + block, nq)
        sims = buffer[: stop - start]
        rows = problem.query_rows[start:stop]
        np.matmul(vec[rows], mat.T, out=sims)
        index.exclude(sims, qgroups[start:stop])
        top = np.empty((0, 0), dtype=np.int64)
        if walked:
            top, _ = topk_block(sims, m)
        for key in walked:
            nbr = _walk(
                sims,
                top,
                walked[key],
                local[key],
                labels_ext,
                k,
                problem.n_candidates[key][start:stop],
                n_in_cols[start:stop],
            )
            preds[key][start:stop] = majority_vote(nbr, k)
        for big, inner in gathers:
            source = np.take(sims, local[big], axis=1)
            for key, at in inner:
                nbr = _neighbours(np.take(source, at, axis=1), k, local[key], labels_ext)
                preds[key][start:stop] = majority_vote(nbr, k)
            nbr = _neighbours(source, k, local[big], labels_ext)  # last: it overwrites source
            preds[big][start:stop] = majority_vote(nbr, k)
        if full is None:  # last: it may overwrite the block
            found = top[:, :k] if walked else topk_exact(sims, k, overwrite=True)
            preds[(None, 0)][start:stop] = majority_vote(labels_ext[found], k)
    return preds


def topk_exact(sims: NDArray[np.float32], k: int, overwrite: bool = False) -> NDArray[np.int64]:
    """Columns of each row's top k by (value desc, column asc); ``-1`` padded, ``-inf`` skipped.

    The same answer as ``metrics.knn.topk_block``. For small k, k rounds of ``argmax`` (which
    returns the first of equal maxima: the tie rule) beat its sort-based selection several
    times over on narrow blocks. ``overwrite``: the rounds may write into ``sims``.
    """
    if k > SMALL_K:
        return topk_block(sims, k)[0]
    work = sims if overwrite else sims.copy()
    rows = np.arange(work.shape[0])
    out = np.full((work.shape[0], k), -1, dtype=np.int64)
    for j in range(min(k, work.shape[1])):
        best = np.argmax(work, axis=1)
        found = work[rows, best] > -np.inf
        out[:, j] = np.where(found, best, -1)
        work[rows, best] = -np.inf
    return out


def _neighbours(
    sub: NDArray[np.float32], k: int, pos: NDArray[np.int64], labels_ext: NDArray[np.int64]
) -> NDArray[np.int64]:
    """Labels of the top k of a gathered subset block (``sub`` is consumed)."""
    found = topk_exact(sub, k, overwrite=True)
    return labels_ext[np.where(found >= 0, pos[found], -1)]


def _size(key: Key) -> int:
    return -1 if key[0] is None else key[0]


def _walk(
    sims: NDArray[np.float32],
    top: NDArray[np.int64],
    member: NDArray[np.bool_],
    pos: NDArray[np.int64],
    labels_ext: NDArray[np.int64],
    k: int,
    n_subset: NDArray[np.int64],
    n_full: NDArray[np.int64],
) -> NDArray[np.int64]:
    """Neighbour labels ``[b, k]``: the first k subset members of each row's top-M ranking.

    The subset's ranking is the full ranking restricted to the subset, so that is exact —
    unless the top-M holds fewer than k members while the row ranks more than M candidates:
    those rows are redone by gathering the subset's columns.
    """
    b, m = top.shape
    inside = member[top]  # position -1 (padding) -> the appended False
    rank = np.cumsum(inside, axis=1)
    take = inside & (rank <= k)
    nbr = np.full((b, k), -1, dtype=np.int64)
    r_idx, c_idx = np.nonzero(take)
    nbr[r_idx, rank[r_idx, c_idx] - 1] = labels_ext[top[r_idx, c_idx]]
    found = rank[:, -1]
    redo = np.flatnonzero((found < np.minimum(k, n_subset)) & (n_full > m))
    if redo.size:
        cols, _ = topk_block(sims[redo][:, pos], k)
        nbr[redo] = labels_ext[np.where(cols >= 0, pos[cols], -1)]
    return nbr


def macro_f1(
    true: NDArray[np.int64], pred: NDArray[np.int64], scorable: NDArray[np.bool_], n_classes: int
) -> float | None:
    """MV@k macro-F1 of the scorable queries, with ``evaluate``'s formula (None if undefined)."""
    if not scorable.any():
        return None
    support, predicted, tp = class_counts(true[scorable], pred[scorable], n_classes)
    value = float(macro_f1_from_counts(support, predicted, tp))
    return value if math.isfinite(value) else None


@dataclass
class _Draws:
    """Per model and point key, the macro-F1 of every bootstrap draw (NaN = not drawn)."""

    values: dict[tuple[str, Key], NDArray[np.float64]]


def _counts_matrix(
    codes: NDArray[np.int64], units: NDArray[np.int64], n_classes: int, n_units: int
) -> sparse.csr_matrix:
    """(class × unit) counts of ``codes`` (``-1`` = not counted)."""
    ok = codes >= 0
    data = np.ones(int(ok.sum()), dtype=np.float64)
    return sparse.csr_matrix((data, (codes[ok], units[ok])), shape=(n_classes, n_units))


def bootstrap_draws(
    problem: CurveProblem,
    preds: Mapping[str, Mapping[Key, NDArray[np.int64]]],
    bootstrap: int,
    seed: int,
) -> _Draws:
    """MV@k macro-F1 per query-bootstrap draw, draw i on repeat i mod repeats (one pass).

    The draws are ``metrics.bootstrap.resampled_units(n_units, bootstrap, seed)``, those of
    ``evaluate``. Per-class support, true positives and predictions of every subset and model
    are sparse (class × unit) count matrices, stacked per repeat; one product with a chunk of
    draws' unit weights gives them all, so the cost is queries × draws, whatever the number of
    classes, and there is no per-draw Python loop.
    """
    n_units = int(problem.units.max()) + 1 if problem.units.size else 0
    c = len(problem.classes)
    models = list(preds)
    out: dict[tuple[str, Key], NDArray[np.float64]] = {
        (model, key): np.full(bootstrap, np.nan) for model in models for key in problem.keys
    }
    if bootstrap == 0 or n_units < 2:
        return _Draws(out)
    true = problem.label_codes[problem.query_rows]

    def counts(codes: NDArray[np.int64], ok: NDArray[np.bool_]) -> sparse.csr_matrix:
        return _counts_matrix(np.where(ok, codes, -1), problem.units, c, n_units)

    # per repeat (None: the full index): its keys, and their stacked count matrices
    by_repeat: dict[int | None, list[Key]] = {None: [(None, 0)]}
    for size in problem.sizes:
        for rep in range(problem.repeats):
            by_repeat.setdefault(rep, []).append((size, rep))
    stacked: dict[int | None, sparse.csr_matrix] = {}
    for r, keys in by_repeat.items():
        parts = []
        for key in keys:
            ok = problem.scorable(key)
            parts.append(counts(true, ok))
            for model in models:
                pred = preds[model][key]
                parts += [counts(true, ok & (pred == true)), counts(pred, ok)]
        stacked[r] = sparse.vstack(parts, format="csr")
    offset = 0
    for draws in resampled_units(n_units, bootstrap, seed):
        wt = np.ascontiguousarray(unit_weights(draws, n_units).T)  # [units, chunk]
        local = np.arange(draws.shape[0])
        ids = offset + local  # the draws' numbers in the whole stream
        offset += draws.shape[0]
        for r, keys in by_repeat.items():
            cols = local if r is None else local[ids % problem.repeats == r]
            if cols.size == 0:
                continue
            sums = np.asarray(stacked[r] @ wt[:, cols])
            sums = sums.reshape(len(keys), 1 + 2 * len(models), c, cols.size).transpose(0, 1, 3, 2)
            for i, key in enumerate(keys):
                for j, model in enumerate(models):
                    tp, predicted = sums[i, 1 + 2 * j], sums[i, 2 + 2 * j]
                    out[(model, key)][ids[cols]] = macro_f1_from_counts(sums[i, 0], predicted, tp)
    return _Draws(out)


def per_draw(draws: _Draws, model: str, n: int | None, repeats: int) -> NDArray[np.float64]:
    """Draw i's macro-F1 at size ``n``: scored on subset i mod repeats (NaN = undefined)."""
    if n is None:
        return draws.values[(model, (None, 0))]
    stack = np.stack([draws.values[(model, (n, r))] for r in range(repeats)])
    ids = np.arange(stack.shape[1])
    return stack[ids % repeats, ids]


def _full_predictions(
    result: RetrievalResult | None, problem: CurveProblem, k: int
) -> NDArray[np.int64] | None:
    """The full index's MV@k predictions from ``evaluate``, if on exactly these queries."""
    pq = result.per_query if result is not None else None
    if pq is None or k not in pq.ks or pq.classes != tuple(problem.classes):
        return None
    if not np.array_equal(pq.query_rows, problem.query_rows):
        return None
    return pq.mv_pred[pq.ks.index(k)]


def _step(n: int | None) -> str:
    return "all" if n is None else f"{n} per class"


def _flattened(gain: float | None, lo: float | None, margin: float) -> bool | None:
    """True: gained less than δ. False: at least δ, interval above 0. None: can't tell."""
    if gain is None:
        return None
    if gain < margin:
        return True
    if lo is not None and lo <= 0:
        return None
    return False


def _verdict_may_change(
    last: Mapping[str, float | None], full: Mapping[str, float | None], margin: float
) -> bool | None:
    """The models' order changed, or the gap between the best two moved by more than δ."""
    values = {
        m: (float(v_last), float(v_full))
        for m, v_last in last.items()
        if v_last is not None and (v_full := full.get(m)) is not None
    }
    if len(values) < 2:
        return None
    at_last = sorted(values, key=lambda m: (-values[m][0], m))
    at_full = sorted(values, key=lambda m: (-values[m][1], m))
    if at_last != at_full:
        return True
    best, second = at_full[0], at_full[1]
    gap_last = values[best][0] - values[second][0]
    gap_full = values[best][1] - values[second][1]
    return abs(gap_full - gap_last) > margin


def _statement(
    curves: Sequence[LearningCurve], last: int, may_change: bool | None, margin: float
) -> str:
    """One or two plain sentences: has each curve flattened, may the verdict change."""
    step = f"from {_step(last)} to all"
    rising = [c for c in curves if c.flattened is False and c.gain is not None]
    unsure = [c for c in curves if c.flattened is None and c.gain is not None]
    if not rising and not unsure:
        head = "The curves have flattened" if len(curves) > 1 else "The curve has flattened"
        head += f" (less than δ = {margin:g} gained {step})"
    else:
        parts = [f"{c.model} is still improving ({c.gain:+.3f} {step})" for c in rising]
        parts += [f"{c.model} gained {c.gain:+.3f} {step}, within the noise" for c in unsure]
        head = "; ".join(parts)
    if may_change is True:
        return f"{head}: more labels may change the verdict."
    if may_change is False:
        if rising or unsure:
            return (
                f"{head}. The models' order and the gap between the best two held: "
                "more labels are unlikely to change the verdict."
            )
        return f"{head}: more labels are unlikely to change the verdict."
    if rising:
        return f"{head}: more labels should improve it."
    if unsure:
        return f"{head}: more labels may or may not help."
    return f"{head}: more labels are unlikely to improve it."


def learning_curves(
    vectors: Mapping[str, ArrayLike],
    labels: ArrayLike | Sequence[object],
    plan: PlanMasks,
    headline_k: int,
    sizes: Sequence[int],
    repeats: int,
    seed: int,
    margin: float,
    bootstrap: int = 1000,
    confidence: float = 0.95,
    top_m: int = DEFAULT_TOP_M,
    results: Mapping[str, RetrievalResult] | None = None,
) -> LearningCurves:
    """MV@``headline_k`` macro-F1 against labelled images per class, per model.

    Args:
        vectors: model -> ``[N, D]`` float32 rows in the plan's order (same rows per model).
        labels: ``N`` labels (missing ones are neither queries nor candidates).
        plan: the protocol's ``query_mask``, ``candidate_mask`` and ``groups``.
        headline_k: k of MV@k.
        sizes: labelled images per class; those not below the largest class are dropped
            (they are the full index, which is always the last point).
        repeats: seeded random subsets per size, shared by every model.
        seed: seeds the subsets and the query bootstrap (use the report's seed: the full
            index point then carries the report's interval).
        margin: δ, for ``flattened`` and ``verdict_may_change``.
        bootstrap: query resamples (0 = no intervals).
        confidence: interval level.
        top_m: ranking depth walked for large subsets (speed only; results are exact).
        results: the report's ``evaluate`` results per model (optional, speed only): their
            MV@k predictions are the full-index point, so only the subsets' columns are
            computed. Ignored for a model whose result is not on the same queries.
    """
    t0 = time.perf_counter()
    if not vectors:
        raise ValueError("no model to draw learning curves for")
    if bootstrap < 0:
        raise ValueError(f"bootstrap must be >= 0, got {bootstrap}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    n_rows = {np.shape(v)[0] for v in vectors.values()}
    if len(n_rows) != 1:
        raise ValueError(f"models have different row counts: {sorted(n_rows)}")
    problem = build_problem(n_rows.pop(), labels, plan, sizes, repeats, seed)
    known = results or {}
    preds = {
        m: predict(
            v, problem, headline_k, top_m, _full_predictions(known.get(m), problem, headline_k)
        )
        for m, v in vectors.items()
    }
    draws = bootstrap_draws(problem, preds, bootstrap, seed)
    true = problem.label_codes[problem.query_rows]
    n_classes = len(problem.classes)
    last = problem.sizes[-1] if problem.sizes else None

    curves: list[LearningCurve] = []
    at_last: dict[str, float | None] = {}
    at_full: dict[str, float | None] = {}
    for model in vectors:
        points: list[CurvePoint] = []
        means: dict[int | None, float | None] = {}
        for n in [*problem.sizes, None]:
            keys: list[Key] = [(None, 0)] if n is None else [(n, r) for r in range(repeats)]
            values = [
                macro_f1(true, preds[model][key], problem.scorable(key), n_classes) for key in keys
            ]
            defined = [v for v in values if v is not None]
            means[n] = float(np.mean(defined)) if defined else None
            lo, hi = percentile_interval(per_draw(draws, model, n, repeats), confidence)
            if means[n] is None:
                lo = hi = None
            points.append(
                CurvePoint(
                    per_class=n,
                    candidates=float(np.mean([problem.subsets[key].size for key in keys])),
                    value=means[n],
                    ci_low=lo,
                    ci_high=hi,
                    repeats=len(keys),
                    queries=float(np.mean([problem.scorable(key).sum() for key in keys])),
                )
            )
        gain = g_lo = g_hi = None
        full, at_size = means[None], means[last] if last is not None else None
        if full is not None and at_size is not None:
            gain = full - at_size
            g_lo, g_hi = percentile_interval(
                per_draw(draws, model, None, repeats) - per_draw(draws, model, last, repeats),
                confidence,
            )
        at_last[model], at_full[model] = at_size, full
        curves.append(
            LearningCurve(
                model=model,
                points=points,
                gain=gain,
                gain_ci_low=g_lo,
                gain_ci_high=g_hi,
                flattened=_flattened(gain, g_lo, margin),
            )
        )

    may_change = _verdict_may_change(at_last, at_full, margin) if last is not None else None
    if problem.query_rows.size == 0:
        statement = "No query has a candidate: there is no learning curve to draw."
    elif last is None:
        statement = (
            f"The largest class has {problem.largest_class} labelled images, no more than "
            "every size asked for: the curve is the full index alone."
        )
    else:
        statement = _statement(curves, last, may_change, margin)
    interval = "no intervals (bootstrap = 0)"
    if bootstrap:
        interval = INTERVAL.format(
            level=round(confidence * 100),
            draws=bootstrap,
            unit="group" if problem.grouped else "query",
            repeats=repeats,
        )
    return LearningCurves(
        metric=f"MV@{headline_k} macro-F1",
        sizes=problem.sizes,
        dropped_sizes=problem.dropped,
        largest_class=problem.largest_class,
        n_queries=int(problem.query_rows.size),
        repeats=repeats,
        seed=seed,
        margin=margin,
        interval=interval,
        curves=curves,
        verdict_may_change=may_change,
        statement=statement,
        seconds=time.perf_counter() - t0,
    )
