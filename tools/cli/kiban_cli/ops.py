"""Operations commands: workers, the local stack, triggers and status."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

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
    bounded_broker_waits,
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
    """Where `kiban up` records its stack: under the KIBAN_HOME it was started with, which is
    also the KIBAN_HOME its env file exports, so `kiban down` and `kiban status` find it from
    the directory `kiban up` ran in and from any shell that sourced the env file."""
    return home / "stack" / "stack.json"


def _read_state(path: Path) -> dict[str, Any] | None:
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def _stack_running(state: dict[str, Any]) -> bool:
    from kiban.status import pid_running

    pids = [state.get("supervisor_pid"), *(state.get("pids") or {}).values()]
    return any(pid_running(pid) for pid in pids)


#: How long `kiban up --detach` waits for the stack it started in the background.
DETACH_WAIT_SECONDS = 180


@fails_cleanly
def up(
    encoders: int = typer.Option(1, min=1, help="Encoder worker processes."),
    beat: bool = typer.Option(False, help="Also start beat (needs KIBAN_SCHEDULE_*)."),
    detach: bool = typer.Option(
        False, help="Run the supervised stack in the background; stop it with `kiban down`."
    ),
) -> None:
    """Start redis-server, SeaweedFS and every worker as separate local processes, and keep
    them running: a process that dies is restarted with backoff (each restart logged)."""
    settings, _ = settings_and_store()
    root = settings.home.resolve()
    state_file = _state_file(root)
    if state_file.exists():
        state = _read_state(state_file)
        if state is not None and _stack_running(state):
            raise KibanError(
                f"a stack is already recorded in {root / 'stack'}; run `kiban down` first"
            )
        state_file.unlink(missing_ok=True)  # left by a stack that is gone: start afresh
    if detach:
        _up_detached(root, encoders, beat)
        return
    _up_supervised(settings, root, encoders, beat)


def _up_supervised(settings: Any, root: Path, encoders: int, beat: bool) -> None:
    from kiban.worker import SERVICES
    from kiban_cli.stack import LocalStack

    home = root / "stack"
    state_file = _state_file(root)
    env_file = home / "env.sh"
    stack = LocalStack(home, client_home=root)
    events_log = home / "logs" / "supervisor.log"
    stopping = False

    def _stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        stack.start_servers()
        stack.start_worker("ingest")
        for i in range(encoders):
            stack.start_worker("encoder", f"encoder-{i}")
        stack.start_worker("indexer")
        if settings.qdrant_url:
            stack.start_worker("reporter")
        if "exporter" in SERVICES:  # every queue's depth, for the metrics
            stack.start_worker("exporter")
        if beat:
            stack.start_worker("beat")

        def on_event(lines: list[str]) -> None:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            with contextlib.suppress(OSError), events_log.open("a") as log:
                log.writelines(f"{stamp} {line}\n" for line in lines)
            for line in lines:
                console.print(f"[yellow]supervisor:[/] {shown(line)}", highlight=False)
            with contextlib.suppress(OSError):
                stack.save_state(state_file)

        stack.supervise(on_event=on_event)
        stack.save_state(state_file)
        _write_env_file(env_file, stack.env, stack.state())
        _print_up(stack.state(), home, env_file, settings.metrics_host)
        console.print("Ctrl-C (or `kiban down`) stops everything.")
        while not stopping:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        stack.stop()
        state_file.unlink(missing_ok=True)
        env_file.unlink(missing_ok=True)
        signal.signal(signal.SIGTERM, previous)
        console.print("kiban stack stopped")


def _up_detached(root: Path, encoders: int, beat: bool) -> None:
    """The same supervised `kiban up`, as a background process of its own session."""
    logs = root / "stack" / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / "kiban-up.log"
    argv = [sys.executable, "-m", "kiban_cli.main", "up", "--encoders", str(encoders)]
    argv += ["--beat"] if beat else []
    with log_path.open("ab") as log:
        child = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "KIBAN_HOME": str(root)},
        )
    state_file = _state_file(root)
    deadline = time.monotonic() + DETACH_WAIT_SECONDS
    while time.monotonic() < deadline:
        state = _read_state(state_file) if state_file.exists() else None
        if state is not None and state.get("supervisor_pid") == child.pid:
            env_file = root / "stack" / "env.sh"
            for _ in range(50):  # written right after the record
                if env_file.exists():
                    break
                time.sleep(0.1)
            _print_up(state, root / "stack", env_file, None)
            console.print(f"running in the background (pid {child.pid}, log {shown(log_path)})")
            return
        if child.poll() is not None:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
            raise KibanError(f"kiban up failed: {' | '.join(tail) or 'no output'}")
        time.sleep(0.3)
    with contextlib.suppress(ProcessLookupError):
        os.kill(child.pid, signal.SIGTERM)
    raise KibanError(f"the stack did not come up within {DETACH_WAIT_SECONDS}s (log {log_path})")


def _metrics_address(host: str | None, port: object) -> str:
    if not host or host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    return f"{host}:{port}"


def _write_env_file(path: Path, env: dict[str, str], state: dict[str, Any]) -> None:
    """``export`` lines for clients (KIBAN_HOME included: `kiban down` finds the record from
    it) and each worker's metrics address as a comment."""
    from kiban_cli.stack import write_private

    lines = ["# written by `kiban up`; `source` it to use the stack, `kiban down` stops it\n"]
    for name, port in sorted((state.get("metrics_ports") or {}).items()):
        lines.append(f"# metrics {name} http://{_metrics_address(None, port)}/metrics\n")
    lines += [f"export {key}={shlex.quote(value)}\n" for key, value in env.items()]
    write_private(path, "".join(lines))  # holds the generated S3 secret: owner only


