"""Evaluation protocols as query / candidate masks over one key-ordered row list.

Pure logic, no I/O: the evaluation reads the rows (one per image, of this batch and, for
cross-batch, of earlier batches), this module decides which rows query, which are searched and
what is excluded, and ``kiban_reporter.metrics.evaluate`` does the rest through its
``query_mask`` / ``candidate_mask`` / ``groups`` arguments.

Row order — the tie rule's "key": rows are sorted by ``(batch id, image key)``. Within one
batch that is the image key (as in the metrics engine); across batches the batch id comes
first. Two candidates with exactly the same similarity are ranked by that order.

Protocols (``EvaluationProtocol.name``):

``leave-one-out``
    Every labelled image of the batch queries every other labelled image of the batch.
``leave-one-group-out``
    As leave-one-out, but no image of the query's own group (patient / slide / lot) is a
    candidate. Asked for on a batch without groups: leave-one-out, with a warning.
``auto``
    leave-one-group-out when the batch has groups, else leave-one-out.
``split``
    Queries are the images whose split is ``query_split``; candidates are the images of every
    other split. Splits come from the manifest when any image has one (images without a split
    are candidates, counted and warned). Otherwise they are assigned by hashing (``SPLIT_RULE``):
    the unit is the group, so a group is never split. With groups, same-group candidates are
    excluded as well (this matters only when manifest splits cut through a group: warned).
``cross-batch``
    This batch's images query the accumulated index of earlier batches (only those rows are
    candidates). An image of this batch found again in an earlier one (same sha256) is not a
    candidate: it would find itself. The same image in several earlier batches is one candidate
    (the newest batch's row), as it is one point in Qdrant. Group names are local to a batch
    (``batch/group``): they are not used to exclude across batches, but they stay the bootstrap
    unit of this batch's queries.
``query_sample``
    After the protocol, an optional class-stratified, seeded sample of the queries (see
    ``stratified_sample``); candidates are unchanged.

Each protocol has its own planner (``plan_leave_one_out`` ... ``plan_cross_batch``, and
``plan_auto`` choosing between the first two); ``plan_protocol`` dispatches through
``PLANNERS`` and then applies the query sample (``sample_queries``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, Field

from kiban.messages import EvaluationProtocol
from kiban.splits import SPLIT_RULE, held_out_units, unit_fraction  # noqa: F401 - re-exported

ProtocolName = Literal["auto", "leave-one-out", "leave-one-group-out", "split", "cross-batch"]

SAMPLE_RULE = (
    "class-stratified: one query per class first (when the sample is at least the number of "
    "classes), the rest in proportion to class size minus one (largest remainder, ties by class "
    "name); within a class numpy.random.default_rng(seed).choice over the key-ordered rows"
)


@dataclass(frozen=True)
class EvalRow:
    """One image in the evaluation: where it comes from and what the protocols need."""

    batch: str
    key: str
    sha256: str
    label: str | None
    group: str | None = None
    split: str | None = None

    @property
    def labelled(self) -> bool:
        return bool(self.label)


class SplitAssignment(BaseModel):
    source: Literal["manifest", "hash"] = Field(description="where the splits came from")
    query_split: str
    other_split: str | None = Field(description="name given to the non-query side (hash)")
    rule: str
    test_fraction: float | None = Field(description="hash assignment: target share of units")
    images: dict[str, int] = Field(description="split → images")
    units: dict[str, int] = Field(description="split → groups (or images without a group)")
    n_without_split: int = Field(description="manifest: images with no split (candidates)")
    n_groups_across_splits: int = Field(description="groups with images in both sides")


class QuerySample(BaseModel):
    requested: int
    size: int = Field(description="queries drawn (≤ requested)")
    population: int = Field(description="queries the protocol gave before sampling")
    seed: int
    per_class: dict[str, int]
    rule: str = SAMPLE_RULE


class CrossBatchHistory(BaseModel):
    batches: list[str] = Field(description="earlier batches forming the index, oldest first")
    discovered: bool = Field(description="true: found in the store (history_batches empty)")
    n_images: int = Field(description="candidate images after the exclusions below")
    n_same_as_query_batch: int = Field(description="earlier images with a sha256 in this batch")
    n_repeated: int = Field(description="images in several earlier batches, kept once (newest)")


@dataclass
class ProtocolPlan:
    """The resolved protocol: masks and groups for ``evaluate``, plus what the report records."""

    requested: str
    name: str
    query_mask: NDArray[np.bool_]
    candidate_mask: NDArray[np.bool_]
    groups: list[str | None] | None
    exclusion: str
    split: SplitAssignment | None = None
    sample: QuerySample | None = None
    history: CrossBatchHistory | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def n_queries(self) -> int:
        return int(np.count_nonzero(self.query_mask))

    @property
    def n_candidates(self) -> int:
        return int(np.count_nonzero(self.candidate_mask))

    def group_codes(self) -> NDArray[np.int64]:
        """Exclusion codes as the metrics engine builds them (own code without a group)."""
        n = self.query_mask.size
        if self.groups is None:
            return np.arange(n, dtype=np.int64)
        names = sorted({g for g in self.groups if g})
        index = {g: i for i, g in enumerate(names)}
        codes = np.empty(n, dtype=np.int64)
        nxt = len(names)
        for i, g in enumerate(self.groups):
            if g:
                codes[i] = index[g]
            else:
                codes[i] = nxt
                nxt += 1
        return codes


def assign_splits(
    rows: Sequence[EvalRow], query_split: str, test_fraction: float
) -> tuple[list[str | None], SplitAssignment]:
    """Each row's split: from the manifest when any row has one, else by hashing its group."""
    units = [r.group or r.sha256 for r in rows]
    if any(r.split for r in rows):
        splits: list[str | None] = [r.split or None for r in rows]
        source: Literal["manifest", "hash"] = "manifest"
        other = None
        fraction = None
        rule = "splits from the manifest; images without a split are candidates"
    else:
        other = "index" if query_split != "index" else "candidates"
        test = held_out_units(units, test_fraction)
        splits = [query_split if u in test else other for u in units]
        source, fraction, rule = "hash", test_fraction, SPLIT_RULE
    side = ["query" if s == query_split else "other" for s in splits]
    sides_of_unit: dict[str, set[str]] = {}
    for r, s in zip(rows, side, strict=True):
        if r.group:
            sides_of_unit.setdefault(r.group, set()).add(s)
    images = Counter(s if s is not None else "(none)" for s in splits)
    unit_sets: dict[str, set[str]] = {}
    for u, sp in zip(units, splits, strict=True):
        unit_sets.setdefault(sp if sp is not None else "(none)", set()).add(u)
    return splits, SplitAssignment(
        source=source,
        query_split=query_split,
        other_split=other,
        rule=rule,
        test_fraction=fraction,
        images=dict(sorted(images.items())),
        units={k: len(v) for k, v in sorted(unit_sets.items())},
        n_without_split=sum(1 for s in splits if s is None),
        n_groups_across_splits=sum(1 for v in sides_of_unit.values() if len(v) > 1),
    )


