"""Protocol masks on hand-made rows: split, cross-batch, query sample, fallbacks."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from kiban.messages import EvaluationProtocol
from kiban_reporter.metrics import evaluate
from kiban_reporter.protocols import (
    PLANNERS,
    EvalRow,
    PlanInput,
    ProtocolName,
    assign_splits,
    plan_auto,
    plan_cross_batch,
    plan_leave_one_group_out,
    plan_leave_one_out,
    plan_protocol,
    plan_split,
    sample_queries,
    stratified_sample,
    unit_fraction,
)


def _rows(batch: str, n: int, groups: int | None = 4, split: bool = False) -> list[EvalRow]:
    rows = []
    for i in range(n):
        label = "ab"[i % 2]
        rows.append(
            EvalRow(
                batch=batch,
                key=f"img-{i:03d}.png",
                sha256=f"{batch}-sha-{i:03d}",
                label=label,
                group=f"lot{i % groups}" if groups else None,
                split=("test" if i % 5 == 0 else "train") if split else None,
            )
        )
    return rows


def test_auto_resolves_by_groups_and_logo_without_groups_falls_back() -> None:
    grouped = plan_protocol(EvaluationProtocol(), _rows("b", 20), "b")
    assert grouped.name == "leave-one-group-out" and grouped.requested == "auto"
    assert grouped.groups is not None and grouped.n_queries == grouped.n_candidates == 20
    plain = plan_protocol(EvaluationProtocol(), _rows("b", 20, groups=None), "b")
    assert plain.name == "leave-one-out" and plain.groups is None
    asked = plan_protocol(
        EvaluationProtocol(name="leave-one-group-out"), _rows("b", 20, groups=None), "b"
    )
    assert asked.name == "leave-one-out"
    assert any("no groups" in w for w in asked.warnings)


def test_unlabelled_rows_are_neither_queries_nor_candidates() -> None:
    rows = _rows("b", 6)
    rows[2] = EvalRow("b", rows[2].key, rows[2].sha256, None, "lot2")
    plan = plan_protocol(EvaluationProtocol(name="leave-one-out"), rows, "b")
    assert not plan.query_mask[2] and not plan.candidate_mask[2]


def test_hash_split_never_splits_a_group_and_is_deterministic() -> None:
    rows = _rows("b", 200, groups=40)
    proto = EvaluationProtocol(name="split", test_fraction=0.3)
    a = plan_protocol(proto, rows, "b")
    b = plan_protocol(proto, rows, "b")
    assert np.array_equal(a.query_mask, b.query_mask)
    assert a.split is not None and a.split.source == "hash"
    assert a.split.n_groups_across_splits == 0
    side: dict[str, set[bool]] = {}
    for r, q in zip(rows, a.query_mask, strict=True):
        side.setdefault(str(r.group), set()).add(bool(q))
    assert all(len(s) == 1 for s in side.values())
    assert not (a.query_mask & a.candidate_mask).any()
    assert (a.query_mask | a.candidate_mask).all()
    # the rule itself: a group queries iff its hash fraction is below test_fraction
    for g, s in side.items():
        assert s == {unit_fraction(g) < 0.3}
    assert a.split.images["test"] == a.n_queries
    assert a.split.units["test"] + a.split.units["index"] == 40
    assert 0 < a.n_queries < 200


def test_hash_split_without_groups_hashes_images_and_keeps_both_sides() -> None:
    rows = _rows("b", 3, groups=None)
    splits, info = assign_splits(rows, "test", 0.01)  # would put nobody in test
    assert splits.count("test") == 1 and info.source == "hash"
    splits, _ = assign_splits(rows, "test", 0.99)  # would put everybody in test
    assert splits.count("test") == 2


def test_manifest_split_is_used_and_straddling_groups_are_excluded() -> None:
    rows = _rows("b", 20, groups=3, split=True)
    plan = plan_protocol(EvaluationProtocol(name="split"), rows, "b")
    assert plan.split is not None and plan.split.source == "manifest"
    assert plan.n_queries == 4 and plan.n_candidates == 16
    assert plan.groups is not None  # same-group candidates excluded
    assert any("both sides" in w for w in plan.warnings)
    missing = plan_protocol(EvaluationProtocol(name="split", query_split="val"), rows, "b")
    assert missing.n_queries == 0 and any("no image is in split" in w for w in missing.warnings)


def test_cross_batch_history_only_as_candidates_and_same_sha_excluded() -> None:
    cur = _rows("b3", 10)
    old1 = _rows("b1", 8)
    old2 = _rows("b2", 8)
    # b2 repeats an image of b1, and contains an image of tonight's batch
    old2[0] = EvalRow("b2", old2[0].key, old1[5].sha256, "b", "lot9")
    old2[1] = EvalRow("b2", old2[1].key, cur[3].sha256, "b", "lot9")
    rows = sorted(cur + old1 + old2, key=lambda r: (r.batch, r.key))
    plan = plan_protocol(EvaluationProtocol(name="cross-batch"), rows, "b3", ["b1", "b2"])
    is_cur = np.array([r.batch == "b3" for r in rows])
    assert np.array_equal(plan.query_mask, is_cur)
    assert not (plan.candidate_mask & is_cur).any()
    cand_shas = [rows[i].sha256 for i in np.flatnonzero(plan.candidate_mask)]
    assert cur[3].sha256 not in cand_shas
    assert len(cand_shas) == len(set(cand_shas)) == 16 - 2
    kept = next(i for i in np.flatnonzero(plan.candidate_mask) if rows[i].sha256 == old1[5].sha256)
    assert rows[kept].batch == "b2"  # newest copy kept
    assert plan.history is not None
    assert plan.history.n_same_as_query_batch == 1 and plan.history.n_repeated == 1
    # groups are namespaced per batch: no cross-batch exclusion by group name
    assert plan.groups is not None and rows[0].group == "lot0"
    assert plan.groups[0] == "b1/lot0"

    # through the metrics engine: a query never gets its own image back from history
    vecs = np.random.default_rng(0).standard_normal((len(rows), 8)).astype(np.float32)
    twin = next(i for i, r in enumerate(rows) if r.batch == "b2" and r.sha256 == cur[3].sha256)
    me = next(i for i, r in enumerate(rows) if r.batch == "b3" and r.key == cur[3].key)
    vecs[twin] = vecs[me]
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    res = evaluate(
        vecs,
        [r.label for r in rows],
        plan.groups,
        ks=(1, 3),
        query_mask=plan.query_mask,
        candidate_mask=plan.candidate_mask,
        bootstrap=0,
    )
    assert res.per_query is not None
    assert twin not in set(res.per_query.indices.reshape(-1).tolist())
    assert not np.isin(res.per_query.indices, np.flatnonzero(is_cur)).any()


def test_cross_batch_without_history_warns() -> None:
    plan = plan_protocol(EvaluationProtocol(name="cross-batch"), _rows("b", 5), "b", [])
    assert plan.n_candidates == 0 and any("no earlier batch" in w for w in plan.warnings)


def test_rows_must_be_key_ordered() -> None:
    rows = _rows("b", 4)
    with pytest.raises(ValueError, match="ordered"):
        plan_protocol(EvaluationProtocol(), rows[::-1], "b")


def test_stratified_sample_is_seeded_and_stratified() -> None:
    labels = ["a"] * 60 + ["b"] * 30 + ["c"] * 9 + ["d"]
    idx, per_class = stratified_sample(labels, 20, seed=3)
    again, _ = stratified_sample(labels, 20, seed=3)
    other, _ = stratified_sample(labels, 20, seed=4)
    assert np.array_equal(idx, again) and not np.array_equal(idx, other)
    assert idx.size == 20 and np.all(np.diff(idx) > 0)
    drawn = Counter(labels[i] for i in idx)
    assert drawn == Counter(per_class)
    assert set(drawn) == {"a", "b", "c", "d"}  # every class, even the one-image class
    assert drawn["a"] > drawn["b"] > drawn["c"] >= drawn["d"] == 1
    assert abs(drawn["a"] - 1 - 16 * 59 / 96) < 1.0  # 1 each, then 16 by size - 1
    all_idx, _ = stratified_sample(labels, 500, seed=0)
    assert all_idx.size == 100
    few, per = stratified_sample(labels, 2, seed=0)
    assert few.size == 2 and sum(per.values()) == 2


def test_query_sample_applies_after_the_protocol() -> None:
    rows = _rows("b", 100, groups=10)
    proto = EvaluationProtocol(name="split", query_sample=5, seed=1, test_fraction=0.5)
    plan = plan_protocol(proto, rows, "b")
    full = plan_protocol(EvaluationProtocol(name="split", test_fraction=0.5), rows, "b")
    assert plan.sample is not None and plan.sample.size == 5
    assert plan.sample.population == full.n_queries
    assert not (plan.query_mask & ~full.query_mask).any()
    assert np.array_equal(plan.candidate_mask, full.candidate_mask)


def _input(
    name: ProtocolName,
    rows: list[EvalRow],
    batch: str = "b",
    history: Sequence[str] = (),
    **options: Any,
) -> PlanInput:
    return PlanInput(EvaluationProtocol(name=name, **options), rows, batch, history)


def test_plan_input_derives_current_labelled_and_grouped() -> None:
    rows = sorted(_rows("a", 3, groups=None) + _rows("b", 4), key=lambda r: (r.batch, r.key))
    rows[0] = EvalRow("a", rows[0].key, rows[0].sha256, None)
    inp = _input("auto", rows)
    assert inp.current.tolist() == [False] * 3 + [True] * 4
    assert inp.labelled.tolist() == [False] + [True] * 6
    assert inp.grouped  # groups of this batch count, not those of the history
    assert not _input("auto", rows, batch="a").grouped


def test_plan_leave_one_out_queries_and_searches_the_labelled_batch() -> None:
    rows = _rows("b", 6)
    rows[1] = EvalRow("b", rows[1].key, rows[1].sha256, None, "lot1")
    plan = plan_leave_one_out(_input("leave-one-out", rows))
    assert plan.name == plan.requested == "leave-one-out"
    assert plan.query_mask.tolist() == plan.candidate_mask.tolist() == [1, 0, 1, 1, 1, 1]
    assert plan.query_mask is not plan.candidate_mask
    assert plan.groups is None and plan.exclusion == "the query itself"
    assert plan.warnings == [] and plan.split is plan.history is plan.sample is None


def test_plan_leave_one_group_out_excludes_groups_or_falls_back() -> None:
    rows = _rows("b", 8, groups=3)
    plan = plan_leave_one_group_out(_input("leave-one-group-out", rows))
    assert plan.name == "leave-one-group-out" and plan.warnings == []
    assert plan.groups == [r.group for r in rows]
    assert plan.n_queries == plan.n_candidates == 8
    fallback = plan_leave_one_group_out(_input("leave-one-group-out", _rows("b", 8, groups=None)))
    assert fallback.name == "leave-one-out" and fallback.requested == "leave-one-group-out"
    assert fallback.groups is None and any("no groups" in w for w in fallback.warnings)


def test_plan_auto_picks_the_strictest_protocol_the_batch_allows() -> None:
    grouped = plan_auto(_input("auto", _rows("b", 8)))
    assert grouped.name == "leave-one-group-out" and grouped.requested == "auto"
    plain = plan_auto(_input("auto", _rows("b", 8, groups=None)))
    assert plain.name == "leave-one-out" and plain.warnings == []  # no fallback warning


def test_plan_split_queries_one_split_against_the_others() -> None:
    rows = _rows("b", 20, groups=None, split=True)
    plan = plan_split(_input("split", rows))
    assert plan.name == "split" and plan.split is not None and plan.split.source == "manifest"
    is_test = np.array([r.split == "test" for r in rows])
    assert np.array_equal(plan.query_mask, is_test)
    assert np.array_equal(plan.candidate_mask, ~is_test)
    assert plan.groups is None
    assert plan.exclusion == "nothing (queries and candidates are disjoint)"
    hashed = plan_split(_input("split", _rows("b", 40, groups=8), test_fraction=0.5))
    assert hashed.split is not None and hashed.split.source == "hash"
    assert hashed.groups is not None and hashed.warnings == []
    assert not (hashed.query_mask & hashed.candidate_mask).any()


def test_plan_cross_batch_searches_only_the_history() -> None:
    rows = sorted(_rows("b1", 5) + _rows("b2", 4), key=lambda r: (r.batch, r.key))
    plan = plan_cross_batch(_input("cross-batch", rows, batch="b2", history=["b1"]))
    assert plan.name == "cross-batch"
    assert plan.query_mask.tolist() == [False] * 5 + [True] * 4
    assert plan.candidate_mask.tolist() == [True] * 5 + [False] * 4
    assert plan.history is not None and plan.history.batches == ["b1"]
    assert plan.history.n_images == 5 and plan.warnings == []
    assert plan.groups is not None and plan.groups[0] == "b1/lot0"
    empty = plan_cross_batch(_input("cross-batch", rows, batch="b2", history=["b1", "b0"]))
    assert empty.history is not None and empty.history.batches == ["b1", "b0"]
    unlabelled = [
        EvalRow(r.batch, r.key, r.sha256, None if r.batch == "b1" else r.label) for r in rows
    ]
    none_left = plan_cross_batch(_input("cross-batch", unlabelled, batch="b2", history=["b1"]))
    assert none_left.n_candidates == 0
    assert any("no labelled image to search" in w for w in none_left.warnings)


def test_plan_protocol_dispatches_every_protocol_name() -> None:
    names: tuple[ProtocolName, ...] = (
        "auto",
        "leave-one-out",
        "leave-one-group-out",
        "split",
        "cross-batch",
    )
    assert set(PLANNERS) == set(names)
    rows = _rows("b", 10)
    for name in names:
        direct = PLANNERS[name](_input(name, rows))
        via = plan_protocol(EvaluationProtocol(name=name), rows, "b")
        assert via.name == direct.name and via.requested == name
        assert np.array_equal(via.query_mask, direct.query_mask)
        assert np.array_equal(via.candidate_mask, direct.candidate_mask)


def test_sample_queries_keeps_candidates_and_leaves_an_unsampled_plan_alone() -> None:
    rows = _rows("b", 30)
    plan = plan_leave_one_out(_input("leave-one-out", rows))
    assert sample_queries(plan, _input("leave-one-out", rows)) is plan
    inp = _input("leave-one-out", rows, query_sample=6, seed=2)
    sampled = sample_queries(plan, inp)
    assert sampled.sample is not None and sampled.n_queries == 6
    assert np.array_equal(sampled.candidate_mask, plan.candidate_mask)
    assert plan.n_queries == 30  # the input plan is not changed
    too_many = sample_queries(plan, _input("leave-one-out", rows, query_sample=50))
    assert too_many.n_queries == 30 and any("only 30 queries" in w for w in too_many.warnings)
