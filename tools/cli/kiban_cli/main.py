"""``kiban``: run batches, inspect reports and embeddings, manage models, run the demo."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import typer
from pydantic import ValidationError

from kiban.errors import KibanError
from kiban.messages import EvaluationProtocol
from kiban.records import latest_report_version, read_batch_info, read_records, report_prefix
from kiban.shards import is_complete, read_shard
from kiban.telemetry import redact
from kiban_cli import deadletter as deadletter_cli
from kiban_cli import models as models_cli
from kiban_cli import ops
from kiban_cli import train as train_cli
from kiban_cli.common import (
    OneLineErrors,
    check_name,
    check_vector_server,
    console,
    fails_cleanly,
    parse_ks,
    print_json,
    print_text,
    settings_and_store,
)
from kiban_cli.progress import run_with_progress
from kiban_cli.report_html import write_report_html
from kiban_cli.report_view import print_report

app = typer.Typer(
    cls=OneLineErrors,
    help="kiban: is the foundation model worth it on our images? Embed, index, evaluate.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(models_cli.app, name="models")
report_app = typer.Typer(help="Show evaluation reports.", no_args_is_help=True)
embeddings_app = typer.Typer(help="Export stored embeddings.", no_args_is_help=True)
app.add_typer(report_app, name="report")
ops.register(app)
deadletter_cli.register(app)
train_cli.register(app)
app.add_typer(embeddings_app, name="embeddings")


def _split_models(models: str) -> list[str]:
    names = [m.strip() for m in models.split(",") if m.strip()]
    if not names:
        raise KibanError("--models needs at least one model name")
    return [check_name(name, "model name") for name in names]


PROTOCOL_HELP = "auto | leave-one-out | leave-one-group-out | split | cross-batch"
VOLUME_HELP = (
    "Images a night, for the cost projection (hours, price per night and month); "
    "default KIBAN_VOLUME_IMAGES_PER_NIGHT."
)


@app.command()
@fails_cleanly
def run(
    source: str = typer.Option(
        ...,
        help="Images: file:///dir, s3://bucket/prefix or synthetic://textures?n=N (load tests).",
    ),
    models: str = typer.Option(..., help="Comma-separated registry names, e.g. a,b."),
    manifest: str | None = typer.Option(
        None, help="CSV/JSONL manifest URI (key,label[,group][,split])."
    ),
    batch: str | None = typer.Option(None, help="Batch ID (default: derived from the source)."),
    k: str = typer.Option("1,3,5", help="k values for MV@k / acc@k."),
    protocol: str = typer.Option("auto", help=PROTOCOL_HELP),
    query_sample: int | None = typer.Option(None, help="Evaluate a stratified query sample."),
    volume: int | None = typer.Option(
        None, "--volume", min=1, metavar="IMAGES_PER_NIGHT", help=VOLUME_HELP
    ),
) -> None:
    """Ingest a source, encode it with each model, index, evaluate, print the report."""
    names, ks = _split_models(models), parse_ks(k)
    proto = _protocol(protocol, query_sample=query_sample)
    if batch is not None:
        check_name(batch)
    settings, store = settings_and_store()
    check_vector_server(settings)
    report = run_with_progress(
        settings=settings,
        source=source,
        models=names,
        manifest=manifest,
        batch_id=batch,
        ks=ks,
        protocol=proto,
        volume_images_per_night=volume,
    )
    print_report(store, report["batch_id"], report["version"], volume)


def _protocol(name: str, **fields: object) -> EvaluationProtocol:
    try:
        return EvaluationProtocol(name=name, **{k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise KibanError(f"invalid protocol options: {where}: {first['msg']}") from None


@app.command()
@fails_cleanly
def evaluate(
    batch: str = typer.Option(..., help="Batch ID (already run)."),
    models: str | None = typer.Option(None, help="Models (default: all encoded for the batch)."),
    k: str = typer.Option("1,3,5", help="k values."),
    protocol: str = typer.Option("auto", help=PROTOCOL_HELP),
    query_split: str | None = typer.Option(None, help="split: the query split (default test)."),
    history: str | None = typer.Option(
        None, help="cross-batch: comma-separated earlier batches (default: all earlier)."
    ),
    query_sample: int | None = typer.Option(None, help="Stratified, seeded query sample size."),
    bootstrap: int | None = typer.Option(None, help="Bootstrap resamples (default 1000)."),
    seed: int | None = typer.Option(None, help="Seed for sampling and bootstrap (default 0)."),
    ann_check: int | None = typer.Option(
        None, help="Queries for the Qdrant-vs-exact check (default 200, 0 = off)."
    ),
    volume: int | None = typer.Option(
        None, "--volume", min=1, metavar="IMAGES_PER_NIGHT", help=VOLUME_HELP
    ),
) -> None:
    """Re-evaluate a batch from stored embeddings; writes a new report version, keeps old ones."""
    from kiban.pipeline import evaluate_stored
    from kiban.status import batch_status

    check_name(batch)
    ks = parse_ks(k)
    proto = _protocol(
        protocol,
        query_split=query_split,
        query_sample=query_sample,
        bootstrap=bootstrap,
        seed=seed,
        ann_check_queries=ann_check,
        history_batches=[h.strip() for h in history.split(",")] if history else None,
    )
    settings, store = settings_and_store()
    check_vector_server(settings)
    names = (
        _split_models(models)
        if models
        else [m.model for m in batch_status(store, batch, detailed=False).models]
    )
    if not names:
        raise KibanError(f"batch {batch!r} has no stored embeddings")
    report = evaluate_stored(settings, batch, names, ks, proto, volume_images_per_night=volume)
    print_report(store, report["batch_id"], report["version"])


@report_app.command("show")
@fails_cleanly
def report_show(
    batch: str = typer.Argument(..., help="Batch ID."),
    version: str | None = typer.Option(None, help="Report version (default: latest)."),
    as_json: bool = typer.Option(False, "--json", help="Print the JSON report."),
    as_html: bool = typer.Option(
        False, "--html", help="Write the self-contained HTML report and print its path."
    ),
    out: Path | None = typer.Option(
        None, "--out", help="Where --html writes (default <KIBAN_HOME>/reports/BATCH-VERSION.html)."
    ),
    markdown: bool = typer.Option(False, "--markdown", help="Print the full Markdown report."),
    volume: int | None = typer.Option(
        None,
        "--volume",
        min=1,
        metavar="IMAGES_PER_NIGHT",
        help="Recompute the cost projection for this many images a night from the stored "
        "throughput (no re-evaluation).",
    ),
) -> None:
    """Show a batch's evaluation report (the newest version unless --version)."""
    check_name(batch)
    if version is not None and not (version.isdigit() and len(version) == 4):
        raise KibanError(f"--version must be four digits such as 0001, got {version[:50]!r}")
    settings, store = settings_and_store()
    version = version or latest_report_version(store, batch)
    if version is None:
        raise KibanError(f"no report for batch {batch!r} in {store.uri}")
    prefix = f"{report_prefix(batch)}/{version}"
    if as_html or out is not None:
        path = write_report_html(store, batch, version, out, settings.home)
        print_text(path)
    elif as_json:
        print_json(json.loads(store.get(f"{prefix}/report.json")))
    elif markdown:  # rendered escaped (kiban_reporter.markdown); controls shown all the same
        print_text(store.get(f"{prefix}/report.md").decode(errors="replace"), keep="\n")
    else:
        print_report(store, batch, version, volume)


