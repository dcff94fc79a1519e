"""The verdict: which model to run, from quality (with its paired CIs) and measured cost.

Three steps (docs/report.md#the-decision):

1. **Pareto front** over the scored models: quality = MV@k macro-F1 point estimate, cost =
   price per 1k images when every model has one, else seconds per 1k images. A model is on the
   front when no other model is at least as good on both and strictly better on one.
2. **Non-inferiority** for every pair where one model is cheaper, from the paired bootstrap CI
   of (cheaper − reference) on MV@k macro-F1 with margin δ: CI low > 0 → better; CI low > −δ →
   non-inferior (within δ); CI high < −δ → worse; otherwise inconclusive (the CI is too wide).
   A cost ratio is stated only when both costs were measured on the same device and provider.
3. **The line**: the reference is the model with the best point estimate (ties: the cheaper,
   then the first asked for). Run the cheapest model that is better than or within δ of it;
   if every cheaper model is worse, run the reference; if some cheaper model is inconclusive
   and none is within δ, there is no clear choice.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from kiban_reporter.cost import CostSummary, cost_comparable
from kiban_reporter.decision_schema import Decision, NonInferiority, ParetoPoint
from kiban_reporter.metrics import MetricDifference, PairComparison
from kiban_reporter.report import ModelSection

METRIC_KEY = "mv_macro_f1"
Basis = Literal["price per 1k images", "seconds per 1k images"]
Outcome = Literal["better", "non-inferior", "worse", "inconclusive"]
PRICE_BASIS: Basis = "price per 1k images"
SECONDS_BASIS: Basis = "seconds per 1k images"


@dataclass(frozen=True)
class Candidate:
    """A scored model as the decision sees it."""

    name: str
    quality: float | None
    ci_low: float | None
    ci_high: float | None
    cost: float | None
    summary: CostSummary
    pretrained: bool
    order: int


def _quality(section: ModelSection, k: int) -> tuple[float | None, float | None, float | None]:
    if section.retrieval is None:
        return None, None, None
    for m in section.retrieval.metrics:
        if m.k == k:
            est = m.mv_macro_f1
            return est.value, est.ci_low, est.ci_high
    return None, None, None


def cost_basis(sections: Sequence[ModelSection]) -> Basis:
    """Price per 1k when every model has one, else seconds per 1k."""
    if sections and all(s.cost.cost_per_1k is not None for s in sections):
        return PRICE_BASIS
    return SECONDS_BASIS


def candidates(sections: Sequence[ModelSection], k: int, basis: Basis) -> list[Candidate]:
    out = []
    for i, s in enumerate(sections):
        q, lo, hi = _quality(s, k)
        cost = s.cost.cost_per_1k if basis == PRICE_BASIS else s.cost.seconds_per_1k
        out.append(Candidate(s.name, q, lo, hi, cost, s.cost, s.pretrained, i))
    return out


def dominates(a: Candidate, b: Candidate) -> bool:
    """a is at least as good and as cheap as b, and strictly better on one."""
    if a.quality is None or b.quality is None or a.cost is None or b.cost is None:
        return False
    return (
        a.quality >= b.quality and a.cost <= b.cost and (a.quality > b.quality or a.cost < b.cost)
    )


def pareto(models: Sequence[Candidate]) -> list[ParetoPoint]:
    """Every model's point and whether it is on the front (unknown quality: never on it)."""
    points = []
    for b in models:
        by = [a.name for a in models if a is not b and dominates(a, b)]
        points.append(
            ParetoPoint(
                model=b.name,
                quality=b.quality,
                quality_ci_low=b.ci_low,
                quality_ci_high=b.ci_high,
                cost=b.cost,
                on_front=b.quality is not None and not by,
                dominated_by=by,
            )
        )
    return points


def ratio_text(ratio: float) -> str:
    """cheaper ÷ reference as "1/N": N whole from 10 on, else one decimal."""
    n = 1.0 / ratio
    if n >= 9.5:
        return f"1/{n:.0f}"
    return f"1/{f'{n:.1f}'.rstrip('0').rstrip('.')}"


def times_text(ratio: float) -> str:
    """reference ÷ cheaper as "N×"."""
    n = 1.0 / ratio
    return f"{n:.0f}×" if n >= 9.5 else f"{f'{n:.1f}'.rstrip('0').rstrip('.')}×"


def _margin(margin: float) -> str:
    return f"{margin:g}"


def _signed(x: float) -> str:
    return f"{x:+.3f}"


