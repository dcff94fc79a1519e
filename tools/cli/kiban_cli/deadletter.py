"""``kiban deadletter list|show|replay|purge``: the dead letters, managed by people.

Every message that ends badly — invalid, oversize, failing for good, or a stray broker entry
no task took — is a record in the store (``deadletter/<task>/<id>.json``, written by
``kiban.tasks.dead_letter``) and, in distributed mode, an entry on the broker's
``deadletter`` list. These commands work on both:

- ``list`` one line per record, newest first (``--task``, ``--batch``, ``--limit``);
- ``show ID`` the whole record: reason, the payload as kept (whole, or its first bytes when
  it was too large), its size and sha256;
- ``replay ID`` / ``replay --all`` validates the kept message and sends it again through the
  normal dispatch path (after the cause is fixed); a truncated payload cannot be replayed.
  Replayed records are marked (``replayed_at``), and ``--all`` skips them;
- ``purge ID`` / ``purge --all`` / ``purge --older-than DAYS`` deletes the records and, in
  distributed mode, drains the matching entries from the ``deadletter`` list, so it does not
  grow forever.

Everything a record holds is data: shown with markup and control characters escaped.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import typer

from kiban.errors import KibanError
from kiban.messages import Message, by_task, parse_message
from kiban.settings import Settings
from kiban.status import letter_batch, read_dead_letter
from kiban.store import ObjectStore
from kiban.tasks import DEAD_LETTER_QUEUE
from kiban.telemetry import redact
from kiban.text import printable
from kiban_cli.common import (
    BROKER_WAIT_SECONDS,
    bounded_broker_waits,
    console,
    fails_cleanly,
    json_text,
    print_json,
    settings_and_store,
    shown,
)

app = typer.Typer(
    help="Dead letters: list, show, replay or purge them (store and deadletter queue).",
    no_args_is_help=True,
)

_QUEUE_PAGE = 500


def register(parent: typer.Typer) -> None:
    parent.add_typer(app, name="deadletter")


@dataclass(frozen=True)
class Letter:
    """One stored dead letter: its key, ID (the file name) and record."""

    key: str
    id: str
    record: dict[str, Any]

    @property
    def task(self) -> str:
        return str(self.record.get("task", "?"))

    @property
    def batch(self) -> str | None:
        """The batch the message names (recorded apart too, for a truncated payload)."""
        kept = self.record.get("batch_id")
        return letter_batch(self.record) or (kept if isinstance(kept, str) else None)

    @property
    def at(self) -> datetime | None:
        return record_time(self.record, self.id)

    @property
    def replayed(self) -> bool:
        return bool(self.record.get("replayed_at"))


def record_time(record: dict[str, Any], letter_id: str = "") -> datetime | None:
    """When a record was written: its ``at``, else the stamp its ID starts with."""
    for text, fmt in ((record.get("at"), None), (letter_id[:15], "%Y%m%dT%H%M%S")):
        if not isinstance(text, str) or not text:
            continue
        try:
            when = datetime.strptime(text, fmt) if fmt else datetime.fromisoformat(text)
        except ValueError:
            continue
        return when if when.tzinfo else when.replace(tzinfo=timezone.utc)
    return None


def letters(store: ObjectStore) -> list[Letter]:
    """Every stored dead letter, oldest first (IDs start with their UTC time)."""
    found = []
    for info in store.list("deadletter"):
        if not info.key.endswith(".json"):
            continue
        letter_id = info.key.rsplit("/", 1)[-1][: -len(".json")]
        found.append(Letter(info.key, letter_id, read_dead_letter(store, info.key)))
    return sorted(found, key=lambda letter: (letter.id, letter.key))


def find(store: ObjectStore, letter_id: str) -> Letter:
    """The dead letter with this ID (or store key), or a one-line error."""
    wanted = letter_id.strip()
    if wanted.endswith(".json"):
        wanted = wanted.rsplit("/", 1)[-1][: -len(".json")]
    matches = [letter for letter in letters(store) if letter.id == wanted]
    if not matches:
        raise KibanError(
            f"no dead letter {printable(letter_id)[:200]!r} in {store.uri} "
            "(`kiban deadletter list` shows the IDs)"
        )
    return matches[0]


def _selected(
    store: ObjectStore,
    task: str | None,
    batch: str | None,
    older_than: float | None = None,
) -> list[Letter]:
    cutoff = (
        datetime.now(timezone.utc) - timedelta(days=older_than) if older_than is not None else None
    )
    chosen = []
    for letter in letters(store):
        if task is not None and letter.task != task:
            continue
        if batch is not None and letter.batch != batch:
            continue
        if cutoff is not None and (letter.at is None or letter.at >= cutoff):
            continue
        chosen.append(letter)
    return chosen


def _summary(letter: Letter) -> dict[str, Any]:
    rec = letter.record
    return {
        "id": letter.id,
        "at": rec.get("at"),
        "task": letter.task,
        "batch": letter.batch,
        "reason": rec.get("reason"),
        "stray": bool(rec.get("stray")),
        "payload_truncated": bool(rec.get("payload_truncated")),
        "replayed_at": rec.get("replayed_at"),
        "key": letter.key,
    }


def _line(text: object, limit: int = 300) -> str:
    """One escaped line of user text for a markup string, cut at ``limit`` characters."""
    value = printable(text)
    if len(value) > limit:
        value = value[: limit - 1] + "…"
    return shown(value)


TASK_HELP = "Only dead letters of this task, e.g. kiban.ingest.batch or '(unknown)'."
BATCH_HELP = "Only dead letters whose message names this batch."


@app.command("list")
@fails_cleanly
def list_letters(
    task: str | None = typer.Option(None, help=TASK_HELP),
    batch: str | None = typer.Option(None, help=BATCH_HELP),
    limit: int = typer.Option(50, min=1, max=100_000, help="Show at most this many, newest first."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """One line per dead letter, newest first: ID, time, task, batch, reason."""
    _, store = settings_and_store()
    chosen = _selected(store, task, batch)
    shown_letters = list(reversed(chosen))[:limit]
    if as_json:
        print_json([_summary(letter) for letter in shown_letters])
        return
    more = f", the newest {len(shown_letters)} shown" if len(chosen) > len(shown_letters) else ""
    console.print(
        f"{len(chosen)} dead letter{'s' if len(chosen) != 1 else ''} in {shown(store.uri)}{more}",
        highlight=False,
        soft_wrap=True,
    )
    for letter in shown_letters:
        marks = []
        if letter.record.get("payload_truncated"):
            marks.append("truncated")
        if letter.replayed:
            marks.append("replayed")
        mark = f" [dim]({', '.join(marks)})[/]" if marks else ""
        console.print(
            f"{_line(letter.id, 64)}  {_line(letter.record.get('at', '-'), 32)}  "
            f"[bold]{_line(letter.task, 128)}[/]  {_line(letter.batch or '-', 128)}  "
            f"[red]{_line(letter.record.get('reason', ''))}[/]{mark}",
            highlight=False,
            soft_wrap=True,
        )


@app.command("show")
@fails_cleanly
def show(
    letter_id: str = typer.Argument(..., metavar="ID", help="A dead letter's ID (from list)."),
    as_json: bool = typer.Option(False, "--json", help="Print the stored record as JSON."),
) -> None:
    """The whole record: reason, the kept payload (maybe truncated), its size and sha256."""
    _, store = settings_and_store()
    letter = find(store, letter_id)
    rec = letter.record
    if as_json:
        print_json(rec)
        return
    fields = [
        ("id", letter.id),
        ("key", letter.key),
        ("at", rec.get("at")),
        ("task", letter.task),
        ("batch", letter.batch),
        ("queue", rec.get("queue")),
        ("content type", rec.get("content_type")),
        ("reason", rec.get("reason")),
        ("payload bytes", rec.get("payload_bytes")),
        ("payload sha256", rec.get("payload_sha256")),
        ("replayed at", rec.get("replayed_at")),
    ]
    for name, value in fields:
        if value is not None:
            console.print(f"[bold]{name}:[/] {shown(value)}", highlight=False, soft_wrap=True)
    if rec.get("stray"):
        console.print("[bold]stray:[/] a broker entry no task took", highlight=False)
    payload = rec.get("payload")
    if rec.get("payload_truncated"):
        console.print(
            f"[bold]payload[/] (truncated: the first {len(str(payload).encode())} of "
            f"{rec.get('payload_bytes')} bytes, as text):",
            highlight=False,
        )
    else:
        console.print("[bold]payload:[/]", highlight=False)
    # shown with credentials masked (the stored record keeps the payload as sent, for replay)
    text = json_text(payload) if not isinstance(payload, str) else printable(payload, keep="\n")
    console.print(redact(text), markup=False, highlight=False, soft_wrap=True, emoji=False)


def replayable(letter: Letter) -> Message:
    """The message a dead letter holds, validated, or a KibanError saying why not."""
    rec = letter.record
    name = f"dead letter {letter.id}"
    if rec.get("unreadable"):
        raise KibanError(f"{name} cannot be read: {rec.get('reason')}")
    if rec.get("payload_truncated"):
        raise KibanError(
            f"{name} kept only the first bytes of its {rec.get('payload_bytes')}-byte payload "
            f"(sha256 {rec.get('payload_sha256')}): it cannot be replayed"
        )
    kind = by_task(letter.task)
    if kind is None:
        raise KibanError(
            f"{name} is for task {printable(letter.task)[:128]!r}, which no "
            "kiban message serves: it cannot be replayed"
        )
    try:
        return parse_message(rec.get("payload"), kind)
    except KibanError as exc:
        raise KibanError(f"{name} does not hold a valid message: {exc}") from None


def _send(message: Message, settings: Settings) -> None:
    """The normal dispatch path: the broker, or the in-process queue (run until empty)."""
    from kiban.celery_app import configure, load_service_tasks
    from kiban.workflow import dispatch

    configure(settings)
    if settings.mode == "embedded":
        load_service_tasks()
        dispatch(message, settings)
        return
    try:
        with bounded_broker_waits():
            dispatch(message, settings)
    except Exception as exc:  # unreachable, wrong password: one line
        raise KibanError(f"broker {redact(settings.broker_url)}: {exc}") from None


def _mark_replayed(store: ObjectStore, letter: Letter) -> None:
    record = dict(letter.record)
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    record["replayed_at"] = now
    record["replays"] = [*record.get("replays", []), now]
    store.put(letter.key, json.dumps(record, default=str, sort_keys=True).encode())


@app.command("replay")
@fails_cleanly
def replay(
    letter_id: str | None = typer.Argument(None, metavar="[ID]", help="The dead letter to send."),
    replay_all: bool = typer.Option(
        False, "--all", help="Every matching dead letter not replayed yet."
    ),
    task: str | None = typer.Option(None, help=TASK_HELP),
    batch: str | None = typer.Option(None, help=BATCH_HELP),
) -> None:
    """Send a dead letter's message again (after fixing its cause), through the normal path."""
    if (letter_id is None) == (not replay_all):
        raise KibanError("name one dead letter ID, or --all (with --task/--batch to choose)")
    if letter_id is not None and (task or batch):
        raise KibanError("--task and --batch choose dead letters for --all, not with an ID")
    settings, store = settings_and_store()
    if letter_id is not None:
        letter = find(store, letter_id)
        message = replayable(letter)
        _send(message, settings)
        _mark_replayed(store, letter)
        where = "ran in this process" if settings.mode == "embedded" else "queued"
        console.print(
            f"replayed {shown(letter.id)}: {shown(letter.task)} {where}",
            highlight=False,
            soft_wrap=True,
        )
        return
    sent = skipped = 0
    for letter in _selected(store, task, batch):
        if letter.replayed:
            continue
        try:
            message = replayable(letter)
        except KibanError as exc:
            skipped += 1
            console.print(f"[yellow]skipped[/] {_line(exc)}", highlight=False, soft_wrap=True)
            continue
        _send(message, settings)
        _mark_replayed(store, letter)
        sent += 1
        console.print(
            f"replayed {shown(letter.id)}: {shown(letter.task)}", highlight=False, soft_wrap=True
        )
    console.print(f"replayed {sent}, skipped {skipped}", highlight=False)


