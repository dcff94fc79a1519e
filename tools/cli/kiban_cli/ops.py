"""Operations commands: workers, the local stack, triggers and status."""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import typer
from rich.table import Table

from kiban.errors import KibanError
from kiban.messages import (
    EvaluateBatch,
    EvaluationProtocol,
    ExportReport,
    IngestBatch,
    Message,
    NightlyRun,
    ReindexModel,
    RunPlan,
)
from kiban.store import ObjectStore
from kiban_cli.common import (
    check_name,
    console,
    describe,
    fails_cleanly,
    parse_ks,
    print_json,
    settings_and_store,
    shown,
)

trigger_app = typer.Typer(
    help="Send a message to the queues (what any Celery producer can send).",
    no_args_is_help=True,
)


def register(app: typer.Typer) -> None:
    app.command()(worker)
    app.command()(up)
    app.command()(down)
    app.command()(status)
    app.add_typer(trigger_app, name="trigger")


@fails_cleanly
def worker(
    service: str = typer.Argument(..., help="ingest | encoder | indexer | reporter | beat"),
    queues: str | None = typer.Option(
        None, help="Override the queues, e.g. encode.gpu for a GPU pool."
    ),
    concurrency: int = typer.Option(1, min=1, help="Tasks at once (threads) in this process."),
    metrics_port: int | None = typer.Option(None, help="Prometheus port (default setting)."),
) -> None:
    """Start one service's Celery worker (needs KIBAN_MODE=distributed); as `kiban-worker`."""
    from kiban.worker import SERVICES, serve

    if service not in SERVICES:
        raise KibanError(f"unknown service {service[:100]!r}: choose one of {', '.join(SERVICES)}")
    names = [q.strip() for q in queues.split(",") if q.strip()] if queues else None
    serve(service, names, concurrency, metrics_port)


def _state_file(home: Path) -> Path:
    return home / "stack" / "stack.json"


@fails_cleanly
def up(
    encoders: int = typer.Option(1, min=1, help="Encoder worker processes."),
    beat: bool = typer.Option(False, help="Also start beat (needs KIBAN_SCHEDULE_*)."),
    detach: bool = typer.Option(False, help="Return after start; stop with `kiban down`."),
) -> None:
    """Start redis-server, SeaweedFS and every worker as separate local processes."""
    from kiban_cli.stack import LocalStack

    settings, _ = settings_and_store()
    home = settings.home.resolve() / "stack"
    if _state_file(settings.home.resolve()).exists():
        raise KibanError(f"a stack is already recorded in {home}; run `kiban down` first")
    stack = LocalStack(home)
    try:
        stack.start_servers()
        stack.start_worker("ingest")
        for i in range(encoders):
            stack.start_worker("encoder", f"encoder-{i}")
        stack.start_worker("indexer")
        if settings.qdrant_url:
            stack.start_worker("reporter")
        if beat:
            stack.start_worker("beat")
    except BaseException:
        stack.stop()
        raise
    stack.save_state(_state_file(settings.home.resolve()))
    env_file = home / "env.sh"
    env_file.write_text("".join(f"export {k}={v}\n" for k, v in stack.env.items()))
    env_file.chmod(0o600)  # holds the generated S3 secret: not printed, not world-readable
    console.print(f"[green]kiban stack up[/] in {shown(home)} (logs in {shown(home / 'logs')})")
    console.print(f"use it from another shell:  source {shown(env_file)}", highlight=False)
    if detach:
        return
    console.print("Ctrl-C stops everything.")
    stopping = False

    def _stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _stop)
    try:
        while not stopping:
            time.sleep(1)
            dead = [n for n, p in stack.procs.items() if not p.alive()]
            if dead:
                console.print(f"[red]stopped unexpectedly:[/] {shown(', '.join(dead))}")
                break
    except KeyboardInterrupt:
        pass
    finally:
        stack.stop()
        _state_file(settings.home.resolve()).unlink(missing_ok=True)
        console.print("kiban stack stopped")


@fails_cleanly
def down() -> None:
    """Stop the stack a detached `kiban up` started."""
    from kiban_cli.stack import stop_from_state

    settings, _ = settings_and_store()
    stopped = stop_from_state(_state_file(settings.home.resolve()))
    console.print(f"stopped: {shown(', '.join(stopped))}")


