"""Deliberately simple second implementation of every retrieval metric (tests only).

Python loops over queries, a full sort of each query's candidates by (-similarity, row index),
dicts and Counters — no blocking, no vectorisation tricks — so that the fast engine in
``kiban_reporter.metrics`` can be checked against something obviously right.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np


def _missing(x: object) -> bool:
    return x is None or x == "" or (isinstance(x, float) and x != x)


@dataclass
class RefQuery:
    row: int
    label: str
    group: str | int
    ranked: list[int]  # candidate rows, best first (all of them)
    sims: list[float]
    n_relevant: int


@dataclass
class RefK:
    k: int
    hits: list[bool] = field(default_factory=list)
    preds: list[str | None] = field(default_factory=list)
    aps: list[float | None] = field(default_factory=list)  # None where R = 0


def ref_rank(vectors, labels, groups=None, query_mask=None, candidate_mask=None) -> list[RefQuery]:
    """Every evaluated query with its complete ranking (queries without candidates dropped)."""
    v = np.asarray(vectors, dtype=np.float32)
    n = len(v)
    qm = [True] * n if query_mask is None else list(query_mask)
    cm = [True] * n if candidate_mask is None else list(candidate_mask)
    out = []
    for q in range(n):
        if not qm[q] or _missing(labels[q]):
            continue
        gq = q if groups is None else groups[q]
        cands = []
        for c in range(n):
            if not cm[c] or _missing(labels[c]) or c == q:
                continue
            if groups is not None and groups[c] == gq:
                continue
            cands.append(c)
        if not cands:
            continue
        sims = v[cands] @ v[q]
        pairs = sorted(zip(cands, sims.tolist(), strict=True), key=lambda p: (-p[1], p[0]))
        n_rel = sum(1 for c in cands if labels[c] == labels[q])
        out.append(
            RefQuery(q, str(labels[q]), gq, [p[0] for p in pairs], [p[1] for p in pairs], n_rel)
        )
    return out


def ref_majority(ranked_labels: list[str]) -> str | None:
    """Most frequent label; ties go to the tied label appearing first in the ranking."""
    if not ranked_labels:
        return None
    counts = Counter(ranked_labels)
    best = max(counts.values())
    for lab in ranked_labels:
        if counts[lab] == best:
            return lab
    raise AssertionError("unreachable")


def ref_ap(rel: list[bool], k: int, n_relevant: int) -> float | None:
    if n_relevant == 0:
        return None
    total, found = 0.0, 0
    for i, r in enumerate(rel[:k], start=1):
        if r:
            found += 1
            total += found / i
    return total / min(k, n_relevant)


def ref_per_k(queries: list[RefQuery], labels, k: int) -> RefK:
    out = RefK(k)
    for q in queries:
        top = [str(labels[c]) for c in q.ranked[:k]]
        out.hits.append(q.label in top)
        out.preds.append(ref_majority(top))
        out.aps.append(ref_ap([t == q.label for t in top], k, q.n_relevant))
    return out


def ref_classification(y_true: list[str], y_pred: list[str | None]) -> dict:
    """Accuracy, per-class P/R/F1/support, macro/weighted F1, confusion — by counting."""
    classes = sorted(set(y_true))
    per_class = {}
    for c in classes:
        tp = sum(1 for t, p in zip(y_true, y_pred, strict=True) if t == c and p == c)
        n_pred = sum(1 for p in y_pred if p == c)
        support = sum(1 for t in y_true if t == c)
        precision = tp / n_pred if n_pred else 0.0
        recall = tp / support
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[c] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    macro = sum(d["f1"] for d in per_class.values()) / len(classes)
    weighted = sum(d["f1"] * d["support"] for d in per_class.values()) / len(y_true)
    shown = sorted(set(y_true) | {p for p in y_pred if p is not None})
    matrix = [[0] * len(shown) for _ in shown]
    for t, p in zip(y_true, y_pred, strict=True):
        if p is not None:
            matrix[shown.index(t)][shown.index(p)] += 1
    accuracy = sum(1 for t, p in zip(y_true, y_pred, strict=True) if t == p) / len(y_true)
    return {
        "accuracy": accuracy,
        "macro_f1": macro,
        "weighted_f1": weighted,
        "per_class": per_class,
        "labels": shown,
        "matrix": matrix,
    }


def ref_headline(queries: list[RefQuery], per_k: RefK) -> dict[str, float | None]:
    """acc@k, MV@k accuracy, MV@k macro-F1, mAP@k over the given query positions."""
    y_true = [q.label for q in queries]
    n = len(queries)
    if n == 0:
        return {"acc_at_k": None, "mv_accuracy": None, "mv_macro_f1": None, "map_at_k": None}
    aps = [a for a in per_k.aps if a is not None]
    return {
        "acc_at_k": sum(per_k.hits) / n,
        "mv_accuracy": sum(1 for t, p in zip(y_true, per_k.preds, strict=True) if t == p) / n,
        "mv_macro_f1": ref_classification(y_true, per_k.preds)["macro_f1"],
        "map_at_k": sum(aps) / len(aps) if aps else None,
    }


def ref_evaluate(vectors, labels, groups=None, ks=(1, 3, 5), query_mask=None, candidate_mask=None):
    """Point estimates of every metric at every k, plus the rankings."""
    queries = ref_rank(vectors, labels, groups, query_mask, candidate_mask)
    out = {"queries": queries, "k": {}}
    for k in ks:
        pk = ref_per_k(queries, labels, k)
        y_true = [q.label for q in queries]
        out["k"][k] = {
            "per_k": pk,
            "headline": ref_headline(queries, pk),
            "classification": ref_classification(y_true, pk.preds) if queries else None,
        }
    return out


def ref_bootstrap(queries: list[RefQuery], per_k: RefK, grouped: bool, draws) -> dict:
    """Headline metrics per resample, given the drawn unit ids (one row of ``draws`` each).

    Units are the sorted distinct groups of the queries (grouped) or the queries themselves.
    """
    if grouped:
        names = sorted({str(q.group) for q in queries})
        members = {u: [] for u in range(len(names))}
        for i, q in enumerate(queries):
            members[names.index(str(q.group))].append(i)
    else:
        members = {i: [i] for i in range(len(queries))}
    out: dict[str, list[float]] = {}
    for row in draws:
        picked = [i for u in row for i in members[int(u)]]
        sub_q = [queries[i] for i in picked]
        sub_k = RefK(
            per_k.k,
            [per_k.hits[i] for i in picked],
            [per_k.preds[i] for i in picked],
            [per_k.aps[i] for i in picked],
        )
        for key, value in ref_headline(sub_q, sub_k).items():
            out.setdefault(key, []).append(float("nan") if value is None else value)
    return out
