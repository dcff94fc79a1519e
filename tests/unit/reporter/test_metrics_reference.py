"""The fast engine agrees exactly with the loop reference and with scikit-learn.

Random data is quantised (small integers times 0.5 in 6-D) so dot products are exact in float32
and ties are everywhere: the tie rule, the top-k boundary and the vote tie-break all get
exercised. Block sizes include 1 and sizes that do not divide N.
"""

from __future__ import annotations

import numpy as np
import pytest
from reference_metrics import ref_bootstrap, ref_evaluate
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support

from kiban_reporter.metrics import evaluate
from kiban_reporter.metrics.bootstrap import (
    bootstrap_distributions,
    resampled_units,
    unit_sums,
)

KS = (1, 3, 5, 8)


def _data(seed: int, n: int = 157, continuous: bool = False, unlabelled: int = 0):
    rng = np.random.default_rng(seed)
    if continuous:
        v = rng.standard_normal((n, 12)).astype(np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
    else:
        v = (rng.integers(-2, 3, size=(n, 6)) * 0.5).astype(np.float32)
    labels: list[object] = [f"c{x}" for x in rng.integers(0, 4, size=n)]
    for i in rng.choice(n, size=unlabelled, replace=False):
        labels[i] = None
    groups = [f"g{x:02d}" for x in rng.integers(0, 23, size=n)]
    return v, labels, groups


def _check_against_reference(v, labels, groups, qmask=None, cmask=None, block_size=16) -> None:
    res = evaluate(
        v,
        labels,
        groups,
        ks=KS,
        query_mask=qmask,
        candidate_mask=cmask,
        bootstrap=0,
        block_size=block_size,
    )
    ref = ref_evaluate(v, labels, groups, KS, qmask, cmask)
    pq = res.per_query
    assert pq is not None
    queries = ref["queries"]
    assert pq.query_rows.tolist() == [q.row for q in queries]
    kmax = max(KS)
    for i, q in enumerate(queries):
        expect = q.ranked[:kmax] + [-1] * (kmax - len(q.ranked[:kmax]))
        assert pq.indices[i].tolist() == expect, f"query {q.row}"
        assert pq.sims[i, : len(q.sims[:kmax])].tolist() == pytest.approx(q.sims[:kmax], abs=1e-6)
        assert pq.n_candidates[i] == len(q.ranked)
        assert pq.n_relevant[i] == q.n_relevant
    for j, k in enumerate(KS):
        rk = ref["k"][k]
        per_k = rk["per_k"]
        assert pq.hits[j].tolist() == per_k.hits
        assert [pq.classes[c] for c in pq.mv_pred[j]] == per_k.preds
        ref_ap = [0.0 if a is None else a for a in per_k.aps]
        assert pq.ap[j].tolist() == pytest.approx(ref_ap, abs=1e-12)
        m = res.at(k)
        head = rk["headline"]
        for key in ("acc_at_k", "mv_accuracy", "mv_macro_f1", "map_at_k"):
            assert getattr(m, key).value == pytest.approx(head[key], abs=1e-12), key
        cls = rk["classification"]
        rep = m.classification
        assert rep is not None
        assert rep.accuracy == pytest.approx(cls["accuracy"], abs=1e-12)
        assert rep.weighted_f1 == pytest.approx(cls["weighted_f1"], abs=1e-12)
        assert rep.confusion.labels == cls["labels"]
        assert rep.confusion.matrix == cls["matrix"]
        for c in rep.per_class:
            want = cls["per_class"][c.label]
            assert c.support == want["support"]
            assert (c.precision, c.recall, c.f1) == pytest.approx(
                (want["precision"], want["recall"], want["f1"]), abs=1e-12
            )


@pytest.mark.parametrize("block_size", [1, 16, 50, 157, 4096])
def test_agrees_with_reference_groups_and_ties(block_size: int) -> None:
    v, labels, groups = _data(1, unlabelled=5)
    _check_against_reference(v, labels, groups, block_size=block_size)


@pytest.mark.parametrize("block_size", [7, 64])
def test_agrees_with_reference_leave_one_out(block_size: int) -> None:
    v, labels, _ = _data(2)
    _check_against_reference(v, labels, None, block_size=block_size)


def test_agrees_with_reference_split_masks() -> None:
    v, labels, groups = _data(3)
    rng = np.random.default_rng(3)
    qmask = rng.random(len(v)) < 0.4
    cmask = rng.random(len(v)) < 0.7  # overlaps the queries: self must still be excluded
    _check_against_reference(v, labels, groups, qmask, cmask, block_size=13)
    _check_against_reference(v, labels, None, qmask, cmask, block_size=13)


def test_agrees_with_reference_continuous() -> None:
    v, labels, groups = _data(4, n=240, continuous=True)
    _check_against_reference(v, labels, groups, block_size=37)


def test_agrees_with_reference_heavy_ties() -> None:
    """Nearly all similarities equal: the exact-threshold fallback path of the top-k."""
    rng = np.random.default_rng(5)
    n = 120
    v = np.zeros((n, 4), dtype=np.float32)
    v[:, 0] = 1.0
    v[rng.choice(n, 10, replace=False)] = [0.0, 1.0, 0.0, 0.0]
    labels = [f"c{x}" for x in rng.integers(0, 3, size=n)]
    groups = [f"g{x}" for x in rng.integers(0, 6, size=n)]
    _check_against_reference(v, labels, groups, block_size=32)
    _check_against_reference(v, labels, None, block_size=32)


def test_sklearn_agrees_on_f1_and_confusion() -> None:
    v, labels, groups = _data(6, n=200, continuous=True)
    res = evaluate(v, labels, groups, ks=KS, bootstrap=0)
    pq = res.per_query
    assert pq is not None
    y_true = [pq.classes[c] for c in pq.true]
    present = sorted(set(y_true))
    for j, k in enumerate(KS):
        y_pred = [pq.classes[c] for c in pq.mv_pred[j]]
        m = res.at(k)
        rep = m.classification
        assert rep is not None
        macro = f1_score(y_true, y_pred, average="macro", labels=present, zero_division=0)
        weighted = f1_score(y_true, y_pred, average="weighted", labels=present, zero_division=0)
        assert m.mv_macro_f1.value == pytest.approx(macro, abs=1e-12)
        assert rep.macro_f1 == pytest.approx(macro, abs=1e-12)
        assert rep.weighted_f1 == pytest.approx(weighted, abs=1e-12)
        p, r, f, s = precision_recall_fscore_support(
            y_true, y_pred, labels=present, zero_division=0
        )
        assert [c.label for c in rep.per_class] == present
        assert [c.precision for c in rep.per_class] == pytest.approx(p.tolist(), abs=1e-12)
        assert [c.recall for c in rep.per_class] == pytest.approx(r.tolist(), abs=1e-12)
        assert [c.f1 for c in rep.per_class] == pytest.approx(f.tolist(), abs=1e-12)
        assert [c.support for c in rep.per_class] == s.tolist()
        shown = rep.confusion.labels
        assert shown == sorted(set(y_true) | set(y_pred))
        assert rep.confusion.matrix == confusion_matrix(y_true, y_pred, labels=shown).tolist()


@pytest.mark.parametrize("grouped", [True, False])
def test_bootstrap_resamples_agree_with_reference(grouped: bool) -> None:
    v, labels, groups = _data(7, n=90, continuous=True)
    g = groups if grouped else None
    res = evaluate(v, labels, g, ks=(1, 5), bootstrap=0)
    pq = res.per_query
    assert pq is not None
    n_res, seed = 40, 11
    sums, layout = unit_sums(pq)
    fast = bootstrap_distributions([sums], layout, n_res, seed)[0]
    n_units = sums.shape[0]
    draws = np.concatenate(list(resampled_units(n_units, n_res, seed)))
    ref = ref_evaluate(v, labels, g, (1, 5))
    for j, k in enumerate((1, 5)):
        slow = ref_bootstrap(ref["queries"], ref["k"][k]["per_k"], grouped, draws)
        for key, values in slow.items():
            np.testing.assert_allclose(fast[f"{key}@{j}"], values, rtol=0, atol=1e-12)
