"""Classification scores of the MV@k predictions, from per-class counts.

Everything is derived from three count vectors per class — support (true), predicted and true
positives — because the bootstrap needs exactly these counts per resample (obtained by one matmul
of resample weights with per-unit counts) and the same formulas must serve the point estimate
and every resample. Conventions follow scikit-learn with ``zero_division=0``: precision of a class
never predicted is 0; F1 = 2 TP / (support + predicted).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from kiban_reporter.metrics.results import ClassificationReport, ClassMetrics, ConfusionMatrix


def _safe_div(num: NDArray, den: NDArray) -> NDArray[np.float64]:
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den > 0)


def f1_from_counts(support: NDArray, predicted: NDArray, tp: NDArray) -> NDArray[np.float64]:
    """Per-class F1 = 2 TP / (support + predicted), 0 where both are 0. Works on ``[..., C]``."""
    return _safe_div(2.0 * np.asarray(tp, dtype=np.float64), np.add(support, predicted))


def macro_f1_from_counts(support: NDArray, predicted: NDArray, tp: NDArray) -> NDArray[np.float64]:
    """Mean F1 over classes with support > 0 (last axis); NaN where no class has support.

    NaN only travels inside the bootstrap (and is filtered there); public values use ``None``.
    """
    present = np.asarray(support) > 0
    f1 = f1_from_counts(support, predicted, tp)
    n_present = present.sum(axis=-1)
    total = np.where(present, f1, 0.0).sum(axis=-1)
    return np.divide(total, n_present, out=np.full(np.shape(total), np.nan), where=n_present > 0)


def weighted_f1_from_counts(
    support: NDArray, predicted: NDArray, tp: NDArray
) -> NDArray[np.float64]:
    """Support-weighted mean F1 (last axis); NaN where total support is 0."""
    support = np.asarray(support, dtype=np.float64)
    f1 = f1_from_counts(support, predicted, tp)
    total = support.sum(axis=-1)
    weighted = (f1 * support).sum(axis=-1)
    return np.divide(weighted, total, out=np.full(np.shape(total), np.nan), where=total > 0)


def class_counts(
    y_true: NDArray[np.int64], y_pred: NDArray[np.int64], n_classes: int
) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int64]]:
    """(support, predicted, true positives) per class code; ``y_pred == -1`` predicts nothing."""
    support = np.bincount(y_true, minlength=n_classes)
    has_pred = y_pred >= 0
    predicted = np.bincount(y_pred[has_pred], minlength=n_classes)
    tp = np.bincount(y_true[(y_true == y_pred) & has_pred], minlength=n_classes)
    return support, predicted, tp


def classification_report(
    y_true: NDArray[np.int64], y_pred: NDArray[np.int64], classes: list[str]
) -> ClassificationReport:
    """Accuracy, macro/weighted F1, per-class table and confusion matrix of one MV@k run.

    The per-class table lists the classes present among the true labels (those averaged by
    macro-F1); the confusion matrix covers the sorted union of true and predicted classes.
    """
    if y_true.size == 0:
        raise ValueError("classification_report needs at least one query")
    n_classes = len(classes)
    support, predicted, tp = class_counts(y_true, y_pred, n_classes)
    precision = _safe_div(tp, predicted)
    recall = _safe_div(tp, support)
    f1 = f1_from_counts(support, predicted, tp)
    present = np.flatnonzero(support > 0)
    per_class = [
        ClassMetrics(
            label=classes[c],
            precision=float(precision[c]),
            recall=float(recall[c]),
            f1=float(f1[c]),
            support=int(support[c]),
        )
        for c in present
    ]
    shown = np.union1d(present, np.flatnonzero(predicted > 0))
    position = np.full(n_classes, -1, dtype=np.int64)
    position[shown] = np.arange(shown.size)
    matrix = np.zeros((shown.size, shown.size), dtype=np.int64)
    has_pred = y_pred >= 0
    np.add.at(matrix, (position[y_true[has_pred]], position[y_pred[has_pred]]), 1)
    return ClassificationReport(
        accuracy=float(np.mean(y_true == y_pred)),
        macro_f1=float(macro_f1_from_counts(support, predicted, tp)),
        weighted_f1=float(weighted_f1_from_counts(support, predicted, tp)),
        per_class=per_class,
        confusion=ConfusionMatrix(labels=[classes[c] for c in shown], matrix=matrix.tolist()),
    )
