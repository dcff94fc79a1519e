"""``kiban models``: export encoders to ONNX with a model card, list them."""

from __future__ import annotations

import tempfile
from pathlib import Path

import typer
from rich.table import Table

from kiban.errors import KibanError
from kiban.models.card import ModelCard
from kiban.models.registry import list_cards, load_card, publish
from kiban.settings import Settings
from kiban.store import ObjectStore
from kiban_cli.common import (
    check_name,
    console,
    fails_cleanly,
    print_json,
    settings_and_store,
    shown,
)

app = typer.Typer(help="Export, list and inspect encoders in the model registry.")


def _parity_images(source: str | None, n: int) -> tuple[list, str]:
    """Real images for the parity check: from a folder/bucket if given, else synthetic."""
    from kiban.imaging import SUPPORTED_SUFFIXES, ImageRejected, decode_image

    if source is None:
        from kiban_cli.synthetic import sample_images

        return sample_images(n=n, seed=0), "synthetic textures (kiban_cli.synthetic)"
    from kiban.settings import get_settings
    from kiban.store import open_store

    settings = get_settings()
    store = open_store(source, settings.s3_endpoint_url, settings.s3_region)
    images = []
    for info in store.list():
        if info.key.lower().endswith(SUPPORTED_SUFFIXES):
            try:
                images.append(decode_image(store.get(info.key)))
            except ImageRejected:
                continue
            if len(images) >= n:
                break
    if not images:
        raise KibanError(f"no readable images under {source} for the parity check")
    return images, source


def export_and_publish(
    store,
    spec: str,
    name: str,
    family: str | None,
    images: list,
    image_source: str,
    allow_parity_failure: bool = False,
    **export_options: object,
) -> ModelCard:
    """Export in a scratch directory, refuse a failed parity check, publish to the registry."""
    from kiban_export import export_model

    with tempfile.TemporaryDirectory(prefix="kiban-export-") as tmp:
        with console.status(f"exporting {shown(name)} from {shown(spec)} …"):
            card, path = export_model(
                spec,
                name,
                family,
                Path(tmp),
                images,
                parity_source=image_source,
                **export_options,  # type: ignore[arg-type]
            )
        if card.parity is not None and not card.parity.passed and not allow_parity_failure:
            raise KibanError(
                f"parity check failed for {name}: min cosine {card.parity.min_cosine:.6f} "
                f"< {card.parity.threshold_cosine}; not published (use --allow-parity-failure)"
            )
        publish(store, card, path)
    return card


