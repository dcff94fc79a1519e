"""The verdict: Pareto front, non-inferiority against δ, and the decision line."""

from __future__ import annotations

import pytest

from kiban_reporter.cost import CostSummary
from kiban_reporter.decision import (
    Candidate,
    classify,
    decide,
    dominates,
    non_inferiority,
    pareto,
    ratio_text,
)
from kiban_reporter.metrics import (
    Estimate,
    KMetrics,
    MetricDifference,
    PairComparison,
    RetrievalResult,
)
from kiban_reporter.report import ModelSection

DEVICE = "cpu (AMD EPYC)"
CPU = "CPUExecutionProvider"


def _cost(s_per_1k: float | None, device: str = DEVICE, price: float | None = None) -> CostSummary:
    return CostSummary(
        images=100,
        provider=CPU,
        threads=0,
        batch_size=32,
        device=device,
        encode_images_per_second=1000 / s_per_1k if s_per_1k else None,
        inference_images_per_second=None,
        seconds_per_1k=s_per_1k,
        price_per_hour=price,
        currency="EUR",
        cost_per_1k=price * s_per_1k / 3600 if price is not None and s_per_1k else None,
        bytes_per_vector=64,
        params=1,
        model_file_bytes=1,
        devices=[device],
    )


def _est(value: float | None, half: float = 0.02) -> Estimate:
    if value is None:
        return Estimate(value=None, n=0)
    return Estimate(value=value, ci_low=value - half, ci_high=value + half, n=100)


def _retrieval(name: str, f1: float | None) -> RetrievalResult:
    e = _est(f1)
    return RetrievalResult(
        name=name,
        protocol="leave-one-out",
        ks=[5],
        classes=["a", "b"],
        n_rows=100,
        n_queries=100,
        n_candidates=100,
        n_unlabelled=0,
        n_queries_without_candidates=0,
        n_queries_without_relevant=0,
        n_groups=None,
        bootstrap_unit="query",
        bootstrap_resamples=100,
        seed=0,
        confidence=0.95,
        metrics=[
            KMetrics(
                k=5,
                acc_at_k=e,
                mv_accuracy=e,
                mv_macro_f1=e,
                mv_weighted_f1=f1,
                map_at_k=e,
                n_queries_short=0,
                classification=None,
            )
        ],
        warnings=[],
    )


def _section(
    name: str,
    f1: float | None,
    s_per_1k: float | None,
    device: str = DEVICE,
    pretrained: bool = True,
    scored: bool = True,
    price: float | None = None,
) -> ModelSection:
    return ModelSection(
        name=name,
        family="domain",
        source="x",
        architecture="x",
        weights="w" if pretrained else "none",
        pretrained=pretrained,
        embedding_dim=16,
        params=1,
        model_sha256="0" * 64,
        parity_min_cosine=None,
        images_encoded=100,
        encode_failures=[],
        retrieval=_retrieval(name, f1) if scored else None,
        cost=_cost(s_per_1k, device, price),
    )


def _pair(a: str, b: str, diff: float, lo: float, hi: float, k: int = 5) -> PairComparison:
    """A paired comparison whose MV@k macro-F1 difference is a − b = diff [lo, hi]."""
    return PairComparison(
        name_a=a,
        name_b=b,
        n_queries=100,
        bootstrap_unit="query",
        bootstrap_resamples=100,
        seed=0,
        confidence=0.95,
        differences=[
            MetricDifference(
                metric=f"MV@{k} macro-F1",
                key="mv_macro_f1",
                k=k,
                value_a=None,
                value_b=None,
                difference=diff,
                ci_low=lo,
                ci_high=hi,
                verdict="",
            ),
            # another metric with opposite numbers: must not be the one read
            MetricDifference(
                metric=f"MV@{k} accuracy",
                key="mv_accuracy",
                k=k,
                value_a=None,
                value_b=None,
                difference=-diff,
                ci_low=-hi,
                ci_high=-lo,
                verdict="",
            ),
        ],
        verdicts=[],
        warnings=[],
    )


def _cand(name: str, q: float | None, c: float | None, order: int = 0) -> Candidate:
    return Candidate(name, q, None, None, c, _cost(c or 1.0), True, order)


# --- Pareto -------------------------------------------------------------------------------


