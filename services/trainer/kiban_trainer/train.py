"""``train_specialist``: select → train → export → parity → MACs → publish.

One function per mode does the training and the export (``_train_head``, ``_train_finetune``);
this module strings the steps together and owns the rules around them:

- **idempotent** — a model of that name trained by kiban the same way (mode, base, batches,
  training-set digest, seed, epochs) is returned as it is: the same message twice trains once.
  Any other model of that name is refused (names are never silently overwritten);
- **nothing half-published** — the training set (``models/<name>/training-set.json``) is
  written before the card, and the card (which makes the model visible) last; a parity check
  below ``parity.THRESHOLD_COSINE`` publishes nothing;
- **leakage** — only the training side of the split protocol is trained on (``selection``),
  and the exact images are recorded so the reporter can exclude them from queries.
"""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from kiban.context import Context
from kiban.errors import ModelNotFoundError
from kiban.messages import TrainSpecialist
from kiban.models.card import ModelCard, ParityResult, TrainingProvenance
from kiban.models.registry import (
    fetch_model,
    load_card,
    publish,
    publish_training_set,
    sha256_file,
    training_set_key,
)
from kiban.records import read_batch_info
from kiban.shards import read_meta, read_shard
from kiban_trainer import head as head_mod
from kiban_trainer.errors import TrainingError
from kiban_trainer.images import load_pixels
from kiban_trainer.provenance import device_label, library_versions, training_provenance
from kiban_trainer.selection import Selection, TrainingImage, read_selection

# Under "kiban." so the worker's log setup (kiban.telemetry.setup_logging) shows its progress.
log = logging.getLogger("kiban.trainer")

SOURCE_PREFIX = "kiban-train"
PARITY_IMAGES = 8
DEFAULT_EPOCHS = {"head": head_mod.DEFAULT_EPOCHS, "finetune": 3}


#: A head sees at least this many optimiser steps; large training sets need fewer epochs.
HEAD_STEP_BUDGET = 1000
HEAD_MIN_EPOCHS = 5


def default_epochs(mode: str, n_images: int | None = None) -> int:
    """Epochs when the message gives none.

    A head's default is 40 epochs for the small sets a team starts with, but no more than the
    epochs that make ``HEAD_STEP_BUDGET`` steps (at least ``HEAD_MIN_EPOCHS``): on 10,000
    stored embeddings 13 epochs (1,014 steps) instead of 40 (3,160): a third of the work, and
    the bench's synthetic 10k set still ends at loss 0.0018 (from 0.223).
    """
    if mode == "head" and n_images:
        steps_per_epoch = max(1, round(n_images / head_mod.HeadConfig().batch_size))
        budget = math.ceil(HEAD_STEP_BUDGET / steps_per_epoch)
        return max(HEAD_MIN_EPOCHS, min(DEFAULT_EPOCHS["head"], budget))
    return DEFAULT_EPOCHS[mode]


@dataclass
class Trained:
    """What a mode hands back: the ONNX file and the card facts that differ by mode."""

    path: Path
    selection: Selection
    base_source: str
    architecture: str
    weights: str
    input_size: int
    preprocessing: Any
    embedding_dim: int
    params: int
    opset: int
    parity: ParityResult
    objective: str
    loss_per_epoch: list[float]
    train_seconds: float
    device: str
    notes: list[str]
    input_name: str = "images"
    output_name: str = "embedding"