@app.command("export")
@fails_cleanly
def export(
    spec: str = typer.Argument(
        ...,
        help="efficientnet-lite0 | open_clip:ARCH[:PRETRAINED_OR_CKPT] | "
        "torchvision:NAME[:WEIGHTS.pth] | timm:NAME[:WEIGHTS] | onnx:PATH",
    ),
    name: str = typer.Option(..., "--name", help="Registry name (letters, digits, . _ -)."),
    family: str | None = typer.Option(
        None, "--family", help="foundation | domain (default: foundation for open_clip)."
    ),
    parity_source: str | None = typer.Option(
        None, "--parity-source", help="file:// or s3:// prefix with real images for parity."
    ),
    parity_images: int = typer.Option(8, "--parity-images", min=2, help="Images for parity."),
    opset: int = typer.Option(17, "--opset", help="ONNX opset."),
    input_size: int | None = typer.Option(None, help="onnx: input side in pixels."),
    mean: str | None = typer.Option(None, help="onnx: per-channel mean, e.g. 0.485,0.456,0.406"),
    std: str | None = typer.Option(None, help="onnx: per-channel std, e.g. 0.229,0.224,0.225"),
    layout: str = typer.Option("NCHW", help="onnx: input layout NCHW | NHWC."),
    input_dtype: str = typer.Option("float32", help="onnx: input dtype float32 | uint8."),
    allow_parity_failure: bool = typer.Option(
        False, help="Publish even if the ONNX model disagrees with the source model."
    ),
    fuse: bool = typer.Option(
        True, help="ViT family: keep ONNX Runtime's fused graph if it holds parity and is faster."
    ),
    precision: str = typer.Option(
        "fp32",
        "--precision",
        help="fp32 | int8 (CPU) | fp16 (GPU providers): int8/fp16 also publish the variant "
        "NAME-int8 / NAME-fp16 of the fp32 export NAME (as `models quantize` does).",
    ),
    calibration: str | None = typer.Option(
        None, "--calibration", help="int8/fp16: stored batch whose images calibrate and validate."
    ),
    variant_images: int = typer.Option(
        64, "--variant-images", min=4, help="int8/fp16: calibration + validation images."
    ),
    mode: str = typer.Option("auto", "--mode", help="int8: auto | dynamic | static."),
) -> None:
    """Export an encoder to ONNX (uint8 NHWC in, embedding out), check parity, publish it.

    With --precision int8|fp16 the fp32 export is published as NAME (the variant's parent)
    and the variant as NAME-int8 / NAME-fp16; the JSON printed is then
    {"parent": card, "variant": card}."""
    from kiban_export import OnnxOptions

    if family not in (None, "foundation", "domain"):
        raise KibanError(f"--family must be foundation or domain, not {family!r}")
    check_name(name, "model name")
    if precision not in ("fp32", "int8", "fp16"):
        raise KibanError(f"--precision must be one of fp32, int8, fp16, not {precision!r}")
    settings, store = settings_and_store()
    variant_name = None
    if precision == "fp32":
        if calibration is not None:
            raise KibanError("--calibration applies to --precision int8 or fp16, not fp32")
    else:
        variant_name = variant_name_for(name, precision)
        check_name(variant_name, "model name")
        check_variant_request(store, precision, mode, calibration, option="--precision")
    options = None
    if spec.startswith("onnx:"):
        if input_size is None or mean is None or std is None:
            raise KibanError("onnx: specs need --input-size, --mean and --std")
        options = OnnxOptions(
            input_size=input_size,
            mean=[float(v) for v in mean.split(",")],
            std=[float(v) for v in std.split(",")],
            layout=layout,
            input_dtype=input_dtype,
        )
    images, image_source = _parity_images(parity_source, parity_images)
    card = export_and_publish(
        store,
        spec,
        name,
        family,
        images,
        image_source,
        opset=opset,
        onnx_options=options,
        allow_parity_failure=allow_parity_failure,
        fuse=fuse,
    )
    variant = None
    if variant_name is not None:
        variant = publish_variant(
            settings, store, card, variant_name, precision, calibration, variant_images, mode
        )
        print_json(
            {"parent": card.model_dump(mode="json"), "variant": variant.model_dump(mode="json")}
        )
    else:
        print_json(card.model_dump(mode="json"))
    parity = card.parity
    console.print(
        f"[green]published[/] {shown(card.name)} ({shown(card.family)}, {card.embedding_dim}-d, "
        f"{card.params / 1e6:.1f}M params, weights: {shown(card.weights)})"
        + (f"; parity min cosine {parity.min_cosine:.6f}" if parity else "")
    )
    if variant is not None:
        report_variant(variant)


@app.command("list")
@fails_cleanly
def list_models() -> None:
    """List the models in the registry with their cards' key facts."""
    _, store = settings_and_store()
    table = Table(title=f"models in {shown(store.uri)}")
    for col in ("name", "family", "source", "weights", "dim", "params (M)", "MB", "parity cos"):
        table.add_column(col, overflow="fold")
    for card in list_cards(store):
        table.add_row(
            shown(card.name),
            shown(card.family),
            shown(card.source),
            shown(card.weights),
            str(card.embedding_dim),
            f"{card.params / 1e6:.1f}",
            f"{card.file_size / 1e6:.1f}",
            f"{card.parity.min_cosine:.5f}" if card.parity else "-",
        )
    console.print(table)


@app.command("show")
@fails_cleanly
def show(name: str) -> None:
    """Print a model's card as JSON."""
    check_name(name, "model name")
    _, store = settings_and_store()
    print_json(load_card(store, name).model_dump(mode="json"))


