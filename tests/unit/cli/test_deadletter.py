"""`kiban deadletter list|show|replay|purge` (issue 9 §4) on a real file:// store in embedded
mode, and `purge` draining a real redis-server's ``deadletter`` list in distributed mode.

The dead letters are made the way kiban makes them: a message that fails for good through
the embedded queue (an ingest of a missing folder) and ``kiban.tasks.dead_letter``
for the kinds only a worker meets (a stray broker entry, an oversize payload)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from kiban.context import Context
from kiban.settings import Settings, load_settings, use_settings
from kiban.store import open_store
from kiban.tasks import DEAD_LETTER_QUEUE, dead_letter
from kiban_cli.main import app
from kiban_cli.synthetic import generate_texture_dataset

runner = CliRunner()


def kiban(*args: str) -> Any:
    result = runner.invoke(app, list(args))
    assert "Traceback" not in result.output
    return result


def one_error_line(result: Any) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    return lines[0]


def _ctx() -> Context:
    return Context.from_settings(load_settings())


def _records(home: Path) -> dict[str, dict[str, Any]]:
    return {
        p.stem: json.loads(p.read_text()) for p in (home / "store").rglob("deadletter/*/*.json")
    }


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "kiban-home"
    monkeypatch.setenv("KIBAN_HOME", str(home))
    return home


@pytest.fixture
def letters(home: Path, tmp_path: Path) -> dict[str, str]:
    """Three dead letters: a failed ingest (replayable once its folder exists), an oversize
    message (truncated) and a stray entry with markup and terminal escapes in it."""
    from kiban.celery_app import configure, load_service_tasks
    from kiban.messages import IngestBatch
    from kiban.workflow import dispatch

    source = tmp_path / "night"
    settings = load_settings()
    configure(settings)
    load_service_tasks()
    dispatch(IngestBatch(batch_id="night-1", source=source.as_uri()), settings)  # fails for good
    (failed,) = _records(home)
    ctx = _ctx()
    big = {"batch_id": "big-1", "source": "s3://b/" + "x" * 40_000}
    oversize = dead_letter(ctx, "kiban.ingest.batch", big, "message of 40021 bytes exceeds")
    stray = dead_letter(
        ctx,
        "(unknown)",
        b"[red]stray[/red] \x1b]0;owned\x07 entry",
        "not a kombu message: [bold]not JSON[/bold] \x1b[2J",
        {"stray": True, "queue": "ingest"},
    )
    use_settings(None)
    return {
        "failed": failed,
        "oversize": Path(oversize).stem,
        "stray": Path(stray).stem,
        "source": str(source),
    }


def test_list_is_one_escaped_line_per_letter(letters: dict[str, str]) -> None:
    result = kiban("deadletter", "list")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("3 dead letters in file://")
    rows = {line.split()[0]: line for line in lines[1:]}
    assert set(rows) == {letters["failed"], letters["oversize"], letters["stray"]}
    assert "kiban.ingest.batch  night-1  StoreError:" in rows[letters["failed"]]
    assert "no such directory" in rows[letters["failed"]]
    assert "big-1" in rows[letters["oversize"]] and "(truncated)" in rows[letters["oversize"]]
    # markup is shown as typed, escapes as text: nothing acts on the terminal
    assert "[bold]not JSON[/bold] \\x1b[2J" in rows[letters["stray"]]
    assert "(unknown)" in rows[letters["stray"]]
    assert "\x1b" not in result.output
    assert [line.split()[0] for line in lines[1:]] == sorted(rows, reverse=True)  # newest first


def test_list_filters(letters: dict[str, str]) -> None:
    by_task = kiban("deadletter", "list", "--task", "(unknown)")
    assert by_task.output.splitlines()[0].startswith("1 dead letter in")
    assert letters["stray"] in by_task.output
    by_batch = kiban("deadletter", "list", "--batch", "night-1")
    assert letters["failed"] in by_batch.output and letters["oversize"] not in by_batch.output
    limited = kiban("deadletter", "list", "--limit", "1")
    assert "the newest 1 shown" in limited.output and len(limited.output.splitlines()) == 2
    as_json = json.loads(kiban("deadletter", "list", "--json").output)
    assert {row["id"] for row in as_json} == {letters[k] for k in ("failed", "oversize", "stray")}
    one_error_line(kiban("deadletter", "list", "--limit", "0"))


def test_show_prints_the_whole_record(letters: dict[str, str], home: Path) -> None:
    record = _records(home)[letters["oversize"]]
    result = kiban("deadletter", "show", letters["oversize"])
    assert result.exit_code == 0, result.output
    assert f"payload sha256: {record['payload_sha256']}" in result.output
    assert f"payload bytes: {record['payload_bytes']}" in result.output
    assert "payload (truncated: the first 16384 of" in result.output
    stray = kiban("deadletter", "show", letters["stray"])
    assert "[red]stray[/red] \\x1b]0;owned\\x07 entry" in stray.output
    assert "queue: ingest" in stray.output and "\x1b" not in stray.output
    shown = json.loads(kiban("deadletter", "show", letters["failed"], "--json").output)
    assert shown["payload"]["batch_id"] == "night-1" and shown["id"] == letters["failed"]
    assert "no dead letter" in one_error_line(kiban("deadletter", "show", "nope\x1b[2J"))


def test_replay_after_the_fix_then_marked(letters: dict[str, str], home: Path) -> None:
    generate_texture_dataset(Path(letters["source"]), n_classes=2, per_class=2, size=32)
    result = kiban("deadletter", "replay", letters["failed"])
    assert result.exit_code == 0, result.output
    assert f"replayed {letters['failed']}: kiban.ingest.batch ran in this process" in result.output
    store = open_store((home / "store").as_uri())
    assert store.exists("batches/night-1/batch.json")  # the original message ran again
    records = _records(home)
    assert records[letters["failed"]]["replayed_at"]
    assert len(records) == 3  # it succeeded: no new dead letter
    assert "(replayed)" in kiban("deadletter", "list").output
    # --all skips what was replayed and says why the rest cannot be
    again = kiban("deadletter", "replay", "--all")
    assert again.exit_code == 0, again.output
    assert "replayed 0, skipped 2" in again.output
    assert "cannot be replayed" in again.output


@pytest.mark.parametrize(
    ("which", "args", "error"),
    [
        ("oversize", [], "kept only the first bytes of its 40039-byte payload"),
        ("stray", [], "which no kiban message serves"),
        (None, [], "name one dead letter ID, or --all"),
        (None, ["nope"], "no dead letter 'nope'"),
        ("failed", ["--all"], "name one dead letter ID, or --all"),
        ("failed", ["--task", "x"], "not with an ID"),
    ],
)
def test_replay_refusals_are_one_line(
    letters: dict[str, str], which: str | None, args: list[str], error: str
) -> None:
    argv = ["deadletter", "replay", *([letters[which]] if which else []), *args]
    assert error in one_error_line(kiban(*argv))


def test_replay_of_a_message_that_fails_again_is_dead_lettered_again(
    letters: dict[str, str], home: Path
) -> None:
    # folder still missing (Celery's own log of the task's failure may show a traceback)
    result = runner.invoke(app, ["deadletter", "replay", letters["failed"]])
    assert result.exit_code == 0, result.output
    records = _records(home)
    assert len(records) == 4 and records[letters["failed"]]["replayed_at"]


def test_purge_one_then_older_then_all(letters: dict[str, str], home: Path) -> None:
    result = kiban("deadletter", "purge", letters["stray"])
    assert result.exit_code == 0, result.output
    assert "purged 1 dead letter from the store" in result.output
    assert letters["stray"] not in _records(home)
    # age one record by a week: --older-than 3 takes it alone
    records = _records(home)
    old = records[letters["failed"]]
    old["at"] = (datetime.now(timezone.utc) - timedelta(days=7)).isoformat(timespec="seconds")
    (path,) = (home / "store").rglob(f"deadletter/*/{letters['failed']}.json")
    path.write_text(json.dumps(old))
    assert "purged 1 dead letter" in kiban("deadletter", "purge", "--older-than", "3").output
    assert set(_records(home)) == {letters["oversize"]}
    assert "purged 1 dead letter" in kiban("deadletter", "purge", "--all").output
    assert not _records(home)
    assert "0 dead letters" in kiban("deadletter", "list").output
    assert "name one dead letter ID" in one_error_line(kiban("deadletter", "purge"))


def test_an_unreadable_record_does_not_break_listing(letters: dict[str, str], home: Path) -> None:
    (home / "store" / "deadletter" / "x").mkdir(parents=True, exist_ok=True)
    (home / "store" / "deadletter" / "x" / "20200101T000000-bad.json").write_text("{not json")
    result = kiban("deadletter", "list")
    assert result.exit_code == 0, result.output
    assert "4 dead letters" in result.output and "unreadable" in result.output
    assert "cannot be read" in one_error_line(kiban("deadletter", "replay", "20200101T000000-bad"))


# --- distributed: purge drains the broker's deadletter list ---------------------------------


@pytest.fixture
def redis_broker(tmp_path: Path) -> Iterator[str]:
    from kiban_cli.stack import find_binary, free_ports, start_redis

    if find_binary("redis-server") is None:
        pytest.skip("redis-server not installed (apt-get install -y redis-server)")
    (port,) = free_ports(1)
    proc = start_redis(tmp_path / "redis", port)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.stop()


def test_purge_drains_the_deadletter_queue(
    redis_broker: str, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import redis

    from kiban.celery_app import configure

    monkeypatch.setenv("KIBAN_MODE", "distributed")
    monkeypatch.setenv("KIBAN_BROKER_URL", redis_broker)
    monkeypatch.setenv("KIBAN_STORE_URI", (home / "store").as_uri())
    settings = load_settings()
    configure(settings)
    ctx = Context.from_settings(settings)
    keys = [
        dead_letter(ctx, "kiban.ingest.batch", {"batch_id": f"b{i}", "source": "x"}, "boom")
        for i in range(3)
    ]
    client = redis.Redis.from_url(redis_broker)
    client.lpush(DEAD_LETTER_QUEUE, b"not one of ours")  # a stray on the deadletter list
    assert client.llen(DEAD_LETTER_QUEUE) == 4
    use_settings(None)

    first = Path(keys[0]).stem
    result = kiban("deadletter", "purge", first)
    assert result.exit_code == 0, result.output
    assert "purged 1 dead letter from the store and 1 from the deadletter queue" in result.output
    remaining = client.lrange(DEAD_LETTER_QUEUE, 0, -1)
    assert len(remaining) == 3 and not any(first.encode() in e for e in remaining)

    by_batch = kiban("deadletter", "purge", "--all", "--batch", "b1")
    assert "purged 1 dead letter from the store and 1 from the deadletter queue" in by_batch.output
    everything = kiban("deadletter", "purge", "--all")
    assert (
        "purged 1 dead letter from the store and 2 from the deadletter queue" in everything.output
    )
    assert client.llen(DEAD_LETTER_QUEUE) == 0
    use_settings(Settings(home=home))  # type: ignore[call-arg]


def test_purge_names_an_unreachable_broker(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kiban_cli.stack import free_ports

    (port,) = free_ports(1)
    monkeypatch.setenv("KIBAN_MODE", "distributed")
    monkeypatch.setenv("KIBAN_BROKER_URL", f"redis://:s3cret@127.0.0.1:{port}/0")
    line = one_error_line(kiban("deadletter", "purge", "--all"))
    assert "cannot drain the deadletter queue on broker redis://:***@127.0.0.1" in line
    assert "s3cret" not in line
