"""Which images of the batches a specialist trains on: the training side, labelled only.

The rule is the reporter's split protocol, per batch (``kiban.splits`` holds the hash rule
both use, so they cannot drift apart):

- **manifest splits** — when any image of a batch has a split in the manifest: every image
  whose split is not ``holdout_split`` is on the training side (an image without a split
  too: the split protocol makes it a candidate, never a query);
- **hash splits** — otherwise: the unit is the image's group (its sha256 without one), and
  the units ``held_out_units(units, test_fraction)`` puts on the held-out side are left out.
  The units are those of *every* accepted image of the batch, as in the reporter, so the
  same batch gives the same held-out side in both.

Only labelled images are trained on. An image held out in *any* of the batches is never
trained on (the same bytes can arrive in two batches), and an image found in several
batches is trained on once. The training set's identity is its digest: the sha256 of the
sorted, distinct image sha256s, one per line (each line ends with a newline).

Pure logic apart from ``read_selection``, which reads the batches' records.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

from kiban.errors import StoreError
from kiban.records import ImageRecord, read_records
from kiban.splits import SPLIT_RULE, held_out_units
from kiban.store import ObjectStore
from kiban_trainer.errors import TrainingError

MIN_PER_CLASS = 2


@dataclass(frozen=True)
class TrainingImage:
    """One image trained on: where it is (batch, key), what it is (sha256) and its label."""

    batch_id: str
    key: str
    sha256: str
    label: str


@dataclass(frozen=True)
class BatchSide:
    """How one batch was split: the counts behind the card's split description."""

    batch_id: str
    source: Literal["manifest", "hash"]
    n_images: int
    n_held_out: int
    n_unlabelled: int = 0  # on the training side but without a label
    n_trained: int = 0


@dataclass(frozen=True)
class Selection:
    """The training set: images in (batch, key) order, one per sha256, and how it was chosen."""

    images: list[TrainingImage]
    batches: list[BatchSide]
    holdout_split: str
    test_fraction: float
    n_held_out_elsewhere: int = 0
    n_repeated: int = 0
    left_out: tuple[str, ...] = ()  # why images of the training side were not trained on

    @property
    def sha256s(self) -> list[str]:
        return sorted(img.sha256 for img in self.images)

    @property
    def digest(self) -> str:
        return training_set_digest(img.sha256 for img in self.images)

    @property
    def classes(self) -> list[str]:
        return sorted({img.label for img in self.images})

    @property
    def images_per_class(self) -> dict[str, int]:
        counts = Counter(img.label for img in self.images)
        return {c: counts[c] for c in sorted(counts)}

    def labels(self) -> list[int]:
        """Class index of every image (classes in sorted order)."""
        index = {c: i for i, c in enumerate(self.classes)}
        return [index[img.label] for img in self.images]

    def describe(self) -> str:
        """The card's ``split`` field: which images were trained on, and why."""
        parts = []
        for b in self.batches:
            if b.source == "manifest":
                rule = f"manifest splits, every split but {self.holdout_split!r}"
            else:
                rule = f"hash split, test_fraction {self.test_fraction:g}, held-out groups left out"
            parts.append(
                f"{b.batch_id}: {rule} ({b.n_trained} of {b.n_images} images trained on, "
                f"{b.n_held_out} held out, {b.n_unlabelled} unlabelled)"
            )
        text = "training side of the split protocol; " + "; ".join(parts)
        if any(b.source == "hash" for b in self.batches):
            text += f". Hash rule: {SPLIT_RULE}"
        if self.n_held_out_elsewhere:
            text += f". {self.n_held_out_elsewhere} images held out in another batch left out"
        if self.n_repeated:
            text += f". {self.n_repeated} images found in several batches trained on once"
        for why in self.left_out:
            text += f". {why}"
        return text

    def keep(self, sha256s: set[str], why: str) -> Selection:
        """The images whose sha256 is in ``sha256s``; ``why`` says what the others lacked.

        The result is checked again (classes, images per class), so dropping images can
        never leave an untrainable set behind silently.
        """
        kept = [img for img in self.images if img.sha256 in sha256s]
        dropped = len(self.images) - len(kept)
        if not dropped:
            return self
        selection = replace(
            self, images=kept, left_out=(*self.left_out, f"{dropped} images left out: {why}")
        )
        _check(selection)
        return selection