@embeddings_app.command("export")
@fails_cleanly
def embeddings_export(
    batch: str = typer.Option(..., help="Batch ID."),
    model: str = typer.Option(..., help="Model name."),
    out: Path = typer.Option(..., help="Output .npz (arrays ids, vectors, labels, groups)."),
) -> None:
    """Write a batch's stored embeddings for one model to an .npz, to check results elsewhere."""
    check_name(batch)
    check_name(model, "model name")
    _, store = settings_and_store()
    info = read_batch_info(store, batch)
    by_key = {r.key: r for r in read_records(store, batch)}
    ids: list[str] = []
    keys: list[str] = []
    parts = []
    for chunk in info.chunks:
        if not is_complete(store, model, batch, chunk.index):
            raise KibanError(
                f"batch {batch!r} has no embeddings for model {model!r} (chunk {chunk.index})"
            )
        shard = read_shard(store, model, batch, chunk.index)
        ids.extend(shard.sha256s)
        keys.extend(shard.keys)
        parts.append(shard.vectors)
    vectors = np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
    labels = [by_key[k].label or "" for k in keys]
    groups = [by_key[k].group or "" for k in keys]
    try:  # exactly the path asked for (np.savez on a name would append .npz), or one line
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("wb") as fh:
            np.savez(
                fh,
                ids=np.asarray(ids),
                keys=np.asarray(keys),
                vectors=vectors,
                labels=np.asarray(labels),
                groups=np.asarray(groups),
            )
    except OSError as exc:
        raise KibanError(f"cannot write {out}: {exc.strerror or exc}") from None
    dim = vectors.shape[1] if vectors.size else 0
    print_text(f"wrote {len(ids)} × {dim} vectors to {out}")


@app.command()
@fails_cleanly
def settings(
    markdown: bool = typer.Option(False, "--markdown", help="Print the documentation table."),
) -> None:
    """Print the effective settings (secrets masked), or the table of all settings."""
    if markdown:
        from kiban.settings import settings_table

        console.print(settings_table(), markup=False, highlight=False, soft_wrap=True)
        return
    s, _ = settings_and_store()
    data = json.loads(s.model_dump_json())  # SecretStr fields dump as '**********'
    data["resolved_store_uri"] = s.resolved_store_uri
    print_json(_redacted(data))  # credentials in any URL (store, S3, Qdrant, broker) masked


def _redacted(value: object) -> object:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, list):
        return [_redacted(v) for v in value]
    if isinstance(value, dict):
        return {k: _redacted(v) for k, v in value.items()}
    return value


@app.command()
@fails_cleanly
def demo(
    per_class: int = typer.Option(80, help="Synthetic images per class (6 classes)."),
    models: str = typer.Option(
        "effnet-lite0,vit-b-32-random", help="Models to compare (exported if missing)."
    ),
) -> None:
    """Generate a synthetic labelled texture set, export two encoders, run, print the report."""
    from kiban_cli.demo import run_demo

    run_demo(per_class=per_class, models=_split_models(models))


if __name__ == "__main__":
    app()
