"""Bootstrap intervals, paired comparison, McNemar and the warning cases."""

from __future__ import annotations

import json

import numpy as np
import pytest

import kiban_reporter.metrics.bootstrap as bootstrap_mod
from kiban_reporter.metrics import compare, evaluate, mcnemar_exact
from kiban_reporter.metrics.results import RetrievalResult


def _clustered(seed: int, noise: float, n_groups: int = 30, per_group: int = 20):
    """Labelled clusters; each group shares a random offset so queries within it correlate."""
    rng = np.random.default_rng(seed)
    n = n_groups * per_group
    groups = np.repeat(np.arange(n_groups), per_group)
    labels = rng.integers(0, 4, size=n)
    centres = np.random.default_rng(99).standard_normal((4, 32))
    offsets = rng.standard_normal((n_groups, 32)) * noise
    v = centres[labels] + offsets[groups] + rng.standard_normal((n, 32)) * noise
    v = (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)
    return v, [f"c{x}" for x in labels], [f"g{x:02d}" for x in groups]


def _all_values(res: RetrievalResult) -> list:
    out = []
    for m in res.metrics:
        for key in ("acc_at_k", "mv_accuracy", "mv_macro_f1", "map_at_k"):
            e = getattr(m, key)
            out.append((e.value, e.ci_low, e.ci_high))
    return out


def test_bootstrap_same_seed_identical_and_contains_point() -> None:
    v, labels, groups = _clustered(0, noise=1.2)
    a = evaluate(v, labels, groups, bootstrap=300, seed=7)
    b = evaluate(v, labels, groups, bootstrap=300, seed=7)
    c = evaluate(v, labels, groups, bootstrap=300, seed=8)
    assert _all_values(a) == _all_values(b)
    assert _all_values(a) != _all_values(c)
    for value, lo, hi in _all_values(a):
        assert value is not None and lo is not None and hi is not None
        assert lo <= value <= hi


def test_group_resampling_when_groups_exist(monkeypatch: pytest.MonkeyPatch) -> None:
    v, labels, groups = _clustered(1, noise=1.0)
    seen: list[int] = []
    original = bootstrap_mod.resampled_units

    def spy(n_units: int, n_resamples: int, seed: int):
        seen.append(n_units)
        return original(n_units, n_resamples, seed)

    monkeypatch.setattr(bootstrap_mod, "resampled_units", spy)
    grouped = evaluate(v, labels, groups, ks=(5,), bootstrap=400)
    flat = evaluate(v, labels, None, ks=(5,), bootstrap=400)
    assert seen == [30, 600]
    assert grouped.bootstrap_unit == "group" and flat.bootstrap_unit == "query"
    # correlated queries within groups: the cluster bootstrap is the wider (honest) one
    g, f = grouped.at(5).mv_accuracy, flat.at(5).mv_accuracy
    assert g.ci_high - g.ci_low > f.ci_high - f.ci_low


def test_mcnemar_exact_against_hand_computed_binomial() -> None:
    # b = 7 (A right, B wrong), c = 2: p = 2 * P(X <= 2 | n=9, 1/2) = 2 * (1+9+36)/512
    a = np.array([1] * 7 + [0] * 2 + [1] * 5 + [0] * 3, dtype=bool)
    b = np.array([0] * 7 + [1] * 2 + [1] * 5 + [0] * 3, dtype=bool)
    assert mcnemar_exact(a, b) == (7, 2, pytest.approx(92 / 512))
    assert mcnemar_exact(a, a) == (0, 0, 1.0)
    assert mcnemar_exact([True], [False])[2] == pytest.approx(1.0)


def test_compare_better_model_and_self() -> None:
    v, labels, groups = _clustered(2, noise=0.6)
    w, _, _ = _clustered(2, noise=1.6)
    good = evaluate(v, labels, groups, bootstrap=300, name="foundation")
    bad = evaluate(w, labels, groups, bootstrap=300, name="domain")
    cmp = compare(good, bad)
    line = next(d for d in cmp.differences if d.metric == "MV@5 macro-F1")
    assert line.verdict.startswith("foundation better than domain on MV@5 macro-F1 (+")
    assert "McNemar p=" in line.verdict
    assert line.ci_low is not None and line.ci_low > 0
    assert line.difference == pytest.approx(
        good.at(5).mv_macro_f1.value - bad.at(5).mv_macro_f1.value
    )
    pq_a, pq_b = good.per_query, bad.per_query
    assert pq_a is not None and pq_b is not None
    b, c, p = mcnemar_exact(pq_a.mv_correct[2], pq_b.mv_correct[2])
    assert (line.mcnemar_b, line.mcnemar_c, line.mcnemar_p) == (b, c, p)
    reverse = compare(bad, good)
    assert next(d for d in reverse.differences if d.metric == "MV@5 macro-F1").verdict.startswith(
        "foundation better than domain on MV@5 macro-F1 (+"  # winner − loser, whatever the order
    )
    same = compare(good, good, name_a="x", name_b="y")
    assert all(d.difference == 0 and d.ci_low == 0 and d.ci_high == 0 for d in same.differences)
    assert all(v.startswith("cannot tell x and y apart") for v in same.verdicts)
    json.dumps(cmp.summary(), allow_nan=False)