@app.command("quantize")
@fails_cleanly
def quantize(
    name: str = typer.Argument(..., help="Registry name of the parent model."),
    to: str = typer.Option("int8", "--to", help="int8 (CPU) | fp16 (GPU providers)."),
    new_name: str | None = typer.Option(None, "--name", help="Variant name (default NAME-TO)."),
    calibration: str | None = typer.Option(
        None, "--calibration", help="Stored batch whose images calibrate and validate."
    ),
    images: int = typer.Option(64, "--images", min=4, help="Calibration + validation images."),
    mode: str = typer.Option("auto", "--mode", help="auto | dynamic | static (int8)."),
) -> None:
    """Publish an int8/fp16 variant: parity, neighbour overlap and speed-up on its card."""
    check_name(name, "model name")
    variant_name = new_name or variant_name_for(name, to)
    check_name(variant_name, "model name")
    settings, store = settings_and_store()
    check_variant_request(store, to, mode, calibration)
    card = publish_variant(settings, store, load_card(store, name), variant_name, to, calibration,
                           images, mode)  # fmt: skip
    print_json(card.model_dump(mode="json"))
    report_variant(card)


def variant_name_for(name: str, precision: str) -> str:
    """The registry name of a precision variant: ``NAME-<precision>`` (e.g. ``vit-b-32-int8``),
    the same for ``models quantize`` and ``models export --precision``."""
    return f"{name}-{precision}"


def check_variant_request(
    store: ObjectStore, to: str, mode: str, calibration: str | None, option: str = "--to"
) -> None:
    """Refuse a bad precision, mode or calibration batch before any slow work starts."""
    from kiban.records import read_batch_info
    from kiban_export.variants import MODES, PRECISIONS

    if to not in PRECISIONS:
        raise KibanError(f"{option} must be one of {', '.join(PRECISIONS)}, not {to!r}")
    if mode not in MODES:
        raise KibanError(f"--mode must be one of {', '.join(MODES)}, not {mode!r}")
    if calibration is not None:
        check_name(calibration, "batch")
        try:
            read_batch_info(store, calibration)
        except Exception as exc:  # noqa: BLE001 - any store failure means "not usable"
            raise KibanError(f"--calibration batch {calibration!r} is not in the store") from exc


def publish_variant(
    settings: Settings,
    store: ObjectStore,
    parent: ModelCard,
    variant_name: str,
    to: str,
    calibration: str | None,
    images: int,
    mode: str,
) -> ModelCard:
    """Quantise / cast a registered parent and publish the variant (the one code path of
    ``models quantize`` and ``models export --precision``)."""
    from kiban.context import Context
    from kiban.models.registry import fetch_model
    from kiban.records import read_batch_info
    from kiban_export.variants import as_crops, batch_calibration, quantize_model, validation_split

    if calibration is not None:
        source = Context(settings, store).open_source(read_batch_info(store, calibration).source)
        crops = batch_calibration(store, source, calibration, images, parent.preprocessing)
    else:
        from kiban_cli.synthetic import sample_images

        crops = as_crops(sample_images(n=images, seed=0), parent.preprocessing)
    cal, val = validation_split(crops, len(crops.crops) // 2)
    with tempfile.TemporaryDirectory(prefix="kiban-quantize-") as tmp:
        parent_path = fetch_model(store, parent, settings.home / "cache" / "models")
        with console.status(f"quantizing {shown(parent.name)} to {shown(to)} …"):
            card, path = quantize_model(
                parent,
                parent_path,
                variant_name,
                Path(tmp),
                to,
                cal,
                val,
                mode=mode,
                min_overlap=settings.variant_min_overlap,
                threads=settings.threads or None,
            )
        publish(store, card, path)
    return card


def report_variant(card: ModelCard) -> None:
    """The variant's warnings, then one line with its speed-up and retrieval parity."""
    info = card.variant
    assert info is not None
    for warning in info.warnings:
        console.print(f"[yellow]warning:[/] {shown(warning)}")
    console.print(
        f"[green]published[/] {shown(card.name)} ({info.precision} {info.mode} of "
        f"{shown(info.parent)}): {info.speedup:.2f}× its img/s, top-{info.neighbour_k} "
        f"neighbour overlap {info.neighbour_overlap:.3f}, min cosine {info.min_cosine:.5f}"
    )
