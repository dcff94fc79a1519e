"""The leakage check: trained-on queries leave every model's queries; candidates are counted."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kiban.errors import StoreError
from kiban.messages import EvaluationProtocol
from kiban.models.card import ModelCard, Preprocessing, TrainingProvenance
from kiban.models.registry import publish_training_set
from kiban.store import open_store
from kiban_reporter.leakage import check_leakage, exclude_queries, training_sets
from kiban_reporter.metrics import compare, evaluate
from kiban_reporter.protocols import EvalRow, plan_protocol


def _rows(n: int = 40) -> list[EvalRow]:
    return [EvalRow("b", f"k{i:03d}", f"sha{i:03d}", f"c{i % 2}", f"g{i % 8}") for i in range(n)]


def _card(name: str, trained: bool) -> ModelCard:
    training = (
        TrainingProvenance(
            mode="head",
            base_model="base",
            base_source="x",
            batches=["old"],
            split="all",
            training_set_sha256="0" * 64,
            n_images=3,
            images_per_class={"c0": 3},
            objective="arcface",
            epochs=1,
            seed=0,
            loss_per_epoch=[1.0],
            wall_seconds=1.0,
            device="cpu",
        )
        if trained
        else None
    )
    return ModelCard(
        name=name,
        family="domain",
        source="x",
        architecture="x",
        weights="w",
        pretrained=True,
        input_size=8,
        preprocessing=Preprocessing(resize_shorter=8, crop=8, mean=[0.5] * 3, std=[0.5] * 3),
        embedding_dim=4,
        params=1,
        file_size=1,
        sha256="0" * 64,
        opset=17,
        exported_at="2026-11-28T00:00:00Z",
        training=training,
    )


def test_trained_queries_leave_every_models_queries_and_are_counted() -> None:
    rows = _rows()
    plan = plan_protocol(EvaluationProtocol(name="split", seed=0), rows, "b")
    queries = [r.sha256 for r, q in zip(rows, plan.query_mask, strict=True) if q]
    candidates = [r.sha256 for r, c in zip(rows, plan.candidate_mask, strict=True) if c]
    assert len(queries) >= 3 and len(candidates) >= 2
    trained = {
        "head-a": frozenset([*queries[:2], candidates[0], "not-in-this-batch"]),
        "head-b": frozenset([queries[1], queries[2]]),  # overlaps head-a on one query
    }
    leak = check_leakage(rows, plan, trained)
    checks = {c.model: c for c in leak.checks}
    assert checks["head-a"].training_images == 4
    assert (checks["head-a"].overlap_queries, checks["head-a"].overlap_candidates) == (2, 1)
    assert (checks["head-b"].overlap_queries, checks["head-b"].overlap_candidates) == (2, 0)
    assert leak.n_excluded == 3  # the union, not the sum
    assert any(
        w == "head-a was trained on 2 of the queries: excluded from the queries of every model"
        for w in leak.warnings
    )
    after = exclude_queries(plan, leak)
    assert after.n_queries == plan.n_queries - 3
    assert np.array_equal(after.candidate_mask, plan.candidate_mask)  # the gallery stays
    left = {r.sha256 for r, q in zip(rows, after.query_mask, strict=True) if q}
    assert left.isdisjoint(trained["head-a"] | trained["head-b"])

    # every model is scored on the same reduced queries, so they still pair
    rng = np.random.default_rng(0)
    results = []
    for name in ("head-a", "other"):
        v = rng.standard_normal((len(rows), 4)).astype(np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        results.append(
            evaluate(
                v,
                [r.label for r in rows],
                after.groups,
                ks=[1],
                query_mask=after.query_mask,
                candidate_mask=after.candidate_mask,
                bootstrap=20,
                name=name,
            )
        )
    assert results[0].n_queries == results[1].n_queries <= after.n_queries
    assert compare(results[0], results[1]).n_queries == results[0].n_queries


def test_no_trained_model_changes_nothing() -> None:
    rows = _rows()
    plan = plan_protocol(EvaluationProtocol(name="leave-one-out"), rows, "b")
    leak = check_leakage(rows, plan, {})
    assert leak.checks == [] and leak.n_excluded == 0 and leak.warnings == []
    assert exclude_queries(plan, leak) is plan


def test_every_query_trained_on_is_said() -> None:
    rows = _rows(10)
    plan = plan_protocol(EvaluationProtocol(name="leave-one-out"), rows, "b")
    leak = check_leakage(rows, plan, {"m": frozenset(r.sha256 for r in rows)})
    assert exclude_queries(plan, leak).n_queries == 0
    assert any("nothing left to score" in w for w in leak.warnings)


def test_training_sets_load_only_trained_models_and_a_missing_one_fails(tmp_path: Path) -> None:
    store = open_store((tmp_path / "store").as_uri(), create=True)
    cards = {"plain": _card("plain", False), "head": _card("head", True)}
    with pytest.raises(StoreError, match="'head'.*training set"):
        training_sets(store, cards)
    publish_training_set(store, "head", ["b", "a", "a"])
    assert training_sets(store, cards) == {"head": frozenset({"a", "b"})}