def _print_up(state: dict[str, Any], home: Path, env_file: Path, metrics_host: str | None) -> None:
    console.print(f"[green]kiban stack up[/] in {shown(home)} (logs in {shown(home / 'logs')})")
    table = Table(box=None)
    for col in ("process", "pid", "metrics"):
        table.add_column(col)
    procs = state.get("procs") or {}
    for name, proc in procs.items():
        port = proc.get("metrics_port") if isinstance(proc, dict) else None
        where = _metrics_address(metrics_host, port) if port else "–"
        table.add_row(shown(name), shown(proc.get("pid", "?")), shown(where))
    console.print(table)
    console.print(f"use it from another shell:  source {shown(env_file)}", highlight=False)


@fails_cleanly
def down() -> None:
    """Stop the stack `kiban up` started (from its directory, or a shell that sourced its
    env file): the supervisor first, so nothing is restarted, then every process."""
    from kiban_cli.stack import stop_from_state

    settings, _ = settings_and_store()
    stopped = stop_from_state(_state_file(settings.home.resolve()))
    console.print(f"stopped: {shown(', '.join(stopped))}")


@fails_cleanly
def status(
    batch: str | None = typer.Argument(None, help="Batch ID (default: list batches)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    live: bool = typer.Option(
        False,
        "--live",
        help="Only the live view: workers, work in flight, queue depths, batches in progress "
        "(with --json one object).",
    ),
) -> None:
    """Workers, work in flight, queues and dead letters, then the batches; or one batch's
    progress per stage and model, failures, quarantine and dead letters.

    Without a batch: in distributed mode which workers are alive (heartbeats, Celery's ping,
    and the processes `kiban up` started), what each is running, each queue's depth (all
    priorities, the dead-letter queue too) and the progress of the batches in flight; then
    every batch. `--json` prints the batch list (as before); `--live --json` the live view.
    A record that cannot be read (a corrupt batch.json, shard meta or dead letter) is shown as
    "unreadable: <reason>"; the rest of the store is listed all the same."""
    from kiban.status import batch_status, dead_letter_count, list_batches, recent_dead_letters

    if batch is not None:
        check_name(batch)
    settings, store = settings_and_store()
    if batch is None:
        if live:
            view = _live(settings, store, [])
            if as_json:
                print_json(view.model_dump(mode="json"))
            else:
                _print_live(view)
            return
        rows = list_batches(store)
        if as_json:
            print_json(rows)
            return
        unfinished = [str(r["batch"]) for r in rows if not r.get("unreadable") and not r["reports"]]
        _print_live(_live(settings, store, unfinished[-3:]))
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


def _live(settings: Any, store: ObjectStore, unfinished: list[str]) -> Any:
    from kiban.status import live_status

    if settings.mode != "distributed":
        return live_status(settings)
    recorded = _read_state(_state_file(settings.home.resolve()))
    with bounded_broker_waits():  # the ping must not wait for a broker that went away
        return live_status(settings, store, recorded, unfinished)