@fails_cleanly
def status(
    batch: str | None = typer.Argument(None, help="Batch ID (default: list batches)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Progress of a batch per stage and model, failures, quarantine and dead letters.

    A record that cannot be read (a corrupt batch.json, shard meta or dead letter) is shown as
    "unreadable: <reason>"; the rest of the store is listed all the same."""
    from kiban.status import batch_status, dead_letter_count, list_batches, recent_dead_letters

    if batch is not None:
        check_name(batch)
    _, store = settings_and_store()
    if batch is None:
        rows = list_batches(store)
        if as_json:
            print_json(rows)
            return
        columns = ("batch", "created", "accepted", "quarantined", "duplicates", "reports")
        table = Table(title=f"batches in {shown(store.uri)}")
        for col in columns:
            table.add_column(col, overflow="fold")
        for row in rows:
            if row.get("unreadable"):
                table.add_row(shown(row["batch"]), "[red]unreadable[/]", "–", "–", "–", "–")
            else:
                table.add_row(*(shown(row[c]) for c in columns))
        console.print(table)
        for row in rows:
            if row.get("unreadable"):
                console.print(
                    f"  [red]unreadable:[/] batches/{shown(row['batch'])}/batch.json: "
                    f"{shown(row['unreadable'])}",
                    highlight=False,
                    soft_wrap=True,
                )
        console.print(f"dead letters: {dead_letter_count(store)}")
        for letter in recent_dead_letters(store, 5):
            _print_letter(letter)
        return
    state = batch_status(store, batch)
    if as_json:
        print_json(state.model_dump(mode="json"))
        return
    if not state.ingested and not state.unreadable:
        raise KibanError(f"batch {batch!r} is not ingested (yet) in {store.uri}")
    if state.ingested:
        console.print(
            f"[bold]{shown(batch)}[/]: {state.n_accepted} accepted, "
            f"{state.n_quarantined} quarantined, {state.n_duplicates} duplicates, "
            f"{state.chunks} chunks; "
            f"reports: {shown(', '.join(state.report_versions) or 'none')}; "
            f"dead letters: {state.dead_letters}",
            soft_wrap=True,
        )
        table = Table()
        for col in ("model", "encoded", "indexed", "failed chunks", "images", "encode failures"):
            table.add_column(col, overflow="fold")
        for m in state.models:
            table.add_row(
                shown(m.model),
                f"{m.encoded}/{m.chunks}",
                f"{m.indexed}/{m.chunks}",
                str(m.failed),
                str(m.images_encoded),
                str(m.encode_failures),
            )
        console.print(table)
    else:
        console.print(
            f"[bold]{shown(batch)}[/]: reports: "
            f"{shown(', '.join(state.report_versions) or 'none')}; "
            f"dead letters: {state.dead_letters}",
            soft_wrap=True,
        )
    for problem in state.unreadable:
        console.print(f"  [red]unreadable:[/] {shown(problem)}", highlight=False, soft_wrap=True)
    for letter in recent_dead_letters(store, 5, batch):
        _print_letter(letter)


def _print_letter(letter: dict[str, object]) -> None:
    task, reason = letter.get("task", "?"), letter.get("reason", "")
    console.print(f"  [red]{shown(task)}[/]: {shown(reason)}", highlight=False, soft_wrap=True)


def _send(message: Message) -> None:
    from kiban.celery_app import configure, load_service_tasks
    from kiban.workflow import dispatch

    settings, store = settings_and_store()
    configure(settings)
    if settings.mode == "embedded":
        load_service_tasks()
        before = {info.key for info in store.list("deadletter")}
        dispatch(message, settings)
        _fail_if_dead_lettered(store, before, message)
    else:
        try:
            with _bounded_broker_waits():
                dispatch(message, settings)
        except Exception as exc:  # unreachable, wrong password, not Redis: one line
            raise KibanError(f"broker {settings.broker_url}: {describe(exc)}") from None
    print_json(message.model_dump(mode="json"))
    where = "ran in this process" if settings.mode == "embedded" else "queued"
    console.print(f"{getattr(message, 'kind', type(message).__name__)} {where}")


def _fail_if_dead_lettered(store: ObjectStore, before: set[str], message: Message) -> None:
    """Embedded, the message ran here: a stage that failed for good (not a single chunk,
    which the report states) is this command's failure, in one line."""
    from kiban.pipeline import dooms_batch
    from kiban.status import read_dead_letter

    failed = [
        read_dead_letter(store, info.key)
        for info in store.list("deadletter")
        if info.key not in before
    ]
    failed = [letter for letter in failed if dooms_batch(str(letter.get("task")))]
    if failed:
        first = failed[0]
        more = f" (and {len(failed) - 1} more dead letters)" if len(failed) > 1 else ""
        kind = getattr(message, "kind", type(message).__name__)
        raise KibanError(f"{kind} failed: {first.get('task')}: {first.get('reason')}{more}")


#: A command line sending one message waits this long for the broker, then says so.
BROKER_WAIT_SECONDS = 5


@contextlib.contextmanager
def _bounded_broker_waits() -> Iterator[None]:
    """A person at the terminal gets an answer in seconds: connecting, reading and re-trying
    the publish are bounded while this command sends (workers keep Celery's patient
    defaults); afterwards the settings are restored and those connections dropped."""
    from kiban.celery_app import app

    keys = (
        "broker_transport_options",
        "broker_connection_timeout",
        "broker_connection_max_retries",
        "task_publish_retry_policy",
    )
    saved = {key: app.conf.get(key) for key in keys}
    options = dict(saved["broker_transport_options"] or {})
    options.update(
        socket_connect_timeout=BROKER_WAIT_SECONDS,
        socket_timeout=2 * BROKER_WAIT_SECONDS,
        max_retries=1,
    )
    app.conf.update(
        broker_transport_options=options,
        broker_connection_timeout=BROKER_WAIT_SECONDS,
        broker_connection_max_retries=1,
        task_publish_retry_policy={
            "max_retries": 2,
            "interval_start": 0,
            "interval_step": 0.5,
            "interval_max": 1,
        },
    )
    try:
        yield
    finally:
        app.conf.update(saved)
        pool = getattr(app, "_pool", None)  # connections made with the short waits
        if pool is not None:
            with contextlib.suppress(Exception):
                pool.force_close_all()
            app._pool = None
        if getattr(app.amqp, "_producer_pool", None) is not None:
            app.amqp._producer_pool = None


def _models(models: str) -> list[str]:
    return [check_name(m.strip(), "name") for m in models.split(",") if m.strip()]


@trigger_app.command("ingest")
@fails_cleanly
def trigger_ingest(
    source: str = typer.Option(..., help="file:///dir or s3://bucket/prefix"),
    batch: str = typer.Option(..., help="Batch ID."),
    models: str = typer.Option("", help="Models to encode with (none: ingest only)."),
    manifest: str | None = typer.Option(None, help="Manifest URI."),
    evaluate: bool = typer.Option(True, help="Evaluate when every chunk is indexed."),
    k: str = typer.Option("1,3,5", help="k values."),
) -> None:
    """Ingest a batch and, with --models, encode, index and evaluate it."""
    check_name(batch)
    ks = parse_ks(k)
    settings, _ = settings_and_store()
    plan = RunPlan(models=_models(models), evaluate=evaluate, k=ks)
    _send(
        IngestBatch(
            batch_id=batch,
            source=source,
            manifest=manifest,
            chunk_size=settings.chunk_size,
            plan=plan,
        )
    )


@trigger_app.command("evaluate")
@fails_cleanly
def trigger_evaluate(
    batch: str = typer.Option(..., help="Batch ID."),
    models: str = typer.Option(..., help="Models, comma-separated."),
    k: str = typer.Option("1,3,5", help="k values."),
    protocol: str = typer.Option("auto", help="Evaluation protocol."),
) -> None:
    """Evaluate a batch from stored embeddings (a new report version)."""
    check_name(batch)
    _send(
        EvaluateBatch(
            batch_id=batch,
            models=_models(models),
            k=parse_ks(k),
            protocol=EvaluationProtocol(name=protocol),
        )
    )


@trigger_app.command("reindex")
@fails_cleanly
def trigger_reindex(
    model: str = typer.Option(..., help="Model whose shards to re-index."),
    batches: str = typer.Option("", help="Only these batches (default: all)."),
) -> None:
    """Re-upsert a model's stored shards into Qdrant (no re-encoding)."""
    _send(ReindexModel(model=model, batches=_models(batches)))


@trigger_app.command("export-report")
@fails_cleanly
def trigger_export_report(
    batch: str = typer.Option(..., help="Batch ID."),
    to: str = typer.Option(..., "--to", help="Destination prefix (file:// or s3://)."),
    version: str | None = typer.Option(None, help="Report version (default: latest)."),
) -> None:
    """Copy a batch's report to another prefix."""
    _send(ExportReport(batch_id=batch, report_version=version, destination=to))


@trigger_app.command("nightly")
@fails_cleanly
def trigger_nightly(
    date: str | None = typer.Option(None, help="YYYY-MM-DD (default: today, UTC)."),
) -> None:
    """What the schedule sends: ingest and evaluate the night's prefix."""
    _send(NightlyRun(date=date))


__all__ = ["register"]