def _different_devices(cheaper: CostSummary, reference: CostSummary) -> str:
    return (
        f"the costs were measured on different devices ({cheaper.device}, {cheaper.provider} vs "
        f"{reference.device}, {reference.provider}): no cost ratio"
    )


def _oriented(
    pair: PairComparison, cheaper: str, k: int
) -> tuple[float | None, float | None, float | None, float]:
    """(cheaper − reference) point estimate and CI from the pair's (a − b) difference."""
    diff: MetricDifference | None = next(
        (d for d in pair.differences if d.key == METRIC_KEY and d.k == k), None
    )
    if diff is None:
        return None, None, None, pair.confidence
    if pair.name_a == cheaper:
        return diff.difference, diff.ci_low, diff.ci_high, pair.confidence
    flip = lambda x: None if x is None else -x  # noqa: E731
    return flip(diff.difference), flip(diff.ci_high), flip(diff.ci_low), pair.confidence


def classify(ci_low: float | None, ci_high: float | None, margin: float) -> Outcome:
    """The non-inferiority outcome of (cheaper − reference)'s paired CI against −δ."""
    if ci_low is None or ci_high is None:
        return "inconclusive"
    if ci_low > 0:
        return "better"
    if ci_low > -margin:
        return "non-inferior"
    if ci_high < -margin:
        return "worse"
    return "inconclusive"


def non_inferiority(
    cheaper: Candidate,
    reference: Candidate,
    pair: PairComparison | None,
    k: int,
    margin: float,
) -> NonInferiority:
    """Is ``cheaper`` good enough compared with ``reference``? One statement, with the cost."""
    metric = f"MV@{k} macro-F1"
    d, lo, hi, conf = (None, None, None, 0.95) if pair is None else _oriented(pair, cheaper.name, k)
    outcome = classify(lo, hi, margin)
    comparable = cost_comparable(cheaper.summary, reference.summary)
    ratio = (
        cheaper.cost / reference.cost
        if comparable and cheaper.cost is not None and reference.cost and reference.cost > 0
        else None
    )
    pct = f"paired {conf * 100:.0f}% CI"
    c, r, m = cheaper.name, reference.name, _margin(margin)
    if ratio is not None:
        at_cost = f" at {ratio_text(ratio)} of the cost per 1k images"
        costs = f"; {c} costs {ratio_text(ratio)} of {r}'s per 1k images"
    else:
        devices = _different_devices(cheaper.summary, reference.summary)
        at_cost = costs = f"; {c} costs less per 1k images, but {devices}"
    if lo is None or hi is None or d is None:
        why = "no paired comparison" if pair is None else "the paired difference is undefined"
        statement = (
            f"The data cannot tell whether {c} is within {m} of {r} on {metric} ({why}){costs}."
        )
    elif outcome == "better":
        statement = (
            f"{c} is better than {r} on {metric} ({_signed(d)}, {pct} [{_signed(lo)}, "
            f"{_signed(hi)}]){at_cost}."
        )
    elif outcome == "non-inferior":
        statement = (
            f"{c} is within {m} of {r} on {metric} ({pct} lower bound {_signed(lo)} > -{m})"
            f"{at_cost}."
        )
    elif outcome == "worse":
        statement = (
            f"{c} is worse than {r} on {metric} by {-d:.3f} ({pct} [{_signed(lo)}, "
            f"{_signed(hi)}], upper bound < -{m}){costs}."
        )
    else:
        statement = (
            f"The data cannot tell whether {c} is within {m} of {r} on {metric} (CI too wide: "
            f"{pct} [{_signed(lo)}, {_signed(hi)}]){costs}."
        )
    return NonInferiority(
        cheaper=c,
        reference=r,
        metric=metric,
        margin=margin,
        difference=d,
        ci_low=lo,
        ci_high=hi,
        cost_ratio=ratio,
        cost_comparable=comparable,
        outcome=outcome,
        statement=statement,
    )


def _pair_of(comparisons: Sequence[PairComparison], a: str, b: str) -> PairComparison | None:
    return next((p for p in comparisons if {p.name_a, p.name_b} == {a, b} and a != b), None)


def _is_cheaper(a: Candidate, b: Candidate) -> bool:
    return a.cost is not None and b.cost is not None and a.cost < b.cost


def _reference(models: Sequence[Candidate]) -> Candidate:
    """The best point estimate; ties go to the cheaper, then to the first asked for."""
    return min(
        models,
        key=lambda m: (
            -(m.quality if m.quality is not None else -math.inf),
            m.cost if m.cost is not None else math.inf,
            m.order,
        ),
    )