# ------------------------------------------------------------------ the entry point
def train_specialist(msg: TrainSpecialist, ctx: Context) -> ModelCard:
    """Train ``msg.name`` from ``msg.batches`` and publish it (or return the existing twin)."""
    started = time.perf_counter()
    selection = read_selection(ctx.store, msg.batches, msg.holdout_split, msg.test_fraction)
    epochs = msg.epochs or default_epochs(msg.mode, len(selection.images))
    existing = _existing(ctx, msg, epochs)
    if existing is not None and _same_set(existing, selection):
        log.info("model %s is already trained this way; not training again", msg.name)
        return existing
    log.info(
        "training %s (%s on %s): %d images, %s",
        msg.name,
        msg.mode,
        msg.base,
        len(selection.images),
        selection.images_per_class,
    )
    workdir = ctx.settings.home / "train"
    workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"{msg.name}-", dir=workdir) as tmp:
        out = Path(tmp) / f"{msg.name}.onnx"
        with _threads(ctx.settings.threads):
            if msg.mode == "head":
                trained = _train_head(msg, ctx, selection, epochs, out, existing)
            else:
                trained = _train_finetune(msg, ctx, selection, epochs, out, existing)
        if trained is None:  # the existing model turned out to be this very training
            assert existing is not None
            return existing
        if not trained.parity.passed:
            raise TrainingError(
                f"parity check failed for {msg.name}: min cosine "
                f"{trained.parity.min_cosine:.6f} < {trained.parity.threshold_cosine} between "
                "ONNX Runtime and the torch model; nothing was published"
            )
        card = _card(msg, trained, epochs, time.perf_counter() - started)
        publish_training_set(ctx.store, msg.name, [i.sha256 for i in trained.selection.images])
        publish(ctx.store, card, out)
    log.info(
        "published %s: %d-d, parity min cosine %.6f, %.1f s",
        msg.name,
        card.embedding_dim,
        trained.parity.min_cosine,
        time.perf_counter() - started,
    )
    return card


# ------------------------------------------------------------------ idempotence
def _existing(ctx: Context, msg: TrainSpecialist, epochs: int) -> ModelCard | None:
    """The card already under ``msg.name`` if it may be this training; refuse anything else."""
    try:
        card = load_card(ctx.store, msg.name)
    except ModelNotFoundError:
        return None
    t = card.training
    if t is None:
        raise TrainingError(
            f"model {msg.name!r} already exists and was not trained by kiban "
            f"({card.source}); choose another --name"
        )
    wanted = {
        "mode": msg.mode,
        "base": msg.base,
        "batches": sorted(dict.fromkeys(msg.batches)),
        "seed": msg.seed,
        "epochs": epochs,
    }
    found = {
        "mode": t.mode,
        "base": t.base_model,
        "batches": sorted(t.batches),
        "seed": t.seed,
        "epochs": t.epochs,
    }
    diff = [f"{k} {found[k]!r} (asked {wanted[k]!r})" for k in wanted if wanted[k] != found[k]]
    if diff:
        raise TrainingError(
            f"model {msg.name!r} already exists, trained differently: {', '.join(diff)}; "
            "choose another --name"
        )
    return card


def _same_set(card: ModelCard, selection: Selection) -> bool:
    return card.training is not None and card.training.training_set_sha256 == selection.digest


def _refuse_other_set(card: ModelCard | None, selection: Selection) -> bool:
    """After images were left out: True when ``card`` is this training (return it)."""
    if card is None:
        return False
    if _same_set(card, selection):
        return True
    raise TrainingError(
        f"model {card.name!r} already exists, trained on another image set (digest "
        f"{card.training.training_set_sha256[:12] if card.training else '?'}…, now "
        f"{selection.digest[:12]}…): the batches changed; choose another --name"
    )


@contextlib.contextmanager
def _threads(threads: int) -> Iterator[None]:
    """torch intra-op threads = KIBAN_THREADS for the duration (0: leave torch's default)."""
    import torch

    previous = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# ------------------------------------------------------------------ head
def stored_embeddings(
    ctx: Context, base: ModelCard, selection: Selection
) -> tuple[np.ndarray, Selection]:
    """The base's stored vectors of the selected images (read from shards, not images).

    Images whose chunk has no shard (a failed chunk) are left out and said so; a batch with
    no shard at all, or shards written by another file of the base model, is an error.
    """
    wanted = {img.sha256 for img in selection.images}
    found: dict[str, np.ndarray] = {}
    for side in selection.batches:
        info = read_batch_info(ctx.store, side.batch_id)
        complete = 0
        for chunk in info.chunks:
            meta = read_meta(ctx.store, base.name, side.batch_id, chunk.index)
            if meta is None:
                continue
            if meta.model_sha256 != base.sha256:
                raise TrainingError(
                    f"the stored embeddings of {side.batch_id} (chunk {chunk.index}) were made by "
                    f"another file of model {base.name!r} (sha256 {meta.model_sha256[:12]}…, the "
                    f"registry has {base.sha256[:12]}…): re-encode the batch first"
                )
            complete += 1
            shard = read_shard(ctx.store, base.name, side.batch_id, chunk.index)
            for sha, vec in zip(shard.sha256s, shard.vectors, strict=True):
                if sha in wanted and sha not in found:
                    found[sha] = vec
        if info.chunks and not complete:
            raise TrainingError(
                f"batch {side.batch_id!r} has no stored embeddings of model {base.name!r}: "
                f"encode it first (kiban run --models {base.name}, or kiban trigger ingest)"
            )
    selection = selection.keep(set(found), f"no stored embedding of {base.name}")
    vectors = np.stack([found[img.sha256] for img in selection.images]).astype(np.float32)
    return vectors, selection