def _entry_record(entry: bytes | str) -> dict[str, Any] | None:
    """The dead-letter record a ``deadletter`` list entry carries, if it is one of ours."""
    try:
        envelope = json.loads(entry)
        body = envelope["body"]
        if envelope.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        _, kwargs, _ = json.loads(body)
        record = kwargs["record"]
    except Exception:  # noqa: BLE001 - anything else on the list is not ours to read
        return None
    return record if isinstance(record, dict) else None


def drain_queue(settings: Settings, selected: Any, drain_foreign: bool) -> int:
    """Remove the ``deadletter`` list entries whose record ``selected(record, id)`` accepts
    (and, with ``drain_foreign``, entries that carry no record); the count removed."""
    import redis

    try:
        client = redis.Redis.from_url(
            settings.broker_url,
            socket_connect_timeout=BROKER_WAIT_SECONDS,
            socket_timeout=2 * BROKER_WAIT_SECONDS,
        )
        removed = 0
        start = 0
        while True:
            page: list[bytes] = client.lrange(  # type: ignore[assignment]
                DEAD_LETTER_QUEUE, start, start + _QUEUE_PAGE - 1
            )
            if not page:
                return removed
            kept = 0
            for entry in page:
                record = _entry_record(entry)
                if record is None:
                    drop = drain_foreign
                else:
                    drop = selected(record, str(record.get("id", "")))
                if drop and client.lrem(DEAD_LETTER_QUEUE, 1, entry):  # type: ignore[arg-type]
                    removed += 1
                else:
                    kept += 1
            start += kept
    except redis.RedisError as exc:
        raise KibanError(
            f"cannot drain the {DEAD_LETTER_QUEUE} queue on broker "
            f"{redact(settings.broker_url)}: {exc}"
        ) from None