def _who(m: Candidate) -> str:
    """A model named in another's line: an untrained baseline is said to be one."""
    return m.name if m.pretrained else f"{m.name} (untrained baseline)"


def _est(m: Candidate) -> str:
    if m.quality is None:
        return "–"
    if m.ci_low is None or m.ci_high is None:
        return f"{m.quality:.3f}"
    return f"{m.quality:.3f} [{m.ci_low:.3f}, {m.ci_high:.3f}]"


#: Two models whose compute (MACs) is within SAME_COMPUTE of each other — a base and its head
#: or fine-tuned specialist — but whose measured cost differs by MISMATCH_FACTOR or more are
#: flagged: throughput was probably measured under different load (a shared machine). Models of
#: different architectures are not compared this way (MACs per second differ legitimately).
SAME_COMPUTE = 1.25
MISMATCH_FACTOR = 1.5


def compute_mismatches(models: Sequence[Candidate]) -> list[str]:
    """Pairs of nearly equal compute whose measured cost ratio is far from 1.

    Cost is measured while the shards were encoded: two models encoded at different times on a
    shared machine can differ in throughput for reasons that are not theirs. MACs per image are
    counted from the graphs, so a large disagreement is worth a note next to the decision.
    """
    notes = []
    priced = [m for m in models if m.cost and m.summary.macs_per_image]
    for i, a in enumerate(priced):
        for b in priced[i + 1 :]:
            assert a.cost and b.cost and a.summary.macs_per_image and b.summary.macs_per_image
            measured = a.cost / b.cost
            compute = a.summary.macs_per_image / b.summary.macs_per_image
            similar = max(compute, 1 / compute) <= SAME_COMPUTE
            if similar and max(measured / compute, compute / measured) >= MISMATCH_FACTOR:
                notes.append(
                    f"{a.name} vs {b.name}: measured cost ratio {measured:.2g}x but compute "
                    f"(MACs) ratio {compute:.2g}x — throughput was probably measured under "
                    "different load; re-encode both in one run before trusting that cost ratio."
                )
    return notes


def decide(
    sections: Sequence[ModelSection],
    comparisons: Sequence[PairComparison],
    headline_k: int,
    margin: float,
) -> Decision | None:
    """The report's decision, or ``None`` when no model was scored."""
    scored = [s for s in sections if s.retrieval is not None]
    if not scored:
        return None
    metric = f"MV@{headline_k} macro-F1"
    basis = cost_basis(scored)
    models = candidates(scored, headline_k, basis)
    notes: list[str] = []
    for m in models:
        if not m.pretrained:
            notes.append(
                f"{m.name} has no trained weights (random initialisation): a baseline, not a "
                "model to run."
            )
        if m.summary.mixed_devices:
            notes.append(f"{m.name}: shards from different devices ({m.summary.device}).")
    defined = [m for m in models if m.quality is not None]
    for m in models:
        if m.quality is None:
            notes.append(f"{m.name}: {metric} is undefined (see warnings); left out.")
        elif m.cost is None:
            notes.append(f"{m.name}: no measured cost ({basis}).")
    statements = [
        non_inferiority(a, b, _pair_of(comparisons, a.name, b.name), headline_k, margin)
        for a in defined
        for b in defined
        if _is_cheaper(a, b)
    ]
    line, recommended = _line(defined, statements, comparisons, headline_k, margin, notes)
    notes.extend(compute_mismatches(defined))
    if recommended is not None:
        rec = next(m for m in defined if m.name == recommended)
        if not rec.pretrained:
            line += f" Note: {rec.name} is an untrained (random-init) baseline — check the setup."
    currency = scored[0].cost.currency if basis == PRICE_BASIS else None
    return Decision(
        line=line,
        recommended=recommended,
        metric=metric,
        margin=margin,
        cost_basis=basis,
        currency=currency,
        pareto=pareto(models),
        non_inferiority=statements,
        notes=notes,
    )