_STATE_STYLE = {"alive": "green", "not answering": "yellow", "dead": "red"}


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if seconds < 120:
        return f"{seconds:.0f}s"
    return f"{seconds / 60:.0f}m" if seconds < 7200 else f"{seconds / 3600:.1f}h"


def _work(item: Any) -> str:
    parts = [f"{k} {item_value}" for k, item_value in
             (("batch", item.batch), ("model", item.model), ("chunk", item.chunk))
             if item_value is not None]  # fmt: skip
    return shown(" ".join(parts) or "–")


def _print_live(view: Any) -> None:
    """The on-call view (``kiban.status.LiveStatus``) for a terminal."""
    from kiban.liveness import redelivery_bound

    if view.mode != "distributed":
        console.print(f"{shown(view.mode)} mode: {shown(view.problem)}", highlight=False)
        return
    bound = redelivery_bound(view.visibility_timeout or 0)
    console.print(
        f"broker {shown(view.broker)}: "
        + ("[green]reachable[/]" if view.reachable else "[red]unreachable[/]")
        + f"; a dead worker's task is back on its queue within {bound:.0f}s",
        highlight=False,
        soft_wrap=True,
    )
    if view.problem:
        console.print(f"  [red]{shown(view.problem)}[/]", highlight=False, soft_wrap=True)
    counts: dict[str, int] = {}
    for w in view.workers:
        counts[w.state] = counts.get(w.state, 0) + 1
    summary = ", ".join(f"{n} {state}" for state, n in counts.items()) or "none"
    table = Table(title=f"workers: {shown(summary)}", title_justify="left")
    for col in ("worker", "state", "pid", "queues", "metrics", "running", "restarts"):
        table.add_column(col, overflow="fold")
    for w in view.workers:
        style = _STATE_STYLE.get(w.state, "white")
        state = w.state
        if w.state == "alive" and not w.answers_ping:
            state += " (busy)" if w.tasks else " (no ping)"
        running = "; ".join(f"{shown(t.task)} {_work(t)} {_age(t.seconds)}" for t in w.tasks)
        restarts = str(w.restarts) if w.restarts else "–"
        if w.last_exit:
            restarts += f" (last: {shown(w.last_exit)})"
        if w.crash_loop:
            restarts += " [red]crash loop[/]"
        name = w.name or w.node or "?"
        if w.name and w.node:
            name = f"{w.name} ({w.node})"
        table.add_row(
            shown(name),
            f"[{style}]{shown(state)}[/]",
            shown(w.pid if w.pid is not None else "–"),
            shown(",".join(w.queues) or "–"),
            shown(w.metrics or "–"),
            running or "–",
            restarts,
        )
    console.print(table)
    if view.processes:
        console.print(
            "processes: " + ", ".join(f"{shown(n)} {shown(s)}" for n, s in view.processes.items()),
            highlight=False,
        )
    waiting = [f for f in view.in_flight if f.state != "running"]
    if waiting:
        console.print("in flight, not running:", highlight=False)
        for f in waiting:
            where = f"held by {shown(f.worker)}" if f.worker else "[red]orphaned[/]"
            when = (
                f", back on its queue in {_age(f.redelivery_in)}"
                if f.redelivery_in is not None
                else ""
            )
            console.print(f"  {shown(f.task)} {_work(f)}: {where}{when}", highlight=False)
    if view.queues:
        console.print(
            "queues: " + ", ".join(f"{shown(q.queue)} {q.waiting}" for q in view.queues),
            highlight=False,
        )
    if view.running_batches:
        table = Table(title="batches in progress", title_justify="left")
        for col in ("batch", "model", "encoded", "indexed", "failed chunks"):
            table.add_column(col, overflow="fold")
        for b in view.running_batches:
            for m in b.models or []:
                table.add_row(
                    shown(b.batch_id),
                    shown(m.model),
                    f"{m.encoded}/{m.chunks}",
                    f"{m.indexed}/{m.chunks}",
                    str(m.failed),
                )
            if not b.models:
                table.add_row(shown(b.batch_id), "–", "–", "–", "–")
        console.print(table)


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
            with bounded_broker_waits():
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


def _models(models: str) -> list[str]:
    return [check_name(m.strip(), "name") for m in models.split(",") if m.strip()]


@trigger_app.command("ingest")
@fails_cleanly
def trigger_ingest(
    source: str = typer.Option(
        ..., help="file:///dir, s3://bucket/prefix or synthetic://textures?n=N"
    ),
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
