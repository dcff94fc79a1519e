"""``kiban train``: train a domain specialist from labelled batches, publish it, show its card.

The command sends the same ``TrainSpecialist`` message any Celery producer can send, through
``kiban.workflow.dispatch``: embedded, the in-process queue runs the trainer's task here (the
trainer extra must be installed); distributed, a trainer worker runs it and this command waits
for the card to appear in the registry (or for the task's dead letter, whose reason it prints).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import typer
from pydantic import ValidationError
from rich.markup import escape
from rich.table import Table

from kiban.errors import KibanError, ModelNotFoundError
from kiban.messages import TrainSpecialist
from kiban.models.card import ModelCard
from kiban.models.registry import load_card, training_set_key
from kiban.settings import Settings
from kiban.status import NewDeadLetters
from kiban.store import ObjectStore
from kiban_cli.common import console, fails_cleanly, settings_and_store

POLL_SECONDS = 2.0


def register(app: typer.Typer) -> None:
    app.command("train")(train)


def build_message(**fields: Any) -> TrainSpecialist:
    """The message, or one line saying which option is wrong."""
    try:
        return TrainSpecialist(**fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "message"
        option = {"batches": "--batch", "holdout_split": "--holdout-split"}.get(where, where)
        raise KibanError(f"invalid train request: {option}: {first['msg']}") from None


def matching_card(store: ObjectStore, msg: TrainSpecialist) -> ModelCard | None:
    """The registry's card for ``msg.name`` if it is this training (else None)."""
    try:
        card = load_card(store, msg.name)
    except ModelNotFoundError:
        return None
    t = card.training
    if t is None:
        return None
    same = (
        t.mode == msg.mode
        and t.base_model == msg.base
        and sorted(t.batches) == sorted(set(msg.batches))
        and t.seed == msg.seed
        and (msg.epochs is None or t.epochs == msg.epochs)
    )
    return card if same else None


class TrainLetters(NewDeadLetters):
    """Dead letters of this request's training task, each stored letter read once."""

    def __init__(self, store: ObjectStore, msg: TrainSpecialist) -> None:
        self.msg = msg
        super().__init__(store, f"deadletter/{TrainSpecialist.task}")

    def reason(self, letter: dict[str, Any]) -> str | None:
        payload = letter.get("payload")
        if isinstance(payload, dict) and payload.get("request_id") == self.msg.request_id:
            return str(letter.get("reason"))
        return None


def run_training(
    settings: Settings, store: ObjectStore, msg: TrainSpecialist, timeout: float
) -> ModelCard:
    """Dispatch ``msg`` and return the published card; KibanError with the reason if not."""
    from kiban.celery_app import configure
    from kiban.workflow import dispatch

    configure(settings)
    letters = TrainLetters(store, msg)
    if settings.mode == "embedded":
        try:
            import kiban_trainer.tasks  # noqa: F401 - registers the task this process runs
        except ImportError:
            raise KibanError(
                "the trainer is not installed here: pip install 'kiban[trainer]' "
                "(or run with KIBAN_MODE=distributed and a trainer worker)"
            ) from None
        with console.status(f"training {escape(msg.name)} ({msg.mode} on {escape(msg.base)})…"):
            dispatch(msg, settings)
        card = matching_card(store, msg)
        if card is None:
            reasons = letters.new_reasons()
            raise KibanError(
                f"training {msg.name} failed: {reasons[-1]}"
                if reasons
                else f"training {msg.name} published no card (see `kiban status`)"
            )
        return card
    dispatch(msg, settings)
    deadline = time.monotonic() + timeout
    with console.status(f"waiting for a trainer worker to publish {escape(msg.name)}…"):
        while True:
            card = matching_card(store, msg)
            if card is not None:
                return card
            reasons = letters.new_reasons()
            if reasons:
                raise KibanError(f"training {msg.name} failed: {reasons[-1]}")
            if time.monotonic() > deadline:
                raise KibanError(
                    f"no card for {msg.name} after {timeout:.0f} s; the message is queued "
                    "(is a trainer worker running? `kiban worker trainer`)"
                )
            time.sleep(POLL_SECONDS)


def _fmt_int(n: int | None) -> str:
    return "–" if n is None else f"{n:,}"


def print_card(card: ModelCard) -> None:
    """The card's summary: size, cost, parity and how it was trained."""
    t = card.training
    console.print(
        f"[bold green]{escape(card.name)}[/] published: {escape(card.architecture)}",
        highlight=False,
    )
    console.print(
        f"  {card.embedding_dim}-d embedding, {_fmt_int(card.params)} params, "
        f"{_fmt_int(card.macs_per_image)} MACs/image, {card.file_size / 1e6:.1f} MB, "
        f"source {escape(card.source)}",
        highlight=False,
    )
    if card.parity is not None:
        p = card.parity
        state = "[green]passed[/]" if p.passed else "[red]FAILED[/]"
        console.print(
            f"  parity {state}: min cosine {p.min_cosine:.6f} (≥ {p.threshold_cosine}) on "
            f"{p.images} images ({escape(p.image_source)})",
            highlight=False,
        )
    if t is None:
        return
    losses = t.loss_per_epoch
    loss = f"{losses[0]:.4f} → {losses[-1]:.4f}" if losses else "–"
    console.print(
        f"  trained ({t.mode}) on {t.n_images} images of {escape(', '.join(t.batches))}: "
        f"{t.epochs} epochs, loss {loss}, {t.wall_seconds:.1f} s on {escape(t.device)}",
        highlight=False,
    )
    console.print(f"  objective: {escape(t.objective)}", highlight=False)
    console.print(
        f"  training set: {escape(training_set_key(card.name))} "
        f"(digest {t.training_set_sha256[:16]}…); never queried by the reporter",
        highlight=False,
    )
    table = Table(title="images per class (training side)")
    table.add_column("class")
    table.add_column("images", justify="right")
    for label, n in t.images_per_class.items():
        table.add_row(escape(label), str(n))
    console.print(table)


@fails_cleanly
def train(
    batch: list[str] = typer.Option(
        ..., "--batch", help="Labelled batch to train on (repeat for several)."
    ),
    base: str = typer.Option(
        ...,
        help="head: a registry model with stored embeddings of the batches; "
        "finetune: a registry model or an export spec (e.g. torchvision:resnet18:W.pt).",
    ),
    name: str = typer.Option(..., help="Registry name of the trained model."),
    mode: str = typer.Option("head", help="head (projection on stored embeddings) | finetune."),
    epochs: int | None = typer.Option(None, help="Default: 40 head, 3 finetune."),
    seed: int = typer.Option(0, help="Seed: same seed and data, same model."),
    holdout_split: str = typer.Option(
        "test", help="Manifest split never trained on (the split protocol's queries)."
    ),
    test_fraction: float = typer.Option(
        0.2, help="Without manifest splits: share of groups held out (as the split protocol)."
    ),
    timeout: float = typer.Option(
        6 * 3600, help="Distributed: seconds to wait for the card.", min=1
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the model card as JSON."),
) -> None:
    """Train a domain specialist on the training side of labelled batches and publish it."""
    msg = build_message(
        batches=batch,
        base=base,
        name=name,
        mode=mode,
        epochs=epochs,
        seed=seed,
        holdout_split=holdout_split,
        test_fraction=test_fraction,
        request_id=uuid.uuid4().hex[:16],
    )
    settings, store = settings_and_store()
    card = run_training(settings, store, msg, timeout)
    if as_json:
        console.print_json(card.model_dump_json())
        return
    print_card(card)


__all__ = ["register", "train"]
