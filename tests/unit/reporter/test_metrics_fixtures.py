"""Hand-computed retrieval metrics on tiny 2-D fixtures (every number worked out on paper)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kiban_reporter.metrics import evaluate, exact_knn

# Five unit vectors; rows 0 and 1 coincide (similarity tie), several zero-similarity ties.
#   q0 ranks 1(b) 2(a) 4(b) 3(b)   q1 ranks 0(a) 2(a) 4(b) 3(b)   q2 ranks 0(a) 1(b) 3(b) 4(b)
#   q3 ranks 2(a) 4(b) 0(a) 1(b)   q4 ranks 0(a) 1(b) 3(b) 2(a)
LOO_VECTORS = np.array([[1, 0], [1, 0], [0, 1], [-1, 0], [0, -1]], dtype=np.float32)
LOO_LABELS = ["a", "b", "a", "b", "b"]


def test_similarity_ties_resolved_by_key_order() -> None:
    knn = exact_knn(LOO_VECTORS, 4)
    assert knn.indices.tolist() == [
        [1, 2, 4, 3],
        [0, 2, 4, 3],
        [0, 1, 3, 4],
        [2, 4, 0, 1],
        [0, 1, 3, 2],
    ]
    assert knn.n_candidates.tolist() == [4] * 5
    assert knn.sims[0].tolist() == [1.0, 0.0, 0.0, -1.0]


def test_acc_mv_map_by_hand() -> None:
    res = evaluate(LOO_VECTORS, LOO_LABELS, ks=(1, 3), bootstrap=0)
    m1, m3 = res.at(1), res.at(3)
    assert m1.acc_at_k.value == pytest.approx(0.2)
    assert m1.mv_accuracy.value == pytest.approx(0.2)
    assert m1.map_at_k.value == pytest.approx(0.2)
    assert m3.acc_at_k.value == pytest.approx(1.0)
    assert m3.mv_accuracy.value == pytest.approx(0.2)  # preds b a b a b vs true a b a b b
    # AP@3 per query: 1/2, 1/6, 1, 1/4, 7/12 -> mean 1/2
    assert m3.map_at_k.value == pytest.approx(0.5)
    assert res.per_query is not None
    assert res.per_query.ap[1].tolist() == pytest.approx([0.5, 1 / 6, 1.0, 0.25, 7 / 12])
    assert res.per_query.n_relevant.tolist() == [1, 2, 1, 2, 2]
    # class a: tp 0 -> F1 0; class b: tp 1, 3 predicted, support 3 -> F1 1/3
    assert m3.mv_macro_f1.value == pytest.approx(1 / 6)
    assert m3.mv_weighted_f1 == pytest.approx(0.2)
    rep = m3.classification
    assert rep is not None
    assert rep.confusion.labels == ["a", "b"]
    assert rep.confusion.matrix == [[0, 2], [2, 1]]
    assert [(c.label, c.support) for c in rep.per_class] == [("a", 2), ("b", 3)]
    assert rep.per_class[1].precision == pytest.approx(1 / 3)
    assert rep.per_class[1].recall == pytest.approx(1 / 3)


def test_majority_vote_label_tie_goes_to_first_in_ranking() -> None:
    res = evaluate(LOO_VECTORS, LOO_LABELS, ks=(2, 4), bootstrap=0)
    pq = res.per_query
    assert pq is not None
    names = [pq.classes[c] for c in pq.mv_pred[0]]
    # MV@2: every top-2 with two labels is a 1-1 tie -> the first one wins
    assert names == ["b", "a", "a", "a", "a"]
    names4 = [pq.classes[c] for c in pq.mv_pred[1]]
    # MV@4: q1 a,a,b,b tie -> a; q3 a,b,a,b -> a; q4 a,b,b,a -> a; q0 b,a,b,b -> b; q2 a,b,b,b -> b
    assert names4 == ["b", "a", "b", "a", "a"]


# Groups: rows 0,1 (g1) identical; without groups q0's nearest would be row 1.
GROUP_VECTORS = np.array([[1, 0], [1, 0], [0.6, 0.8], [0.8, 0.6], [-1, 0]], dtype=np.float32)
GROUP_LABELS = ["a", "a", "a", "b", "b"]
GROUPS = ["g1", "g1", "g2", "g3", "g2"]


def test_groups_exclude_same_group_neighbours() -> None:
    res = evaluate(GROUP_VECTORS, GROUP_LABELS, GROUPS, ks=(1, 3), bootstrap=0)
    pq = res.per_query
    assert pq is not None
    assert res.protocol == "leave-one-group-out"
    assert pq.indices[:, :3].tolist() == [[3, 2, 4], [3, 2, 4], [3, 0, 1], [2, 0, 1], [3, 0, 1]]
    assert pq.n_candidates.tolist() == [3, 3, 3, 4, 3]
    assert pq.n_relevant.tolist() == [1, 1, 2, 1, 1]
    assert res.at(1).acc_at_k.value == pytest.approx(0.2)  # only q4 (b -> row 3)
    assert pq.ap[1].tolist() == pytest.approx([0.5, 0.5, 7 / 12, 0.0, 1.0])
    assert res.at(3).map_at_k.value == pytest.approx((0.5 + 0.5 + 7 / 12 + 0 + 1) / 5)
    # MV@3: q0 b,a,b -> b; q2 b,a,a -> a; q3 a,a,a -> a; q4 b,a,a -> a
    assert [pq.classes[c] for c in pq.mv_pred[1]] == ["b", "b", "a", "a", "a"]
    assert res.n_groups == 3 and res.bootstrap_unit == "group"
    loo = evaluate(GROUP_VECTORS, GROUP_LABELS, ks=(1,), bootstrap=0)
    assert loo.per_query is not None and loo.per_query.indices[0, 0] == 1


def test_query_and_candidate_masks() -> None:
    qmask = np.array([True, True, False, False, False])
    cmask = ~qmask
    res = evaluate(
        LOO_VECTORS, LOO_LABELS, ks=(1,), query_mask=qmask, candidate_mask=cmask, bootstrap=0
    )
    pq = res.per_query
    assert pq is not None
    assert pq.query_rows.tolist() == [0, 1]
    # q0 and q1 are (1,0): candidates 2 (0), 3 (-1), 4 (0) -> 2, 4, 3
    assert pq.indices[:, 0].tolist() == [2, 2]
    assert res.at(1).acc_at_k.value == pytest.approx(0.5)
    assert res.n_candidates == 3


def test_summary_is_json_and_has_no_arrays() -> None:
    res = evaluate(LOO_VECTORS, LOO_LABELS, ks=(1, 3), bootstrap=50)
    text = json.dumps(res.summary(), allow_nan=False)
    assert "per_query" not in text
    assert json.loads(res.model_dump_json())["ks"] == [1, 3]