def _parity_sample(images: list[TrainingImage], n: int = PARITY_IMAGES) -> list[TrainingImage]:
    """``n`` images spread over the (batch, key)-ordered training set."""
    step = max(1, len(images) // n)
    return images[::step][:n]


def _parity_source(sample: list[TrainingImage], loaded: int) -> str:
    batches = ", ".join(dict.fromkeys(i.batch_id for i in sample))
    return f"{loaded} training images of {batches}"


def _train_head(
    msg: TrainSpecialist,
    ctx: Context,
    selection: Selection,
    epochs: int,
    out: Path,
    existing: ModelCard | None,
) -> Trained | None:
    from kiban_export import parity
    from kiban_trainer.compose import compose, l2_normalise

    base = load_card(ctx.store, msg.base)
    vectors, selection = stored_embeddings(ctx, base, selection)
    if _refuse_other_set(existing, selection):
        return None
    labels = np.asarray(selection.labels(), dtype=np.int64)

    def progress(epoch: int, loss: float) -> None:
        log.info("%s: epoch %d/%d loss %.4f", msg.name, epoch, epochs, loss)

    result = head_mod.train_head(vectors, labels, epochs, msg.seed, progress=progress)
    base_path = fetch_model(ctx.store, base, ctx.cache_dir)
    compose(
        base_path,
        result.module.layers(),
        out,
        base.input_name,
        base.output_name,
        doc=f"{base.name} + kiban projection head ({result.config.describe()})",
    )
    sample = _parity_sample(selection.images)
    pixels = load_pixels(ctx, sample, base.preprocessing)
    if not len(pixels.images):
        raise TrainingError(
            "no training image could be read back for the parity check: "
            + "; ".join(f"{k}: {r}" for k, r in pixels.failures[:3])
        )
    crops = pixels.array
    while len(crops) < 3:  # parity runs batched and one by one: at least 3 in the batch
        crops = np.concatenate([crops, pixels.array])[:3]
    graph = parity.run_graph(out, crops, base.input_name)
    session = parity.ort_session(base_path)
    raw = session.run([base.output_name], {base.input_name: crops})[0]
    reference = head_mod.apply_head(result.module, l2_normalise(raw.astype(np.float32)))
    checked = parity.compare(
        graph, reference, len(pixels.images), _parity_source(sample, len(pixels.images))
    )
    head_params = head_mod.count_params(result.module)
    cfg = result.config
    return Trained(
        path=out,
        selection=selection,
        base_source=base.source,
        architecture=(
            f"{base.architecture} + projection head "
            f"({base.embedding_dim}→{cfg.hidden_dim}→{cfg.out_dim} MLP with linear skip)"
        ),
        weights=f"{base.name} ({base.weights}) + head trained by kiban",
        input_size=base.input_size,
        preprocessing=base.preprocessing,
        embedding_dim=cfg.out_dim,
        params=base.params + head_params,
        opset=head_opset(base_path),
        parity=checked,
        objective=cfg.describe(),
        loss_per_epoch=result.loss_per_epoch,
        train_seconds=result.seconds,
        device=device_label("cpu"),
        input_name=base.input_name,
        output_name=base.output_name,
        notes=[
            f"base {base.name} (sha256 {base.sha256[:12]}…, {base.params} params) + head "
            f"({head_params} params) trained on the base's stored embeddings in "
            f"{result.seconds:.1f} s; one ONNX graph: base → L2-normalise → head",
        ],
    )


def head_opset(path: Path) -> int:
    import onnx

    from kiban_trainer.compose import default_opset

    return default_opset(onnx.load(str(path), load_external_data=False))


# ------------------------------------------------------------------ finetune
def resolve_base_spec(ctx: Context, base: str) -> str:
    """The export spec to rebuild: a registry model's source, else ``base`` itself."""
    try:
        card = load_card(ctx.store, base)
    except ModelNotFoundError:
        return base
    if card.source.startswith(f"{SOURCE_PREFIX}:"):
        raise TrainingError(
            f"model {base!r} was trained by kiban ({card.source}); fine-tune its base "
            f"({card.training.base_source if card.training else '?'}) instead"
        )
    return card.source


def _train_finetune(
    msg: TrainSpecialist,
    ctx: Context,
    selection: Selection,
    epochs: int,
    out: Path,
    existing: ModelCard | None,
) -> Trained | None:
    from kiban_export.spec import parse_spec
    from kiban_trainer import finetune as ft

    spec = parse_spec(resolve_base_spec(ctx, msg.base))
    built = ft.build_base(spec)
    pixels = load_pixels(ctx, selection.images, built.preprocessing)
    selection = selection.keep(
        {i.sha256 for i in pixels.images}, "could not be read from the source"
    )
    if _refuse_other_set(existing, selection):
        return None
    for key, reason in pixels.failures:
        log.warning("%s: %s left out: %s", msg.name, key, reason)
    labels = np.asarray(selection.labels(), dtype=np.int64)
    device = ft.pick_device()

    def progress(epoch: int, loss: float) -> None:
        log.info("%s: epoch %d/%d loss %.4f", msg.name, epoch, epochs, loss)

    config = ft.FinetuneConfig()
    result = ft.finetune(
        built, pixels.array, labels, epochs, msg.seed, config, device, progress=progress
    )
    positions = np.linspace(0, len(pixels.array) - 1, num=min(PARITY_IMAGES, len(pixels.array)))
    sample = np.unique(positions.astype(int))
    crops = pixels.array[sample]
    while len(crops) < 3:
        crops = np.concatenate([crops, crops])[:3]
    checked = ft.export_finetuned(
        result,
        out,
        crops,
        f"{len(sample)} training images of " + ", ".join(b.batch_id for b in selection.batches),
    )
    params = int(sum(p.numel() for p in result.module.parameters()))
    return Trained(
        path=out,
        selection=selection,
        base_source=spec.raw,
        architecture=built.architecture,
        weights=f"fine-tuned by kiban from {built.weights}",
        input_size=built.preprocessing.crop,
        preprocessing=built.preprocessing,
        embedding_dim=result.embedding_dim,
        params=params,
        opset=ft.OPSET,
        parity=checked,
        objective=config.describe(),
        loss_per_epoch=result.loss_per_epoch,
        train_seconds=result.seconds,
        device=device_label(result.device),
        notes=[
            *built.notes,
            f"fine-tuned {epochs} epochs on {len(selection.images)} images at "
            f"{result.images_per_second:.1f} images/s",
        ],
    )


# ------------------------------------------------------------------ the card
def _card(msg: TrainSpecialist, t: Trained, epochs: int, wall: float) -> ModelCard:
    from kiban_export.macs import count_macs

    training: TrainingProvenance = training_provenance(
        msg,
        t.selection,
        base_source=t.base_source,
        objective=t.objective,
        epochs=epochs,
        loss_per_epoch=t.loss_per_epoch,
        wall_seconds=wall,
        device=t.device,
    )
    return ModelCard(
        name=msg.name,
        family="domain",
        source=f"{SOURCE_PREFIX}:{msg.mode}:{msg.base}",
        architecture=t.architecture,
        weights=t.weights,
        pretrained=True,
        input_size=t.input_size,
        preprocessing=t.preprocessing,
        embedding_dim=t.embedding_dim,
        params=t.params,
        macs_per_image=count_macs(t.path, t.input_size, t.input_name),
        file_size=t.path.stat().st_size,
        sha256=sha256_file(t.path),
        opset=t.opset,
        input_name=t.input_name,
        output_name=t.output_name,
        parity=t.parity,
        training=training,
        exported_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        exporter=library_versions(),
        notes=[
            *t.notes,
            f"training set: {training.n_images} images ({training_set_key(msg.name)}), "
            f"digest {training.training_set_sha256[:16]}…",
        ],
    )