def _largest_remainder(total: int, weights: dict[str, int]) -> dict[str, int]:
    wsum = sum(weights.values())
    if total <= 0 or wsum <= 0:
        return dict.fromkeys(weights, 0)
    exact = {c: total * w / wsum for c, w in weights.items()}
    out = {c: int(np.floor(v)) for c, v in exact.items()}
    left = total - sum(out.values())
    order = sorted(weights, key=lambda c: (-(exact[c] - out[c]), c))
    for c in order[:left]:
        out[c] += 1
    return out


def stratified_sample(
    labels: Sequence[str], n: int, seed: int
) -> tuple[NDArray[np.int64], dict[str, int]]:
    """Ascending positions of a class-stratified, seeded sample of ``n`` of ``labels``.

    Same labels, n and seed → the same sample. See ``SAMPLE_RULE``.
    """
    classes = sorted(set(labels))
    index = {c: i for i, c in enumerate(classes)}
    codes = np.fromiter((index[label] for label in labels), dtype=np.int64, count=len(labels))
    return stratified_sample_codes(codes, classes, n, seed)


def stratified_sample_codes(
    codes: NDArray[np.int64], classes: Sequence[str], n: int, seed: int
) -> tuple[NDArray[np.int64], dict[str, int]]:
    """``stratified_sample`` over label codes (``classes[code]``, sorted): the same sample.

    The streamed evaluation keeps a million labels as codes, not strings; one implementation
    serves both so the in-memory and streamed paths draw identical queries.
    """
    codes = np.asarray(codes, dtype=np.int64)
    total = codes.size
    counts = np.bincount(codes, minlength=len(classes)) if total else np.zeros(len(classes), int)
    present = [i for i in range(len(classes)) if counts[i]]
    if n >= total:
        return np.arange(total, dtype=np.int64), {classes[i]: int(counts[i]) for i in present}
    rng = np.random.default_rng(seed)
    if n < len(present):
        picked = sorted(rng.choice(len(present), size=n, replace=False).tolist())
        quota = {i: (1 if j in picked else 0) for j, i in enumerate(present)}
    else:
        extra = _largest_remainder(
            n - len(present), {classes[i]: int(counts[i]) - 1 for i in present}
        )
        quota = {i: 1 + extra[classes[i]] for i in present}
    chosen: list[NDArray[np.int64]] = []
    for i in present:
        if quota[i]:
            members = np.flatnonzero(codes == i).astype(np.int64)
            chosen.append(rng.choice(members, size=quota[i], replace=False))
    out = np.sort(np.concatenate(chosen)).astype(np.int64) if chosen else np.zeros(0, np.int64)
    return out, {classes[i]: quota[i] for i in present if quota[i]}


