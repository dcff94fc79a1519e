"""The one rule that puts a group on the held-out or the index side of a batch.

The reporter's split protocol and the trainer both use it, so a specialist trained on "the
training side" never sees an image the split protocol queries with — by construction, not by
two implementations agreeing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

SPLIT_SALT = "kiban-split:"
SPLIT_RULE = (
    "unit = group (the image's sha256 when it has no group); "
    "u = first 8 bytes of sha256('kiban-split:' + unit) as an unsigned big-endian integer / 2^64; "
    "the unit's images are queries (query_split) when u < test_fraction, else candidates "
    "('index'); if that leaves one side empty, the unit with the smallest u (or the largest) "
    "moves over"
)


def unit_fraction(unit: str) -> float:
    """A deterministic number in [0, 1) for a split unit (group or sha256)."""
    digest = hashlib.sha256(f"{SPLIT_SALT}{unit}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def held_out_units(units: Iterable[str], test_fraction: float) -> set[str]:
    """The units on the held-out (query) side under ``SPLIT_RULE``; never all, never none."""
    uniq = sorted(set(units))
    frac = {u: unit_fraction(u) for u in uniq}
    test = {u for u in uniq if frac[u] < test_fraction}
    if uniq and not test:
        test = {min(uniq, key=lambda u: frac[u])}
    if len(uniq) > 1 and len(test) == len(uniq):
        test.discard(max(uniq, key=lambda u: frac[u]))
    return test
