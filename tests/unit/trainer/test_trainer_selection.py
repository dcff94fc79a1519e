"""The trainer's training side is the complement of the reporter's split-protocol queries."""

from __future__ import annotations

import hashlib

import pytest

from kiban.records import ImageRecord
from kiban.splits import held_out_units
from kiban_reporter.protocols import EvalRow, assign_splits
from kiban_trainer.errors import TrainingError
from kiban_trainer.selection import (
    select_training_set,
    training_set_digest,
    training_side,
)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _records(
    batch: str,
    n: int,
    groups: int | None = 10,
    split_every: int | None = None,
    unlabelled_every: int | None = None,
    classes: str = "abc",
) -> list[ImageRecord]:
    rows = []
    for i in range(n):
        split = None
        if split_every is not None:
            split = "test" if i % split_every == 0 else ("val" if i % 7 == 0 else "train")
        unlabelled = unlabelled_every and i % unlabelled_every == 3
        label = None if unlabelled else classes[i % len(classes)]
        rows.append(
            ImageRecord(
                key=f"{label or 'x'}/img-{i:04d}.jpg",
                sha256=_sha(f"{batch}-{i}"),
                label=label,
                group=f"lot{i % groups:02d}" if groups else None,
                split=split,
                width=64,
                height=64,
            )
        )
    return rows


def _reporter_queries(records: list[ImageRecord], fraction: float) -> set[str]:
    rows = [EvalRow("b", r.key, r.sha256, r.label, r.group, r.split) for r in records]
    splits, _ = assign_splits(rows, "test", fraction)
    return {r.sha256 for r, s in zip(rows, splits, strict=True) if s == "test"}


@pytest.mark.parametrize(
    ("groups", "split_every", "fraction"),
    [(10, None, 0.2), (None, None, 0.3), (25, None, 0.5), (10, 5, 0.2), (None, 4, 0.2)],
    ids=["hash-groups", "hash-images", "hash-half", "manifest-groups", "manifest-images"],
)
def test_training_side_is_exactly_the_reporter_non_queries(
    groups: int | None, split_every: int | None, fraction: float
) -> None:
    records = _records("b", 200, groups=groups, split_every=split_every, unlabelled_every=11)
    queries = _reporter_queries(records, fraction)
    assert queries, "the rule must hold out something"
    side, source = training_side(records, "test", fraction)
    assert source == ("manifest" if split_every else "hash")
    trained_side = {r.sha256 for r, t in zip(records, side, strict=True) if t}
    assert trained_side == {r.sha256 for r in records} - queries

    selection = select_training_set({"b": records}, "test", fraction)
    chosen = {img.sha256 for img in selection.images}
    labelled_others = {r.sha256 for r in records if r.label and r.sha256 not in queries}
    assert chosen == labelled_others  # only labelled images, none held out
    assert not chosen & queries


def test_hash_split_never_cuts_a_group_and_matches_kiban_splits() -> None:
    records = _records("b", 120, groups=12)
    held = held_out_units([r.group or r.sha256 for r in records], 0.25)
    selection = select_training_set({"b": records}, "test", 0.25)
    trained_groups = {r.group for r in records if r.sha256 in set(selection.sha256s)}
    assert trained_groups and not trained_groups & held
    assert trained_groups | held == {r.group for r in records}


def test_manifest_images_without_split_are_trained_on_like_reporter_candidates() -> None:
    records = _records("b", 30, groups=None, split_every=3)
    records[1] = records[1].model_copy(update={"split": None})
    selection = select_training_set({"b": records}, "test", 0.2)
    assert records[1].sha256 in selection.sha256s
    assert records[0].sha256 not in selection.sha256s  # split "test"
    # another held-out split name holds other images out
    other = select_training_set({"b": records}, "val", 0.2)
    assert records[0].sha256 in other.sha256s
    assert all(r.sha256 not in other.sha256s for r in records if r.split == "val")


def test_digest_is_sha256_of_sorted_distinct_sha256s_one_per_line() -> None:
    shas = [_sha("b"), _sha("a"), _sha("b")]
    expected = hashlib.sha256(
        "".join(f"{s}\n" for s in sorted({_sha("a"), _sha("b")})).encode()
    ).hexdigest()
    assert training_set_digest(shas) == expected
    selection = select_training_set({"b": _records("b", 40)}, "test", 0.2)
    assert selection.digest == training_set_digest(selection.sha256s)
    assert selection.digest != training_set_digest(selection.sha256s[1:])


def test_images_per_class_and_description() -> None:
    selection = select_training_set({"b": _records("b", 90, unlabelled_every=10)}, "test", 0.2)
    per_class = selection.images_per_class
    assert sum(per_class.values()) == len(selection.images)
    assert list(per_class) == ["a", "b", "c"]
    side = selection.batches[0]
    assert side.n_trained == len(selection.images)
    assert side.n_held_out + side.n_trained + side.n_unlabelled == side.n_images
    assert "hash split" in selection.describe() and "kiban-split:" in selection.describe()


def test_an_image_held_out_in_any_batch_is_never_trained_on() -> None:
    a = _records("a", 60, groups=None, split_every=5)
    b = _records("b", 60, groups=None, split_every=5)
    # the same bytes as a held-out image of batch a arrive in batch b (training side there)
    held_in_a = a[0]
    assert held_in_a.split == "test"
    b.append(held_in_a.model_copy(update={"key": "moved/copy.jpg", "split": "train"}))
    selection = select_training_set({"a": a, "b": b}, "test", 0.2)
    assert held_in_a.sha256 not in selection.sha256s
    assert selection.n_held_out_elsewhere >= 1
    # an image on the training side of two batches is trained on once
    twice = select_training_set({"a": b, "b": b}, "test", 0.2)
    assert len(twice.sha256s) == len(set(twice.sha256s))
    assert twice.n_repeated == len(twice.images)


def test_clear_errors() -> None:
    with pytest.raises(TrainingError, match="nothing to train on"):
        select_training_set({"b": _records("b", 20, split_every=1)}, "test", 0.2)
    with pytest.raises(TrainingError, match="only one class"):
        select_training_set({"b": _records("b", 30, classes="a")}, "test", 0.2)
    rare = _records("b", 60, split_every=5)
    rare.append(
        rare[1].model_copy(update={"sha256": _sha("rare"), "label": "rare", "key": "r/1.jpg"})
    )
    with pytest.raises(TrainingError, match="fewer than 2 training images.*'rare' \\(1\\)"):
        select_training_set({"b": rare}, "test", 0.2)
    conflict = _records("a", 40, split_every=5)
    assert conflict[1].split == "train"
    relabelled = conflict[1].model_copy(update={"key": "z/dup.jpg", "label": "c"})
    with pytest.raises(TrainingError, match="labelled 'b' in a .* and 'c' in b"):
        select_training_set({"a": conflict, "b": [relabelled]}, "test", 0.2)


def test_keep_rechecks_and_says_why() -> None:
    selection = select_training_set({"b": _records("b", 60)}, "test", 0.2)
    keep = set(selection.sha256s[2:])
    smaller = selection.keep(keep, "no stored embedding")
    assert len(smaller.images) == len(selection.images) - 2
    assert "2 images left out: no stored embedding" in smaller.describe()
    assert smaller.digest != selection.digest
    with pytest.raises(TrainingError, match="only one class"):
        selection.keep({i.sha256 for i in selection.images if i.label == "a"}, "gone")