def check_order(rows: Sequence[EvalRow]) -> None:
    keys = [(r.batch, r.key) for r in rows]
    if any(a >= b for a, b in zip(keys, keys[1:], strict=False)):
        raise ValueError(
            "rows must be strictly ordered by (batch, key): that order is the tie rule"
        )


@dataclass
class PlanInput:
    """What every protocol planner reads: the request, the rows and masks derived from them.

    Computed once in ``plan_protocol`` so each planner states only its own rule.
    """

    protocol: EvaluationProtocol
    rows: Sequence[EvalRow]
    batch_id: str
    history: Sequence[str] = ()
    discovered: bool = False
    current: NDArray[np.bool_] = field(init=False, repr=False)
    labelled: NDArray[np.bool_] = field(init=False, repr=False)
    grouped: bool = field(init=False)

    def __post_init__(self) -> None:
        n = len(self.rows)
        self.current = np.fromiter((r.batch == self.batch_id for r in self.rows), bool, count=n)
        self.labelled = np.fromiter((r.labelled for r in self.rows), bool, count=n)
        self.grouped = any(r.group for r, c in zip(self.rows, self.current, strict=True) if c)

    @property
    def n(self) -> int:
        return len(self.rows)

    def row_groups(self) -> list[str | None]:
        """Every row's group, the exclusion unit of the group-aware protocols."""
        return [r.group for r in self.rows]


def plan_leave_one_out(inp: PlanInput) -> ProtocolPlan:
    """Every labelled image of the batch queries every other one: the paper's protocol."""
    return ProtocolPlan(
        requested=inp.protocol.name,
        name="leave-one-out",
        query_mask=inp.current & inp.labelled,
        candidate_mask=inp.current & inp.labelled,
        groups=None,
        exclusion="the query itself",
    )


def plan_leave_one_group_out(inp: PlanInput) -> ProtocolPlan:
    """As leave-one-out, but a query never matches its own group (patient / slide / lot).

    Same-group images share acquisition conditions, so finding them inflates the metrics. A
    batch without groups has nothing to exclude: leave-one-out, with a warning.
    """
    if not inp.grouped:
        plan = plan_leave_one_out(inp)
        plan.warnings.append(
            "leave-one-group-out asked for, but the batch has no groups: leave-one-out instead"
        )
        return plan
    return ProtocolPlan(
        requested=inp.protocol.name,
        name="leave-one-group-out",
        query_mask=inp.current & inp.labelled,
        candidate_mask=inp.current & inp.labelled,
        groups=inp.row_groups(),
        exclusion="the query and every image of its group",
    )


