"""Validate and integer-encode the evaluation inputs.

Everything downstream works on integer codes (labels, groups) and index arrays (queries,
candidates) so that the hot loops are vectorised numpy. Bad *shapes or values* (wrong lengths,
non-finite vectors) are programming errors and raise ``ValueError``; awkward *data* (missing
labels, un-normalised vectors) is a warning, never a crash.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import ArrayLike, NDArray

NORM_TOLERANCE = 1e-3


@dataclass(frozen=True)
class EncodedInputs:
    """The evaluation problem as integer arrays.

    ``group_codes`` is always defined: in leave-one-out mode every row is its own group
    (code == row index), which lets one exclusion rule ("same group") cover both protocols.
    """

    vectors: NDArray[np.float32]
    label_codes: NDArray[np.int64]  # -1 = missing label
    classes: list[str]  # code -> label, sorted
    group_codes: NDArray[np.int64]
    n_groups: int
    grouped: bool
    query_rows: NDArray[np.int64]  # ascending
    candidate_rows: NDArray[np.int64]  # ascending
    n_unlabelled: int
    warnings: list[str] = field(default_factory=list)


def _is_missing(value: object) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value == ""


def _as_strings(values: ArrayLike | Sequence[object], n: int, what: str) -> tuple[list, NDArray]:
    seq = list(np.asarray(values, dtype=object).reshape(-1))
    if len(seq) != n:
        raise ValueError(f"{what} has {len(seq)} entries, vectors have {n} rows")
    missing = np.fromiter((_is_missing(v) for v in seq), dtype=bool, count=n)
    return [str(v) for v in seq], missing


def _mask(mask: ArrayLike | None, n: int, what: str) -> NDArray[np.bool_]:
    if mask is None:
        return np.ones(n, dtype=bool)
    arr = np.asarray(mask)
    if arr.dtype != np.bool_ or arr.shape != (n,):
        raise ValueError(
            f"{what} must be a boolean array of shape ({n},), got {arr.dtype} {arr.shape}"
        )
    return arr


def encode_inputs(
    vectors: ArrayLike,
    labels: ArrayLike | Sequence[object],
    groups: ArrayLike | Sequence[object] | None = None,
    query_mask: ArrayLike | None = None,
    candidate_mask: ArrayLike | None = None,
) -> EncodedInputs:
    """Check the inputs and turn labels/groups/masks into codes and row index arrays."""
    vec = np.ascontiguousarray(vectors, dtype=np.float32)
    if vec.ndim != 2:
        raise ValueError(f"vectors must be 2-D [N, D], got shape {vec.shape}")
    n = vec.shape[0]
    if n and not np.isfinite(vec).all():
        raise ValueError("vectors contain NaN or infinite values")
    warnings: list[str] = []
    if n:
        norms = np.sqrt(np.einsum("ij,ij->i", vec, vec, dtype=np.float64))
        bad = int(np.count_nonzero(np.abs(norms - 1.0) > NORM_TOLERANCE))
        if bad:
            warnings.append(
                f"{bad} of {n} vectors are not L2-normalised (|norm - 1| > {NORM_TOLERANCE}); "
                "the ranking uses raw dot products, which is not cosine similarity for them"
            )

    label_str, label_missing = _as_strings(labels, n, "labels")
    classes = sorted({s for s, m in zip(label_str, label_missing, strict=True) if not m})
    index = {c: i for i, c in enumerate(classes)}
    label_codes = np.fromiter(
        (-1 if m else index[s] for s, m in zip(label_str, label_missing, strict=True)),
        dtype=np.int64,
        count=n,
    )
    n_unlabelled = int(label_missing.sum())
    if n_unlabelled:
        warnings.append(
            f"{n_unlabelled} rows have no label; they are neither queries nor candidates"
        )

    if groups is None:
        group_codes = np.arange(n, dtype=np.int64)
        n_groups = n
        grouped = False
    else:
        group_str, group_missing = _as_strings(groups, n, "groups")
        names = sorted({s for s, m in zip(group_str, group_missing, strict=True) if not m})
        gindex = {g: i for i, g in enumerate(names)}
        group_codes = np.empty(n, dtype=np.int64)
        next_code = len(names)
        for i, (s, m) in enumerate(zip(group_str, group_missing, strict=True)):
            if m:  # a row without a group is its own group: leave-one-out for that row
                group_codes[i] = next_code
                next_code += 1
            else:
                group_codes[i] = gindex[s]
        n_groups = next_code
        grouped = True
        if group_missing.any():
            warnings.append(
                f"{int(group_missing.sum())} rows have no group; each is treated as its own group"
            )

    labelled = label_codes >= 0
    qmask = _mask(query_mask, n, "query_mask") & labelled
    cmask = _mask(candidate_mask, n, "candidate_mask") & labelled
    return EncodedInputs(
        vectors=vec,
        label_codes=label_codes,
        classes=classes,
        group_codes=group_codes,
        n_groups=n_groups,
        grouped=grouped,
        query_rows=np.flatnonzero(qmask).astype(np.int64),
        candidate_rows=np.flatnonzero(cmask).astype(np.int64),
        n_unlabelled=n_unlabelled,
        warnings=warnings,
    )