def test_compare_refuses_different_queries() -> None:
    v, labels, groups = _clustered(3, noise=1.0)
    a = evaluate(v, labels, groups, bootstrap=10)
    mask = np.ones(len(v), dtype=bool)
    mask[0] = False
    b = evaluate(v, labels, groups, query_mask=mask, bootstrap=10)
    with pytest.raises(ValueError, match="same queries"):
        compare(a, b)


def _assert_no_nan(res: RetrievalResult) -> None:
    json.dumps(res.summary(), allow_nan=False)


def test_warning_single_class() -> None:
    v, _, groups = _clustered(4, noise=1.0)
    res = evaluate(v, ["same"] * len(v), groups, bootstrap=20)
    assert any("only one class" in w for w in res.warnings)
    assert res.at(1).mv_accuracy.value == 1.0
    _assert_no_nan(res)


def test_warning_no_labelled_queries() -> None:
    v = np.eye(4, dtype=np.float32)
    res = evaluate(v, [None, "", float("nan"), None], bootstrap=20)
    assert res.n_queries == 0 and res.n_unlabelled == 4
    assert any("no labelled queries" in w for w in res.warnings)
    assert all(e is None for triple in _all_values(res) for e in triple)
    _assert_no_nan(res)
    with pytest.raises(ValueError, match="per-query"):
        compare(res, res)


def test_warning_fewer_candidates_than_k() -> None:
    v = np.array([[1, 0], [0, 1], [0.6, 0.8]], dtype=np.float32)
    res = evaluate(v, ["a", "b", "a"], ks=(1, 3, 5), bootstrap=20)
    assert res.at(5).n_queries_short == 3 and res.at(1).n_queries_short == 0
    assert any("fewer than k=5" in w for w in res.warnings)
    assert any("fewer than k=3" in w for w in res.warnings)
    pq = res.per_query
    assert pq is not None
    assert pq.indices[:, 2].tolist() == [-1, -1, -1]
    _assert_no_nan(res)


def test_warning_class_in_one_group_and_no_candidates() -> None:
    v = np.array([[1, 0], [0.8, 0.6], [0, 1], [0.6, 0.8], [-1, 0]], dtype=np.float32)
    labels = ["a", "a", "b", "b", "c"]
    groups = ["g1", "g2", "g1", "g2", "g3"]
    res = evaluate(v, labels, groups, ks=(1,), bootstrap=20)
    assert any("fewer than 2 groups" in w and "'c'" in w for w in res.warnings)
    assert res.n_queries_without_relevant == 1
    assert res.at(1).map_at_k.n == 4
    _assert_no_nan(res)
    alone = evaluate(v, labels, ["g"] * 5, ks=(1,), bootstrap=20)
    assert alone.n_queries == 0 and alone.n_queries_without_candidates == 5
    assert any("no candidate" in w for w in alone.warnings)
    assert alone.at(1).mv_macro_f1.value is None
    _assert_no_nan(alone)


def test_warning_single_bootstrap_unit_and_unnormalised() -> None:
    v = np.array([[2, 0], [0, 1], [1, 0]], dtype=np.float32)
    res = evaluate(
        v,
        ["a", "b", "a"],
        ["g1", "g2", "g3"],
        ks=(1,),
        bootstrap=20,
        query_mask=np.array([True, False, False]),
    )
    assert any("at least 2 groups" in w for w in res.warnings)
    assert any("not L2-normalised" in w for w in res.warnings)
    assert res.at(1).acc_at_k.value == 1.0 and res.at(1).acc_at_k.ci_low is None
    _assert_no_nan(res)


def test_bad_inputs_raise_clearly() -> None:
    v = np.eye(3, dtype=np.float32)
    with pytest.raises(ValueError, match="labels has 2"):
        evaluate(v, ["a", "b"])
    with pytest.raises(ValueError, match="NaN"):
        evaluate(np.full((3, 2), np.nan, dtype=np.float32), ["a", "b", "c"])
    with pytest.raises(ValueError, match="ks"):
        evaluate(v, ["a", "b", "c"], ks=(0,))