def training_set_digest(sha256s: Iterable[str]) -> str:
    """sha256 of the sorted, distinct image sha256s, one per line (newline-terminated)."""
    text = "".join(f"{s}\n" for s in sorted(set(sha256s)))
    return hashlib.sha256(text.encode()).hexdigest()


def training_side(
    records: Sequence[ImageRecord], holdout_split: str, test_fraction: float
) -> tuple[list[bool], Literal["manifest", "hash"]]:
    """For every record of one batch: is it on the training side? And where the split came from.

    Labels play no part here (the reporter assigns splits to every row, labelled or not).
    """
    if any(r.split for r in records):
        return [r.split != holdout_split for r in records], "manifest"
    units = [r.group or r.sha256 for r in records]
    held = held_out_units(units, test_fraction)
    return [u not in held for u in units], "hash"


def select_training_set(
    batches: Mapping[str, Sequence[ImageRecord]], holdout_split: str, test_fraction: float
) -> Selection:
    """The training set of ``batches`` (batch id → all its records); see the module rule.

    Raises TrainingError when nothing is left, when fewer than two classes are, when a class
    has fewer than two images, or when the same image carries two labels.
    """
    ordered = {b: sorted(batches[b], key=lambda r: r.key) for b in sorted(batches)}
    sides = {b: training_side(recs, holdout_split, test_fraction) for b, recs in ordered.items()}
    held_anywhere = {
        r.sha256
        for b, recs in ordered.items()
        for r, train in zip(recs, sides[b][0], strict=True)
        if not train
    }
    chosen: dict[str, TrainingImage] = {}
    summaries: list[BatchSide] = []
    held_elsewhere = repeated = 0
    for batch_id, records in ordered.items():
        on_train, source = sides[batch_id]
        n_unlabelled = n_trained = 0
        for record, train in zip(records, on_train, strict=True):
            if not train:
                continue
            if not record.label:
                n_unlabelled += 1
                continue
            if record.sha256 in held_anywhere:
                held_elsewhere += 1
                continue
            seen = chosen.get(record.sha256)
            if seen is not None:
                if seen.label != record.label:
                    raise TrainingError(
                        f"image {record.sha256[:12]}… is labelled {seen.label!r} in "
                        f"{seen.batch_id} ({seen.key}) and {record.label!r} in {batch_id} "
                        f"({record.key}): fix the labels before training"
                    )
                repeated += 1
                continue
            chosen[record.sha256] = TrainingImage(batch_id, record.key, record.sha256, record.label)
            n_trained += 1
        summaries.append(
            BatchSide(
                batch_id=batch_id,
                source=source,
                n_images=len(records),
                n_held_out=sum(1 for t in on_train if not t),
                n_unlabelled=n_unlabelled,
                n_trained=n_trained,
            )
        )
    selection = Selection(
        images=sorted(chosen.values(), key=lambda i: (i.batch_id, i.key)),
        batches=summaries,
        holdout_split=holdout_split,
        test_fraction=test_fraction,
        n_held_out_elsewhere=held_elsewhere,
        n_repeated=repeated,
    )
    _check(selection)
    return selection


def _check(selection: Selection) -> None:
    names = ", ".join(b.batch_id for b in selection.batches)
    if not selection.images:
        raise TrainingError(
            f"nothing to train on in {names}: no labelled image on the training side "
            f"(held-out split {selection.holdout_split!r}, test_fraction "
            f"{selection.test_fraction:g}); {selection.describe()}"
        )
    per_class = selection.images_per_class
    if len(per_class) < 2:
        raise TrainingError(
            f"only one class ({next(iter(per_class))!r}) on the training side of {names}: "
            "a retrieval specialist needs at least two classes"
        )
    small = {c: n for c, n in per_class.items() if n < MIN_PER_CLASS}
    if small:
        listed = ", ".join(f"{c!r} ({n})" for c, n in sorted(small.items()))
        raise TrainingError(
            f"classes with fewer than {MIN_PER_CLASS} training images in {names}: {listed}; "
            "label more images of them or drop them from the manifest"
        )


def read_selection(
    store: ObjectStore, batch_ids: Sequence[str], holdout_split: str, test_fraction: float
) -> Selection:
    """Read every batch's records and select the training set."""
    batches: dict[str, list[ImageRecord]] = {}
    for batch_id in dict.fromkeys(batch_ids):
        try:
            batches[batch_id] = read_records(store, batch_id)
        except StoreError:
            raise TrainingError(
                f"batch {batch_id!r} is not ingested in {store.uri} (no records)"
            ) from None
    return select_training_set(batches, holdout_split, test_fraction)
