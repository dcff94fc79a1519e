"""Learning curves: the fast subset scoring against ``evaluate``, the draws, the verdict logic."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from kiban_reporter import learning_curve as lc
from kiban_reporter.decision_schema import LearningCurve
from kiban_reporter.metrics import evaluate
from kiban_reporter.metrics.knn import topk_block


@dataclass
class Plan:
    query_mask: np.ndarray
    candidate_mask: np.ndarray
    groups: list[str | None] | None


def _data(
    per_class: list[int], dim: int = 8, spread: float = 1.0, seed: int = 0, levels: int = 0
) -> tuple[np.ndarray, list[str | None]]:
    """Clustered unit vectors (class centres + noise); ``levels`` quantises to force ties."""
    rng = np.random.default_rng(seed)
    labels: list[str | None] = []
    chunks = []
    for c, n in enumerate(per_class):
        centre = rng.standard_normal(dim)
        chunks.append(centre + spread * rng.standard_normal((n, dim)))
        labels += [f"c{c}"] * n
    v = np.concatenate(chunks)
    if levels:  # coarse values, and every 7th row a copy of the one before: exact ties
        v = np.round(v * levels / 3) / levels
        v[1::7] = v[0::7][: len(v[1::7])]
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v.astype(np.float32), labels


def _plans(n: int, rng: np.random.Generator) -> dict[str, Plan]:
    everyone = np.ones(n, dtype=bool)
    groups: list[str | None] = [f"g{i % 9}" if i % 11 else None for i in range(n)]
    split = rng.random(n) < 0.3
    return {
        "loo": Plan(everyone, everyone, None),
        "groups": Plan(everyone, everyone, groups),
        "split": Plan(split, ~split, groups),
    }


def _slow(vectors, labels, plan, mask, k, bootstrap=0, seed=0):
    return evaluate(
        vectors,
        labels,
        plan.groups,
        ks=[1, k],
        query_mask=plan.query_mask,
        candidate_mask=mask,
        bootstrap=bootstrap,
        seed=seed,
    ).metrics[-1]


@pytest.mark.parametrize("walk", [False, True])
@pytest.mark.parametrize("protocol", ["loo", "groups", "split"])
def test_fast_scores_equal_evaluate_on_every_subset(
    protocol: str, walk: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if walk:  # walk the top-M ranking for every subset, with a tiny M: many fall back
        monkeypatch.setattr(lc, "WALK_MIN_EXPECTED", 0.0)
    per_class = [40, 25, 9, 3]
    va, labels = _data(per_class, spread=1.5, seed=1, levels=4)
    vb, _ = _data(per_class, spread=0.7, seed=2)
    labels[5] = None  # an unlabelled row: neither query nor candidate
    plan = _plans(len(labels), np.random.default_rng(3))[protocol]
    k = 5
    problem = lc.build_problem(len(labels), labels, plan, [1, 2, 4, 10, 20], 3, seed=7)
    assert problem.sizes == [1, 2, 4, 10, 20]
    true = problem.label_codes[problem.query_rows]
    for vectors in (va, vb):
        preds = lc.predict(vectors, problem, k, top_m=6 if walk else 256)
        for key in problem.keys:
            mask = None if key[0] is None else problem.candidate_mask(key)
            slow = _slow(
                vectors, labels, plan, mask if mask is not None else plan.candidate_mask, k
            )
            fast = lc.macro_f1(true, preds[key], problem.scorable(key), len(problem.classes))
            assert fast == slow.mv_macro_f1.value, key
            assert int(problem.scorable(key).sum()) == slow.mv_macro_f1.n, key


def test_full_index_point_carries_the_reports_interval() -> None:
    v, labels = _data([30, 20, 12], spread=1.2, seed=4)
    plan = _plans(len(labels), np.random.default_rng(0))["groups"]
    curves = lc.learning_curves(
        {"a": v}, labels, plan, 3, [2, 5], 4, seed=11, margin=0.01, bootstrap=300
    )
    full = curves.curves[0].points[-1]
    slow = _slow(v, labels, plan, plan.candidate_mask, 3, bootstrap=300, seed=11)
    assert full.per_class is None and full.repeats == 1
    assert (full.value, full.ci_low, full.ci_high) == (
        slow.mv_macro_f1.value,
        slow.mv_macro_f1.ci_low,
        slow.mv_macro_f1.ci_high,
    )
    assert "unit: group" in curves.interval
    for point in curves.curves[0].points[:-1]:
        assert point.ci_low is not None and point.ci_high is not None
        assert point.ci_low <= point.ci_high


def test_same_seed_same_curve_other_seed_other_subsets() -> None:
    v, labels = _data([30, 30, 30], spread=1.5, seed=5)
    plan = _plans(len(labels), np.random.default_rng(0))["loo"]

    def run(seed: int) -> dict:
        out = lc.learning_curves(
            {"a": v}, labels, plan, 5, [3, 10], 5, seed=seed, margin=0.01, bootstrap=100
        )
        return out.model_dump(exclude={"seconds"})

    assert run(1) == run(1)
    assert run(1) != run(2)
    cand = np.repeat(np.arange(3), 30)
    a, b = lc.draw_subsets(cand, [3, 10], 5, 1), lc.draw_subsets(cand, [3, 10], 5, 2)
    assert all(np.array_equal(a[key], lc.draw_subsets(cand, [3, 10], 5, 1)[key]) for key in a)
    assert any(not np.array_equal(a[key], b[key]) for key in a)
    # repeats differ from each other, and adding a size leaves the others' subsets alone
    assert not np.array_equal(a[(3, 0)], a[(3, 1)])
    c = lc.draw_subsets(cand, [3, 7, 10], 5, 1)
    assert all(np.array_equal(a[key], c[key]) for key in a)


def test_subsets_are_stratified_nested_and_shared_by_models() -> None:
    cand = np.array([0] * 12 + [1] * 4 + [2] * 30)
    subsets = lc.draw_subsets(cand, [3, 8], 2, 0)
    for r in range(2):
        small, large = subsets[(3, r)], subsets[(8, r)]
        assert np.bincount(cand[small]).tolist() == [3, 3, 3]
        assert np.bincount(cand[large]).tolist() == [8, 4, 8]  # class 1 keeps all 4
        assert set(small) <= set(large)
        assert np.all(np.diff(large) > 0)
    # two models with the same vectors get the very same curve: the subsets are shared
    v, labels = _data([20, 20, 20], spread=1.5, seed=6)
    plan = _plans(len(labels), np.random.default_rng(0))["loo"]
    out = lc.learning_curves(
        {"a": v, "b": v.copy()}, labels, plan, 5, [2, 6], 3, seed=0, margin=0.01, bootstrap=50
    )
    a, b = (c.model_dump(exclude={"model"}) for c in out.curves)
    assert a == b


def test_sizes_not_below_the_largest_class_are_dropped() -> None:
    v, labels = _data([7, 12], seed=7)
    plan = _plans(len(labels), np.random.default_rng(0))["loo"]
    out = lc.learning_curves(
        {"a": v}, labels, plan, 3, [20, 5, 12, 10, 5], 2, seed=0, margin=0.01, bootstrap=0
    )
    assert out.sizes == [5, 10]
    assert out.dropped_sizes == [12, 20]
    assert out.largest_class == 12
    points = out.curves[0].points
    assert [p.per_class for p in points] == [5, 10, None]
    assert [p.candidates for p in points] == [10.0, 17.0, 19.0]
    assert all(p.ci_low is None for p in points)
    assert out.interval.startswith("no intervals")
    single = lc.learning_curves({"a": v}, labels, plan, 3, [12, 50], 2, 0, 0.01, bootstrap=0)
    assert single.sizes == [] and [p.per_class for p in single.curves[0].points] == [None]
    assert single.curves[0].flattened is None and single.verdict_may_change is None
    assert "full index alone" in single.statement


def test_groups_are_excluded_in_every_subset() -> None:
    """Each group is a tight blob of one class: found only when its own group is allowed."""
    rng = np.random.default_rng(8)
    n_groups, per_group, dim = 12, 6, 16
    centres = rng.standard_normal((n_groups, dim))
    v = np.repeat(centres, per_group, axis=0) + 0.01 * rng.standard_normal(
        (n_groups * per_group, dim)
    )
    v = (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)
    group_class = rng.integers(0, 3, n_groups)
    labels = [f"c{group_class[i // per_group]}" for i in range(len(v))]
    groups: list[str | None] = [f"g{i // per_group}" for i in range(len(v))]
    everyone = np.ones(len(v), dtype=bool)
    loo = lc.learning_curves(
        {"a": v}, labels, Plan(everyone, everyone, None), 1, [2, 8], 3, 0, 0.01, bootstrap=0
    )
    logo = lc.learning_curves(
        {"a": v}, labels, Plan(everyone, everyone, groups), 1, [2, 8], 3, 0, 0.01, bootstrap=0
    )
    assert loo.curves[0].points[-1].value == 1.0  # own group found
    assert logo.curves[0].points[-1].value is not None
    assert logo.curves[0].points[-1].value < 0.9
    problem = lc.build_problem(len(v), labels, Plan(everyone, everyone, groups), [2], 3, 0)
    preds = lc.predict(v, problem, 1)
    for key in problem.keys:
        mask = problem.candidate_mask(key)
        slow = evaluate(v, labels, groups, ks=[1], candidate_mask=mask, bootstrap=0)
        value = lc.macro_f1(
            problem.label_codes[problem.query_rows],
            preds[key],
            problem.scorable(key),
            len(problem.classes),
        )
        assert value == slow.metrics[0].mv_macro_f1.value
        assert int(problem.scorable(key).sum()) == slow.n_queries


def test_more_labels_help_on_an_easy_clustered_set() -> None:
    v, labels = _data([60] * 6, dim=16, spread=1.4, seed=9)
    plan = _plans(len(labels), np.random.default_rng(0))["loo"]
    out = lc.learning_curves(
        {"a": v}, labels, plan, 5, [1, 3, 10, 30], 5, seed=0, margin=0.01, bootstrap=200
    )
    values = [p.value for p in out.curves[0].points]
    assert all(x is not None for x in values)
    assert values[0] < values[2] < values[-1] + 0.02  # 1 < 10 per class, 10 ≲ all
    assert values[1] < values[3] + 0.02
    assert values[-1] - values[0] > 0.05


def test_a_perfect_set_has_flattened() -> None:
    v, labels = _data([30, 30, 30], dim=16, spread=0.01, seed=10)
    plan = _plans(len(labels), np.random.default_rng(0))["loo"]
    out = lc.learning_curves(
        {"a": v, "b": v[:, ::-1].copy()}, labels, plan, 5, [5, 10], 3, 0, 0.01, bootstrap=100
    )
    assert [c.flattened for c in out.curves] == [True, True]
    assert all(c.gain == 0.0 for c in out.curves)
    assert out.verdict_may_change is False
    assert out.statement.startswith("The curves have flattened")
    assert out.statement.endswith("more labels are unlikely to change the verdict.")


def test_flattened_rule() -> None:
    assert lc._flattened(None, None, 0.01) is None
    assert lc._flattened(0.005, -0.01, 0.01) is True
    assert lc._flattened(-0.02, None, 0.01) is True
    assert lc._flattened(0.04, 0.01, 0.01) is False  # at least δ, interval above 0
    assert lc._flattened(0.04, None, 0.01) is False  # no interval: the point decides
    assert lc._flattened(0.04, -0.01, 0.01) is None  # at least δ, but within the noise


def test_verdict_may_change_rule() -> None:
    rule = lc._verdict_may_change
    assert rule({"a": 0.8}, {"a": 0.9}, 0.01) is None  # one model
    assert rule({"a": 0.8, "b": 0.7}, {"a": 0.81, "b": 0.705}, 0.01) is False
    assert rule({"a": 0.8, "b": 0.7}, {"a": 0.8, "b": 0.85}, 0.01) is True  # order flips
    assert rule({"a": 0.8, "b": 0.7}, {"a": 0.9, "b": 0.7}, 0.01) is True  # gap grows by 0.1
    # a third model rising behind the best two changes neither order nor the top gap
    assert rule({"a": 0.8, "b": 0.7, "c": 0.4}, {"a": 0.8, "b": 0.7, "c": 0.6}, 0.01) is False
    assert rule({"a": 0.8, "b": None}, {"a": 0.9, "b": 0.7}, 0.01) is None


def _curve(model: str, gain: float | None, flattened: bool | None) -> LearningCurve:
    return LearningCurve(model=model, points=[], gain=gain, flattened=flattened)


def test_statements() -> None:
    flat = [_curve("a", 0.002, True), _curve("b", 0.0, True)]
    assert lc._statement(flat, 50, False, 0.01) == (
        "The curves have flattened (less than δ = 0.01 gained from 50 per class to all): "
        "more labels are unlikely to change the verdict."
    )
    rising = [_curve("effnet", 0.04, False), _curve("vit", 0.0, True)]
    assert lc._statement(rising, 50, True, 0.01) == (
        "effnet is still improving (+0.040 from 50 per class to all): "
        "more labels may change the verdict."
    )
    held = lc._statement(rising, 50, False, 0.01)
    assert held.startswith("effnet is still improving")
    assert held.endswith("more labels are unlikely to change the verdict.")
    unsure = lc._statement([_curve("a", 0.03, None)], 20, None, 0.01)
    assert unsure == "a gained +0.030 from 20 per class to all, within the noise: " + (
        "more labels may or may not help."
    )


def test_bad_arguments() -> None:
    v, labels = _data([5, 5])
    plan = _plans(len(labels), np.random.default_rng(0))["loo"]
    with pytest.raises(ValueError, match="repeats"):
        lc.learning_curves({"a": v}, labels, plan, 3, [2], 0, 0, 0.01)
    with pytest.raises(ValueError, match="row counts"):
        lc.learning_curves({"a": v, "b": v[:-1]}, labels, plan, 3, [2], 2, 0, 0.01)
    with pytest.raises(ValueError, match="no model"):
        lc.learning_curves({}, labels, plan, 3, [2], 2, 0, 0.01)
    bad = v.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        lc.learning_curves({"a": bad}, labels, plan, 3, [2], 2, 0, 0.01)


@pytest.mark.parametrize("protocol", ["loo", "groups", "split"])
def test_the_reports_results_give_the_same_curves(
    protocol: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``evaluate``'s results only the subsets' columns are computed: same numbers."""
    va, labels = _data([40, 25, 9, 3], spread=1.5, seed=1, levels=4)
    vb, _ = _data([40, 25, 9, 3], spread=0.7, seed=2)
    plan = _plans(len(labels), np.random.default_rng(3))[protocol]
    vectors = {"a": va, "b": vb}
    args = (labels, plan, 5, [1, 3, 8], 3, 4, 0.01)
    alone = lc.learning_curves(vectors, *args, bootstrap=100)
    results = {
        m: evaluate(
            v,
            labels,
            plan.groups,
            ks=[1, 5],
            query_mask=plan.query_mask,
            candidate_mask=plan.candidate_mask,
            bootstrap=0,
        )
        for m, v in vectors.items()
    }
    called: list[bool] = []
    original = lc.predict

    def spy(*a: object, **kw: object) -> object:
        called.append(a[4] is not None)
        return original(*a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(lc, "predict", spy)
    reused = lc.learning_curves(vectors, *args, bootstrap=100, results=results)
    assert called == [True, True]
    monkeypatch.setattr(lc, "WALK_MIN_EXPECTED", 0.0)
    walked = lc.learning_curves(vectors, *args, bootstrap=100, results=results, top_m=6)
    want = alone.model_dump(exclude={"seconds"})
    assert reused.model_dump(exclude={"seconds"}) == want
    assert walked.model_dump(exclude={"seconds"}) == want
    # a result on other queries is not used
    other = evaluate(va, labels, None, ks=[5], bootstrap=0)
    problem = lc.build_problem(len(labels), labels, plan, [1], 1, 0)
    if protocol == "split":
        assert lc._full_predictions(other, problem, 5) is None
    assert lc._full_predictions(other, problem, 3) is None


@pytest.mark.parametrize("k", [1, 5, 16, 17])
@pytest.mark.parametrize("levels", [2, 7, 1000])
def test_topk_exact_matches_the_metrics_kernel(k: int, levels: int) -> None:
    rng = np.random.default_rng(levels + k)
    sims = (rng.integers(0, levels, size=(40, 60)) / levels).astype(np.float32)
    sims[rng.random(sims.shape) < 0.3] = -np.inf
    sims[0] = -np.inf  # no candidate at all
    sims[1, 3:] = -np.inf  # fewer candidates than k
    want, _ = topk_block(sims.copy(), k)
    assert lc.topk_exact(sims, k).tolist() == want.tolist()
    assert lc.topk_exact(sims[:, :3], k).tolist() == topk_block(sims[:, :3].copy(), k)[0].tolist()