@app.command("purge")
@fails_cleanly
def purge(
    letter_id: str | None = typer.Argument(None, metavar="[ID]", help="The dead letter to delete."),
    purge_all: bool = typer.Option(False, "--all", help="Every matching dead letter."),
    older_than: float | None = typer.Option(
        None, "--older-than", min=0, max=100_000, metavar="DAYS", help="Only those older."
    ),
    task: str | None = typer.Option(None, help=TASK_HELP),
    batch: str | None = typer.Option(None, help=BATCH_HELP),
) -> None:
    """Delete dead letters from the store and drain them from the deadletter queue."""
    choosing = purge_all or older_than is not None
    if (letter_id is None) == (not choosing):
        raise KibanError("name one dead letter ID, or --all / --older-than DAYS")
    if letter_id is not None and (task or batch):
        raise KibanError("--task and --batch choose dead letters for --all, not with an ID")
    settings, store = settings_and_store()
    if letter_id is not None:
        chosen = [find(store, letter_id)]
    else:
        chosen = _selected(store, task, batch, older_than)
    for letter in chosen:
        store.delete(letter.key)
    drained = 0
    if settings.mode == "distributed":
        ids = {letter.id for letter in chosen}
        cutoff = (
            datetime.now(timezone.utc) - timedelta(days=older_than)
            if older_than is not None
            else None
        )

        def selected(record: dict[str, Any], record_id: str) -> bool:
            if record_id in ids:
                return True
            if letter_id is not None:
                return False  # one ID: only its own entry
            if task is not None and record.get("task") != task:
                return False
            if batch is not None and batch not in (letter_batch(record), record.get("batch_id")):
                return False
            if cutoff is not None:
                when = record_time(record, record_id)
                return when is not None and when < cutoff
            return True

        unfiltered = letter_id is None and task is None and batch is None and cutoff is None
        drained = drain_queue(settings, selected, drain_foreign=unfiltered)
    queue = (
        f" and {drained} from the {DEAD_LETTER_QUEUE} queue"
        if settings.mode == "distributed"
        else ""
    )
    console.print(
        f"purged {len(chosen)} dead letter{'s' if len(chosen) != 1 else ''} from the store{queue}",
        highlight=False,
    )


__all__ = ["app", "drain_queue", "find", "letters", "register", "replayable"]