def _line(
    models: Sequence[Candidate],
    statements: Sequence[NonInferiority],
    comparisons: Sequence[PairComparison],
    k: int,
    margin: float,
    notes: list[str],
) -> tuple[str, str | None]:
    """The first line and the recommended model (None: no clear choice)."""
    metric = f"MV@{k} macro-F1"
    m = _margin(margin)
    if not models:
        return f"No clear choice: {metric} is undefined for every model (see warnings).", None
    ref = _reference(models)
    if len(models) == 1:
        return (
            f"Run {ref.name}: the only model with a {metric} ({_est(ref)}); nothing to compare "
            "it with.",
            ref.name,
        )
    if any(x.cost is None for x in models):
        return _quality_only_line(ref, models, comparisons, k, notes)
    vs_ref = {s.cheaper: s for s in statements if s.reference == ref.name}
    cheaper = sorted((x for x in models if x.name in vs_ref), key=lambda x: (x.cost, x.order))
    if not cheaper:
        line = f"Run {ref.name}: the best {metric} ({_est(ref)}) at the lowest cost per 1k images"
        others = [x for x in models if x is not ref]
        nxt = max(others, key=lambda x: (x.quality or 0.0, -x.order))
        assert nxt.cost is not None and ref.cost is not None
        if cost_comparable(ref.summary, nxt.summary) and ref.cost > 0:
            line += f"; the next best, {_who(nxt)} ({_est(nxt)}), costs "
            line += (
                f"{times_text(ref.cost / nxt.cost)} more." if nxt.cost > ref.cost else "as much."
            )
        else:
            line += f"; the next best is {_who(nxt)} ({_est(nxt)}), measured on another device."
        return line, ref.name
    several = len(models) > 2
    good = [x for x in cheaper if vs_ref[x.name].outcome in ("better", "non-inferior")]
    if good:
        pick, s = good[0], vs_ref[good[0].name]
        how = "better than" if s.outcome == "better" else "as good as"
        within = "" if s.outcome == "better" else f" within {m}"
        cost = (
            f"at {ratio_text(s.cost_ratio)} of the cost per 1k images"
            if s.cost_ratio is not None
            else "at a lower cost per 1k images as measured (on different devices: no ratio)"
        )
        line = f"Run {pick.name}: {how} {_who(ref)}{within} on {metric} {cost}."
        if several:
            line += (
                f" It is the cheapest of the {len(models)} models within {m} of the "
                f"best-quality one ({ref.name})."
            )
        return line, pick.name
    if all(vs_ref[x.name].outcome == "worse" for x in cheaper):
        closest = max(cheaper, key=lambda x: (x.quality or 0.0, -x.order))
        s = vs_ref[closest.name]
        assert s.difference is not None and s.ci_low is not None and s.ci_high is not None
        who = (
            f"every cheaper model is worse; the closest, {_who(closest)}, is"
            if several
            else f"{_who(closest)} is"
        )
        cost = (
            f"the better quality costs {times_text(s.cost_ratio)} more per 1k images"
            if s.cost_ratio is not None
            else "the better quality costs more per 1k images as measured (on different "
            "devices: no ratio)"
        )
        return (
            f"Run {ref.name}: {who} worse by {-s.difference:.3f} {metric} (paired CI "
            f"[{_signed(s.ci_low)}, {_signed(s.ci_high)}]); {cost}.",
            ref.name,
        )
    unsure = next(x for x in cheaper if vs_ref[x.name].outcome == "inconclusive")
    s = vs_ref[unsure.name]
    ci = (
        f"paired CI [{_signed(s.ci_low)}, {_signed(s.ci_high)}]"
        if s.ci_low is not None and s.ci_high is not None
        else "no paired interval"
    )
    cost = (
        f", at {ratio_text(s.cost_ratio)} of the cost per 1k images,"
        if s.cost_ratio is not None
        else ""
    )
    return (
        f"No clear choice: the data cannot tell whether {unsure.name}{cost} is within {m} of "
        f"{ref.name} on {metric} ({ci}); {ref.name} has the best point estimate. More labelled "
        "queries would narrow the interval.",
        None,
    )


def _quality_only_line(
    ref: Candidate,
    models: Sequence[Candidate],
    comparisons: Sequence[PairComparison],
    k: int,
    notes: list[str],
) -> tuple[str, str | None]:
    """Without a cost for every model: the best model if its CI beats every other's."""
    metric = f"MV@{k} macro-F1"
    notes.append("Cost was not measured for every model: decided on quality alone.")
    unsure = []
    for other in models:
        if other is ref:
            continue
        pair = _pair_of(comparisons, ref.name, other.name)
        lo = _oriented(pair, ref.name, k)[1] if pair is not None else None
        if lo is None or lo <= 0:
            unsure.append(other.name)
    if not unsure:
        return (
            f"Run {ref.name}: better than every other model on {metric} ({_est(ref)}); cost "
            "was not measured for every model.",
            ref.name,
        )
    return (
        f"No clear choice: {ref.name} has the best {metric} ({_est(ref)}) but the data cannot "
        f"tell it from {', '.join(unsure)}; cost was not measured for every model.",
        None,
    )
