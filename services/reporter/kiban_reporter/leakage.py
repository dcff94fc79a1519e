"""The leakage check: no model is scored on images any evaluated model was trained on.

A specialist kiban trained carries ``training`` provenance on its card and the sha256s of its
training images in the registry (``kiban.models.registry.load_training_set``). A query it
was trained on flatters it, so every evaluated row whose sha256 is in ANY evaluated model's
training set leaves the queries of EVERY model: the models stay paired on the same queries.
Candidates (the gallery being searched) that were trained on are allowed, and counted.

A trained model whose training set is missing fails the evaluation (``StoreError``, naming
the model): scoring it anyway would silently report leaked numbers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from kiban.models.card import ModelCard
from kiban.models.registry import load_training_set
from kiban.store import ObjectStore
from kiban_reporter.decision_schema import LeakageCheck
from kiban_reporter.protocols import EvalRow, ProtocolPlan


@dataclass
class Leakage:
    """What the training sets overlap, and which rows leave the queries of every model."""

    checks: list[LeakageCheck] = field(default_factory=list)
    excluded: NDArray[np.bool_] | None = None  # rows removed from the queries
    warnings: list[str] = field(default_factory=list)

    @property
    def n_excluded(self) -> int:
        return 0 if self.excluded is None else int(np.count_nonzero(self.excluded))


def training_sets(store: ObjectStore, cards: Mapping[str, ModelCard]) -> dict[str, frozenset[str]]:
    """The training images of every evaluated model kiban trained (raises if one is missing)."""
    return {name: load_training_set(store, card) for name, card in cards.items() if card.training}


def check_leakage(
    rows: Sequence[EvalRow], plan: ProtocolPlan, trained: Mapping[str, frozenset[str]]
) -> Leakage:
    """Count each model's training images among the queries and candidates of ``plan``."""
    sha = np.array([r.sha256 for r in rows], dtype=object)
    hits = {
        model: (len(images), np.fromiter((s in images for s in sha), dtype=bool, count=len(rows)))
        for model, images in trained.items()
    }
    return leakage_from_hits(hits, plan)


def leakage_from_hits(
    hits: Mapping[str, tuple[int, NDArray[np.bool_]]], plan: ProtocolPlan
) -> Leakage:
    """The leakage check from each trained model's (training set size, row-was-trained mask).

    The streamed evaluation builds the masks chunk by chunk without keeping the sha256s.
    """
    out = Leakage(excluded=np.zeros(plan.query_mask.size, dtype=bool))
    if not hits:
        return out
    for model, (n_images, hit) in hits.items():
        queries = int(np.count_nonzero(hit & plan.query_mask))
        candidates = int(np.count_nonzero(hit & plan.candidate_mask))
        out.checks.append(
            LeakageCheck(
                model=model,
                training_images=n_images,
                overlap_queries=queries,
                overlap_candidates=candidates,
            )
        )
        assert out.excluded is not None
        out.excluded |= hit & plan.query_mask
        if queries:
            out.warnings.append(
                f"{model} was trained on {queries} of the queries: excluded from the queries of "
                "every model"
            )
        if candidates:
            out.warnings.append(
                f"{model} was trained on {candidates} of the candidates (index images): allowed, "
                "counted in the leakage section"
            )
    if out.n_excluded and out.n_excluded == plan.n_queries:
        out.warnings.append(
            "every query was trained on by some evaluated model: nothing left to score"
        )
    return out


def exclude_queries(plan: ProtocolPlan, leakage: Leakage) -> ProtocolPlan:
    """The plan with the leaked rows removed from the queries (candidates unchanged)."""
    if not leakage.n_excluded or leakage.excluded is None:
        return plan
    return dataclasses.replace(plan, query_mask=plan.query_mask & ~leakage.excluded)