def test_pareto_front_dominance_and_ties() -> None:
    pts = {
        p.model: p
        for p in pareto(
            [
                _cand("best", 0.9, 100.0),
                _cand("cheap", 0.7, 10.0),
                _cand("dominated", 0.6, 50.0),  # worse and dearer than cheap
                _cand("twin", 0.7, 10.0),  # identical to cheap: neither dominates
                _cand("tie-q", 0.9, 200.0),  # as good as best but dearer: dominated
                _cand("undefined", None, 1.0),
            ]
        )
    }
    assert pts["best"].on_front and pts["cheap"].on_front and pts["twin"].on_front
    assert not pts["dominated"].on_front
    assert set(pts["dominated"].dominated_by) == {"cheap", "twin"}
    assert pts["tie-q"].dominated_by == ["best"]
    assert not pts["undefined"].on_front and pts["undefined"].dominated_by == []
    assert dominates(_cand("a", 0.5, 1.0), _cand("b", 0.5, 2.0))
    assert not dominates(_cand("a", 0.5, 1.0), _cand("b", 0.5, 1.0))
    assert not dominates(_cand("a", 0.5, None), _cand("b", 0.4, 2.0))


# --- non-inferiority ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lo", "hi", "outcome"),
    [
        (0.01, 0.05, "better"),
        (-0.005, 0.02, "non-inferior"),
        (-0.30, -0.20, "worse"),
        (-0.05, 0.02, "inconclusive"),
        (-0.05, -0.005, "inconclusive"),  # below 0 but not clearly beyond −δ
        (None, None, "inconclusive"),
    ],
)
def test_classify(lo: float | None, hi: float | None, outcome: str) -> None:
    assert classify(lo, hi, 0.01) == outcome


@pytest.mark.parametrize("cheaper_is_a", [True, False])
@pytest.mark.parametrize(
    ("diff", "lo", "hi", "outcome", "words"),
    [
        (0.03, 0.01, 0.05, "better", "is better than"),
        (0.002, -0.004, 0.008, "non-inferior", "lower bound -0.004 > -0.01"),
        (-0.25, -0.31, -0.19, "worse", "is worse than vit on MV@5 macro-F1 by 0.250"),
        (-0.01, -0.06, 0.04, "inconclusive", "CI too wide"),
    ],
)
def test_non_inferiority_in_both_sign_orientations(
    cheaper_is_a: bool, diff: float, lo: float, hi: float, outcome: str, words: str
) -> None:
    """difference = a − b in the pair; the statement is always cheaper − reference."""
    cheap = Candidate("effnet", 0.8, None, None, 10.0, _cost(10.0), True, 0)
    dear = Candidate("vit", 0.8, None, None, 110.0, _cost(110.0), True, 1)
    pair = (
        _pair("effnet", "vit", diff, lo, hi)
        if cheaper_is_a
        else _pair("vit", "effnet", -diff, -hi, -lo)
    )
    ni = non_inferiority(cheap, dear, pair, 5, 0.01)
    assert ni.outcome == outcome
    assert ni.cheaper == "effnet" and ni.reference == "vit"
    assert ni.difference == pytest.approx(diff)
    assert ni.ci_low == pytest.approx(lo) and ni.ci_high == pytest.approx(hi)
    assert words in ni.statement
    assert ni.cost_comparable and ni.cost_ratio == pytest.approx(10 / 110)
    assert "1/11" in ni.statement


def test_non_inferiority_states_the_example_sentence() -> None:
    cheap = Candidate("effnet-head", 0.8, None, None, 10.0, _cost(10.0), True, 0)
    dear = Candidate("vit-b-32", 0.8, None, None, 110.0, _cost(110.0), True, 1)
    ni = non_inferiority(cheap, dear, _pair("effnet-head", "vit-b-32", 0.0, -0.004, 0.004), 5, 0.01)
    assert ni.statement == (
        "effnet-head is within 0.01 of vit-b-32 on MV@5 macro-F1 (paired 95% CI lower bound "
        "-0.004 > -0.01) at 1/11 of the cost per 1k images."
    )


def test_different_devices_give_no_ratio() -> None:
    cheap = Candidate("effnet", 0.8, None, None, 10.0, _cost(10.0, device="gpu (H200)"), True, 0)
    dear = Candidate("vit", 0.8, None, None, 110.0, _cost(110.0), True, 1)
    ni = non_inferiority(cheap, dear, _pair("effnet", "vit", 0.0, -0.004, 0.004), 5, 0.01)
    assert not ni.cost_comparable and ni.cost_ratio is None
    assert "different devices" in ni.statement and "1/" not in ni.statement
    d = decide(
        [_section("effnet", 0.799, 10.0, device="gpu (H200)"), _section("vit", 0.8, 110.0)],
        [_pair("effnet", "vit", 0.0, -0.004, 0.004)],
        5,
        0.01,
    )
    assert d is not None and d.recommended == "effnet"
    assert "different devices: no ratio" in d.line and "1/" not in d.line