def plan_auto(inp: PlanInput) -> ProtocolPlan:
    """The strictest protocol the batch allows: leave-one-group-out with groups, else LOO."""
    return plan_leave_one_group_out(inp) if inp.grouped else plan_leave_one_out(inp)


def _split_warnings(
    split: SplitAssignment, query_split: str, any_query: bool, grouped: bool
) -> list[str]:
    """What a reader of a split report must know: empty query side, unsplit images, leaks."""
    warnings: list[str] = []
    if split.source == "manifest" and not any_query:
        warnings.append(
            f"split: no image is in split {query_split!r} "
            f"(splits: {', '.join(k for k in split.images if k != '(none)') or 'none'})"
        )
    if split.n_without_split:
        warnings.append(
            f"split: {split.n_without_split} images have no split in the manifest; "
            "they are candidates"
        )
    if grouped and split.n_groups_across_splits:
        warnings.append(
            f"split: {split.n_groups_across_splits} groups have images on both sides of "
            "the manifest's split; their same-group candidates are excluded"
        )
    return warnings


#: The split protocol's warnings, shared with the streamed evaluation.
split_warnings = _split_warnings


def plan_split(inp: PlanInput) -> ProtocolPlan:
    """Queries from ``query_split`` against the images of every other split.

    Mirrors a held-out test set; see ``assign_splits`` for where the splits come from. With
    groups, same-group candidates are excluded too, in case the manifest's split cuts a group.
    """
    protocol = inp.protocol
    cur_idx = np.flatnonzero(inp.current)
    splits, split = assign_splits(
        [inp.rows[int(i)] for i in cur_idx], protocol.query_split, protocol.test_fraction
    )
    is_query = np.zeros(inp.n, dtype=bool)
    is_query[cur_idx] = [s == protocol.query_split for s in splits]
    if inp.grouped:
        groups: list[str | None] | None = inp.row_groups()
        exclusion = "images of the query's group (groups never span splits when hashed)"
    else:
        groups = None
        exclusion = "nothing (queries and candidates are disjoint)"
    return ProtocolPlan(
        requested=protocol.name,
        name="split",
        query_mask=is_query & inp.labelled,
        candidate_mask=inp.current & ~is_query & inp.labelled,
        groups=groups,
        exclusion=exclusion,
        split=split,
        warnings=_split_warnings(split, protocol.query_split, bool(is_query.any()), inp.grouped),
    )


def _history_candidates(inp: PlanInput) -> tuple[NDArray[np.bool_], int, int]:
    """Cross-batch candidates: labelled history rows, one per image, none seen in this batch.

    Returns the mask, the rows dropped for being in this batch and those dropped as repeats
    (the newest batch's copy is kept, as Qdrant holds one point per image).
    """
    rows, current, labelled = inp.rows, inp.current, inp.labelled
    order = {b: i for i, b in enumerate(inp.history)}
    cur_shas = {r.sha256 for r, c in zip(rows, current, strict=True) if c}
    newest: dict[str, int] = {}
    same = repeated = 0
    for i, r in enumerate(rows):
        if current[i] or not labelled[i]:
            continue
        if r.sha256 in cur_shas:
            same += 1
            continue
        j = newest.get(r.sha256)
        if j is None:
            newest[r.sha256] = i
            continue
        repeated += 1
        if order.get(r.batch, -1) > order.get(rows[j].batch, -1):
            newest[r.sha256] = i
    cmask = np.zeros(inp.n, dtype=bool)
    cmask[list(newest.values())] = True
    return cmask, same, repeated