def test_ratio_text() -> None:
    assert ratio_text(10 / 110) == "1/11"
    assert ratio_text(0.5) == "1/2"
    assert ratio_text(0.4) == "1/2.5"


# --- the decision line --------------------------------------------------------------------


def test_two_models_cheaper_within_margin_is_run() -> None:
    sections = [_section("vit-b-32", 0.804, 110.0), _section("effnet-head", 0.80, 10.0)]
    # the pair is (vit − effnet): effnet − vit = −0.004 [−0.008, +0.003], lower bound > −δ
    d = decide(sections, [_pair("vit-b-32", "effnet-head", 0.004, -0.003, 0.008)], 5, 0.01)
    assert d is not None
    assert d.line == (
        "Run effnet-head: as good as vit-b-32 within 0.01 on MV@5 macro-F1 at 1/11 of the cost "
        "per 1k images."
    )
    assert d.recommended == "effnet-head" and d.cost_basis == "seconds per 1k images"
    assert {p.model for p in d.pareto if p.on_front} == {"vit-b-32", "effnet-head"}
    (ni,) = d.non_inferiority
    assert ni.cheaper == "effnet-head" and ni.outcome == "non-inferior"
    assert ni.difference == pytest.approx(-0.004) and ni.ci_low == pytest.approx(-0.008)


def test_two_models_cheaper_worse_runs_the_better_one() -> None:
    sections = [_section("vit-b-32", 0.85, 110.0), _section("effnet", 0.60, 10.0)]
    d = decide(sections, [_pair("effnet", "vit-b-32", -0.25, -0.31, -0.19)], 5, 0.01)
    assert d is not None and d.recommended == "vit-b-32"
    assert d.line.startswith("Run vit-b-32: effnet is worse by 0.250 MV@5 macro-F1")
    assert "the better quality costs 11× more per 1k images" in d.line


def test_two_models_inconclusive_is_no_clear_choice() -> None:
    sections = [_section("vit-b-32", 0.85, 110.0), _section("effnet", 0.83, 10.0)]
    d = decide(sections, [_pair("effnet", "vit-b-32", -0.02, -0.09, 0.05)], 5, 0.01)
    assert d is not None and d.recommended is None
    assert d.line.startswith("No clear choice:") and "[-0.090, +0.050]" in d.line


def test_best_and_cheapest_is_run() -> None:
    sections = [_section("a", 0.9, 5.0), _section("b", 0.7, 50.0)]
    d = decide(sections, [_pair("a", "b", 0.2, 0.1, 0.3)], 5, 0.01)
    assert d is not None and d.recommended == "a"
    assert (
        "at the lowest cost per 1k images; the next best, b (0.700 [0.680, 0.720]), costs 10× more."
        in d.line
    )
    assert d.non_inferiority[0].outcome == "better"  # a is the cheaper one here


def test_three_models_pick_the_cheapest_non_inferior_to_the_best() -> None:
    sections = [
        _section("big", 0.90, 200.0),
        _section("mid", 0.89, 50.0),
        _section("tiny", 0.70, 5.0),
    ]
    pairs = [
        _pair("big", "mid", 0.01, -0.004, 0.03),  # mid − big CI low = −0.03 < −δ … see below
        _pair("big", "tiny", 0.20, 0.15, 0.25),
        _pair("mid", "tiny", 0.19, 0.14, 0.24),
    ]
    # mid − big = [−0.03, +0.004]: inconclusive with δ = 0.01, non-inferior with δ = 0.05
    d = decide(sections, pairs, 5, 0.05)
    assert d is not None and d.recommended == "mid"
    assert d.line.startswith("Run mid: as good as big within 0.05 on MV@5 macro-F1 at 1/4")
    assert "cheapest of the 3 models within 0.05 of the best-quality one (big)" in d.line
    assert len(d.non_inferiority) == 3
    strict = decide(sections, pairs, 5, 0.01)
    assert strict is not None and strict.recommended is None  # mid is inconclusive
    assert "mid" in strict.line and strict.line.startswith("No clear choice")


def test_three_models_every_cheaper_one_worse() -> None:
    sections = [
        _section("big", 0.90, 200.0),
        _section("mid", 0.70, 50.0),
        _section("tiny", 0.60, 5.0),
    ]
    pairs = [
        _pair("big", "mid", 0.2, 0.15, 0.25),
        _pair("big", "tiny", 0.3, 0.25, 0.35),
        _pair("mid", "tiny", 0.1, 0.05, 0.15),
    ]
    d = decide(sections, pairs, 5, 0.01)
    assert d is not None and d.recommended == "big"
    assert "every cheaper model is worse; the closest, mid, is worse by 0.200" in d.line
    assert "4× more" in d.line


def test_one_model_unscored_untrained_no_cost_and_ties() -> None:
    assert decide([_section("a", 0.8, 10.0, scored=False)], [], 5, 0.01) is None
    one = decide([_section("a", 0.8, 10.0)], [], 5, 0.01)
    assert one is not None and one.recommended == "a" and "only model" in one.line
    untrained = decide([_section("r", 0.8, 10.0, pretrained=False)], [], 5, 0.01)
    assert untrained is not None
    assert "untrained (random-init) baseline" in untrained.line
    assert any("random initialisation" in n for n in untrained.notes)
    # no measured cost: decided on quality alone
    nocost = decide(
        [_section("a", 0.9, None), _section("b", 0.5, 10.0)],
        [_pair("a", "b", 0.4, 0.3, 0.5)],
        5,
        0.01,
    )
    assert nocost is not None and nocost.recommended == "a"
    assert "cost was not measured" in nocost.line and nocost.non_inferiority == []
    unsure = decide(
        [_section("a", 0.9, None), _section("b", 0.85, 10.0)],
        [_pair("a", "b", 0.05, -0.01, 0.1)],
        5,
        0.01,
    )
    assert unsure is not None and unsure.recommended is None
    # a tie in quality goes to the cheaper model, which is then simply the one to run
    tie = decide(
        [_section("dear", 0.8, 100.0), _section("cheap", 0.8, 10.0)],
        [_pair("dear", "cheap", 0.0, -0.001, 0.001)],
        5,
        0.01,
    )
    assert tie is not None and tie.recommended == "cheap"
    undefined = decide([_section("a", None, 1.0), _section("b", None, 2.0)], [], 5, 0.01)
    assert undefined is not None and undefined.recommended is None
    assert undefined.line.startswith("No clear choice")


def test_price_basis_when_every_model_has_a_price() -> None:
    sections = [_section("a", 0.9, 100.0, price=3.6), _section("b", 0.9, 10.0, price=3.6)]
    d = decide(sections, [_pair("a", "b", 0.0, -0.005, 0.005)], 5, 0.01)
    assert d is not None and d.cost_basis == "price per 1k images" and d.currency == "EUR"
    assert d.pareto[1].cost == pytest.approx(0.01)


def test_an_untrained_competitor_is_named_as_one() -> None:
    sections = [_section("effnet", 0.9, 5.0), _section("vit-random", 0.2, 50.0, pretrained=False)]
    d = decide(sections, [_pair("effnet", "vit-random", 0.7, 0.6, 0.8)], 5, 0.01)
    assert d is not None and d.recommended == "effnet"
    assert "the next best, vit-random (untrained baseline)" in d.line


def test_cost_ratio_far_from_the_macs_ratio_is_noted() -> None:
    from types import SimpleNamespace

    from kiban_reporter.decision import compute_mismatches

    def cand(name: str, cost: float, macs: int) -> SimpleNamespace:
        return SimpleNamespace(name=name, cost=cost, summary=SimpleNamespace(macs_per_image=macs))

    same_compute = [cand("base", 22.0, 400), cand("head", 10.7, 405)]  # 2.1x cost, 1.0x MACs
    (note,) = compute_mismatches(same_compute)  # type: ignore[arg-type]
    assert "base vs head" in note and "different load" in note
    other_architectures = [cand("vit", 160.0, 4450), cand("effnet", 22.0, 400)]  # 7.3x vs 11x
    assert compute_mismatches(other_architectures) == []  # type: ignore[arg-type]
    same_speed = [cand("base", 22.0, 400), cand("head", 23.0, 405)]
    assert compute_mismatches(same_speed) == []  # type: ignore[arg-type]