def plan_cross_batch(inp: PlanInput) -> ProtocolPlan:
    """This batch's images query the accumulated index of the earlier batches.

    Answers "does tonight's batch find its look-alikes in what we already have?". Group names
    are local to a batch, so they are namespaced (``batch/group``): no exclusion across batches,
    but still the bootstrap unit of this batch's queries.
    """
    cmask, same, repeated = _history_candidates(inp)
    warnings: list[str] = []
    if not inp.history:
        warnings.append("cross-batch: no earlier batch to search; nothing is scored")
    elif not cmask.any():
        warnings.append("cross-batch: the earlier batches have no labelled image to search")
    groups: list[str | None] | None = None
    if inp.grouped:
        groups = [f"{r.batch}/{r.group}" if r.group else None for r in inp.rows]
    return ProtocolPlan(
        requested=inp.protocol.name,
        name="cross-batch",
        query_mask=inp.current & inp.labelled,
        candidate_mask=cmask,
        groups=groups,
        exclusion="the same image (sha256) found in an earlier batch",
        history=CrossBatchHistory(
            batches=list(inp.history),
            discovered=inp.discovered,
            n_images=int(cmask.sum()),
            n_same_as_query_batch=same,
            n_repeated=repeated,
        ),
        warnings=warnings,
    )


Planner = Callable[[PlanInput], ProtocolPlan]
PLANNERS: dict[ProtocolName, Planner] = {
    "auto": plan_auto,
    "leave-one-out": plan_leave_one_out,
    "leave-one-group-out": plan_leave_one_group_out,
    "split": plan_split,
    "cross-batch": plan_cross_batch,
}


def sample_queries(plan: ProtocolPlan, inp: PlanInput) -> ProtocolPlan:
    """``plan`` with its queries cut to the class-stratified, seeded ``query_sample``.

    Applied after every protocol, so a large batch can be scored on fewer queries against all
    of its candidates; the candidates are unchanged.
    """
    protocol = inp.protocol
    if protocol.query_sample is None:
        return plan
    pop = np.flatnonzero(plan.query_mask)
    labels = [str(inp.rows[int(i)].label) for i in pop]
    classes = sorted(set(labels))
    index = {c: i for i, c in enumerate(classes)}
    codes = np.fromiter((index[label] for label in labels), dtype=np.int64, count=len(labels))
    return apply_sample(plan, codes, classes, protocol.query_sample, protocol.seed)


def apply_sample(
    plan: ProtocolPlan,
    population_codes: NDArray[np.int64],
    classes: Sequence[str],
    requested: int,
    seed: int,
) -> ProtocolPlan:
    """``plan`` with its queries cut to a stratified sample of ``requested`` of them.

    ``population_codes`` are the label codes (``classes[code]``) of the plan's queries in row
    order. Shared by the in-memory and the streamed evaluation.
    """
    pop = np.flatnonzero(plan.query_mask)
    picked, per_class = stratified_sample_codes(population_codes, classes, requested, seed)
    qmask = np.zeros(plan.query_mask.size, dtype=bool)
    qmask[pop[picked]] = True
    warnings = list(plan.warnings)
    if picked.size < requested:
        warnings.append(
            f"query sample of {requested} asked for, only {pop.size} queries: all of them are used"
        )
    sample = QuerySample(
        requested=requested,
        size=int(picked.size),
        population=int(pop.size),
        seed=seed,
        per_class=per_class,
    )
    return replace(plan, query_mask=qmask, sample=sample, warnings=warnings)


def plan_protocol(
    protocol: EvaluationProtocol,
    rows: Sequence[EvalRow],
    batch_id: str,
    history: Sequence[str] = (),
    discovered: bool = False,
) -> ProtocolPlan:
    """Masks for ``protocol`` over ``rows`` (sorted by (batch, key)).

    Args:
        rows: this batch's images and, for cross-batch, those of the ``history`` batches.
        batch_id: this batch (the queries come from it).
        history: cross-batch: the earlier batches, oldest first (the newest copy of a repeated
            image is the one kept).
        discovered: recorded in the report (history found in the store, not given).
    """
    check_order(rows)
    inp = PlanInput(protocol, rows, batch_id, history, discovered)
    return sample_queries(PLANNERS[protocol.name](inp), inp)
