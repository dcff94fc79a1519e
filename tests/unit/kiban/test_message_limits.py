"""Bounded work per message (issue 9 §4): every resource parameter has a validated range, a
message over KIBAN_MAX_MESSAGE_BYTES is refused before it is parsed, a dead letter keeps a
bounded payload with its size and sha256, and no log line echoes a whole payload."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal

import pytest

from kiban import messages
from kiban.context import Context
from kiban.errors import InvalidMessageError
from kiban.local_queue import LocalQueue
from kiban.messages import (
    ChunkMessage,
    EncodeChunk,
    EvaluateBatch,
    ExportReport,
    IngestBatch,
    ReindexModel,
    TrainSpecialist,
    parse_message,
)
from kiban.settings import Settings, use_settings
from kiban.stray import check_entry, envelope_problem
from kiban.tasks import (
    DEAD_LETTER_PAYLOAD_BYTES,
    dead_letter,
    dead_letter_dir,
    excerpt,
    kiban_task,
    message_size,
)

LIMIT = 4096  # KIBAN_MAX_MESSAGE_BYTES for these tests
CALLS: list[Any] = []


class LimitProbe(ChunkMessage):
    """A test-only message (defined outside kiban.messages: not in the registry)."""

    task: ClassVar[str] = "kiban.test.limit_probe"
    queue: ClassVar[str] = "test"
    service: ClassVar[str] = "test"
    kind: Literal["limit_probe"] = "limit_probe"
    note: str = ""


@kiban_task(LimitProbe)
def limit_probe(msg: LimitProbe, ctx: Context) -> None:
    CALLS.append(msg)


@pytest.fixture
def queue(tmp_path: Path) -> Iterator[LocalQueue]:
    use_settings(Settings(home=tmp_path, max_message_bytes=LIMIT))  # type: ignore[call-arg]
    CALLS.clear()
    yield LocalQueue(sleep=lambda s: None)


def _letters(tmp_path: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((tmp_path / "store").rglob("deadletter/*/*"))]


# --- ranges -------------------------------------------------------------------------------

NAMES = [f"b{i}" for i in range(messages.MAX_BATCHES + 1)]
LONG_URI = "s3://bucket/" + "x" * messages.MAX_URI_CHARS
EVAL = {"batch_id": "b", "models": ["m"]}
INGEST = {"batch_id": "b", "source": "s3://bucket/p/"}


@pytest.mark.parametrize(
    ("cls", "payload", "field"),
    [
        (EvaluateBatch, {**EVAL, "k": [messages.MAX_K + 1]}, "k.0"),
        (EvaluateBatch, {**EVAL, "k": list(range(1, messages.MAX_K_VALUES + 2))}, "k"),
        (EvaluateBatch, {**EVAL, "k": []}, "k"),
        (
            EvaluateBatch,
            {**EVAL, "models": [f"m{i}" for i in range(messages.MAX_MODELS + 1)]},
            "models",
        ),
        (
            EvaluateBatch,
            {**EVAL, "protocol": {"bootstrap": messages.MAX_BOOTSTRAP + 1}},
            "protocol.bootstrap",
        ),
        (
            EvaluateBatch,
            {**EVAL, "protocol": {"query_sample": messages.MAX_QUERY_SAMPLE + 1}},
            "protocol.query_sample",
        ),
        (
            EvaluateBatch,
            {**EVAL, "protocol": {"ann_check_queries": messages.MAX_ANN_CHECK_QUERIES + 1}},
            "protocol.ann_check_queries",
        ),
        (EvaluateBatch, {**EVAL, "protocol": {"seed": 2**64}}, "protocol.seed"),
        (
            EvaluateBatch,
            {**EVAL, "protocol": {"history_batches": NAMES}},
            "protocol.history_batches",
        ),
        (EvaluateBatch, {**EVAL, "protocol": {"query_split": "s" * 65}}, "protocol.query_split"),
        (IngestBatch, {**INGEST, "chunk_size": messages.MAX_CHUNK_SIZE + 1}, "chunk_size"),
        (IngestBatch, {**INGEST, "source": LONG_URI}, "source"),
        (IngestBatch, {**INGEST, "manifest": LONG_URI}, "manifest"),
        (IngestBatch, {**INGEST, "plan": {"models": [f"m{i}" for i in range(33)]}}, "plan.models"),
        (IngestBatch, {**INGEST, "plan": {"k": [10_000]}}, "plan.k.0"),
        (
            EncodeChunk,
            {"batch_id": "b", "model": "m", "chunk": messages.MAX_CHUNK_INDEX + 1},
            "chunk",
        ),
        (ReindexModel, {"model": "m", "batches": NAMES}, "batches"),
        (ExportReport, {"batch_id": "b", "destination": LONG_URI}, "destination"),
        (TrainSpecialist, {"batches": NAMES, "base": "m", "name": "n"}, "batches"),
        (TrainSpecialist, {"batches": ["b"], "base": "m", "name": "n", "seed": 2**40}, "seed"),
    ],
)
def test_resource_parameters_are_bounded(cls: type, payload: dict, field: str) -> None:
    with pytest.raises(InvalidMessageError, match=re.escape(f"{field}: ")):
        parse_message(payload, cls)


def test_the_bounds_themselves_are_accepted() -> None:
    names = NAMES[: messages.MAX_BATCHES]
    msg = parse_message(
        {
            **EVAL,
            "models": [f"m{i}" for i in range(messages.MAX_MODELS)],
            "k": list(range(messages.MAX_K - messages.MAX_K_VALUES + 1, messages.MAX_K + 1)),
            "protocol": {
                "bootstrap": messages.MAX_BOOTSTRAP,
                "query_sample": messages.MAX_QUERY_SAMPLE,
                "ann_check_queries": messages.MAX_ANN_CHECK_QUERIES,
                "seed": messages.MAX_SEED,
                "history_batches": names,
            },
        },
        EvaluateBatch,
    )
    assert max(msg.k) == messages.MAX_K
    ingest = parse_message(
        {**INGEST, "source": LONG_URI[: messages.MAX_URI_CHARS], "chunk_size": 20_000},
        IngestBatch,
    )
    assert ingest.chunk_size == messages.MAX_CHUNK_SIZE
    # the largest valid messages stay under the default KIBAN_MAX_MESSAGE_BYTES (256 KiB)
    assert message_size(msg.model_dump(mode="json")) < 256 * 1024


# --- oversize: refused before parsing -----------------------------------------------------


def test_oversize_message_is_refused_before_parsing(queue, tmp_path, monkeypatch) -> None:
    def no_parsing(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("an oversize message must not be parsed")

    monkeypatch.setattr("kiban.tasks.parse_message", no_parsing)
    payload = {"batch_id": "b", "model": "m", "chunk": 0, "note": "x" * (2 * LIMIT)}
    queue.send(LimitProbe.task, {"message": payload}, "test")
    queue.run_until_empty()
    (letter,) = _letters(tmp_path)
    size = message_size(payload)
    assert letter["reason"] == f"message of {size} bytes exceeds KIBAN_MAX_MESSAGE_BYTES ({LIMIT})"
    assert letter["payload_bytes"] == size
    assert not CALLS


def test_a_message_at_the_limit_runs(queue, tmp_path) -> None:
    base = {"batch_id": "b", "model": "m", "chunk": 0, "note": ""}
    payload = {**base, "note": "y" * (LIMIT - message_size(base))}
    assert message_size(payload) == LIMIT
    queue.send(LimitProbe.task, {"message": payload}, "test")
    queue.run_until_empty()
    assert len(CALLS) == 1 and not _letters(tmp_path)


def test_oversize_wrong_arguments_are_measured_too(queue, tmp_path) -> None:
    queue.send(LimitProbe.task, {"msg": "z" * (2 * LIMIT)}, "test")
    queue.run_until_empty()
    (letter,) = _letters(tmp_path)
    assert "exceeds KIBAN_MAX_MESSAGE_BYTES" in letter["reason"]


# --- what a dead letter keeps -------------------------------------------------------------


def test_dead_letter_keeps_a_truncated_payload_with_size_and_sha256(queue, tmp_path) -> None:
    payload = {
        "batch_id": "b",
        "model": "m",
        "chunk": 0,
        "note": "é" * (3 * DEAD_LETTER_PAYLOAD_BYTES),
    }
    raw = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
    queue.send(LimitProbe.task, {"message": payload}, "test")
    queue.run_until_empty()
    (letter,) = _letters(tmp_path)
    assert letter["payload_truncated"] is True
    assert isinstance(letter["payload"], str)
    assert len(letter["payload"].encode()) <= DEAD_LETTER_PAYLOAD_BYTES
    assert raw.decode().startswith(letter["payload"])
    assert letter["payload_bytes"] == len(raw)
    assert letter["payload_sha256"] == hashlib.sha256(raw).hexdigest()
    # the stored record stays small, whatever the message weighed
    (path,) = (tmp_path / "store").rglob("deadletter/*/*")
    assert path.stat().st_size < DEAD_LETTER_PAYLOAD_BYTES * 2 + 4096


def test_every_dead_letter_has_size_sha256_and_an_id(queue, tmp_path) -> None:
    payload = {"batch_id": "../b", "model": "m", "chunk": 0}
    queue.send(LimitProbe.task, {"message": payload}, "test")
    queue.run_until_empty()
    (letter,) = _letters(tmp_path)
    raw = json.dumps(payload, separators=(",", ":")).encode()
    assert letter["payload"] == payload  # small: kept whole, so it can be replayed
    assert letter["payload_truncated"] is False
    assert letter["payload_sha256"] == hashlib.sha256(raw).hexdigest()
    assert letter["payload_bytes"] == len(raw)
    (path,) = (tmp_path / "store").rglob("deadletter/*/*")
    assert path.name == f"{letter['id']}.json"


def test_a_raw_stray_entry_is_kept_as_text(tmp_path) -> None:
    settings = Settings(home=tmp_path)  # type: ignore[call-arg]
    ctx = Context.from_settings(settings)
    raw = b"\x00\xffnot json" * 5000
    key = dead_letter(ctx, "(unknown)", raw, "not a kombu message")
    letter = json.loads(ctx.store.get(key))
    assert key.startswith("deadletter/_unknown_/")
    assert letter["payload_truncated"] is True
    assert letter["payload_sha256"] == hashlib.sha256(raw).hexdigest()
    assert letter["payload_bytes"] == len(raw)


@pytest.mark.parametrize("task", ["../../etc/passwd", "a/b", "..", "", "x" * 500, "t\x1b[31m"])
def test_a_task_name_from_a_message_never_makes_a_path(task: str) -> None:
    folder = dead_letter_dir(task)
    assert folder.count("/") == 1
    part = folder.split("/")[1]
    assert part and part not in (".", "..") and len(part) <= 128
    assert all(c.isalnum() or c in "._-" for c in part)


# --- logs ---------------------------------------------------------------------------------


def test_logs_never_echo_a_whole_payload(queue, tmp_path, caplog) -> None:
    marker = "PAYLOAD-" + "q" * (3 * LIMIT)
    caplog.set_level(logging.DEBUG)
    queue.send(LimitProbe.task, {"message": {"batch_id": "b", "chunk": 0, "note": marker}}, "test")
    queue.send(LimitProbe.task, {"message": {"batch_id": "b\x1b[2J", "chunk": "x" * 5000}}, "test")
    queue.run_until_empty()
    assert len(_letters(tmp_path)) == 2
    for record in caplog.records:
        text = record.getMessage()
        assert "q" * 1000 not in text and "x" * 1000 not in text
        assert "\x1b" not in text


def test_excerpt_escapes_controls_and_cuts() -> None:
    assert excerpt("a\x1b[31mb\nc\u202e") == "a\\x1b[31mb\\x0ac\\u202e"
    long = excerpt("z" * 1000, 50)
    assert long.startswith("z" * 50) and long.endswith("(1000 chars)") and len(long) < 80


# --- broker entries: the checks the worker's guard makes (real ones: integration) ---------

ENVELOPE: dict[str, Any] = {
    "body": "W1tdLCB7fSwge31d",  # base64 of [[], {}, {}]
    "content-type": "application/json",
    "content-encoding": "utf-8",
    "headers": {"task": "kiban.ingest.batch", "id": "1"},
    "properties": {"delivery_tag": "t", "body_encoding": "base64", "delivery_info": {}},
}
ROT13 = {**ENVELOPE["properties"], "body_encoding": "rot13"}


@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        (b"hello", "not JSON"),
        (b'{"__type__": "datetime", "__value__": "garbage"}', "not JSON"),
        (b"[1, 2]", "the entry is an array"),
        (b'"text"', "the entry is a string"),
        (b'{"hello": 1}', "no 'properties' object"),
        (json.dumps({**ENVELOPE, "properties": {}}).encode(), "no delivery tag"),
        (json.dumps({**ENVELOPE, "headers": "zz"}).encode(), "headers is a string"),
        (json.dumps({**ENVELOPE, "headers": {"task": ["x"]}}).encode(), "headers.task is an array"),
        (json.dumps({**ENVELOPE, "body": 5}).encode(), "body is a number"),
        (json.dumps({**ENVELOPE, "body": "!!!"}).encode(), "not valid base64"),
        (json.dumps({**ENVELOPE, "properties": ROT13}).encode(), "unknown body encoding"),
        (
            json.dumps({**ENVELOPE, "body": "QUFB" * 10_000}).encode(),
            "exceeds KIBAN_MAX_MESSAGE_BYTES",
        ),
        (b"x" * 200_000, "exceeds KIBAN_MAX_MESSAGE_BYTES"),
    ],
)
def test_broker_entries_that_are_not_messages_are_named(entry: bytes, reason: str) -> None:
    problem = check_entry(entry, LIMIT)
    assert problem is not None and reason in problem


def test_a_kombu_envelope_passes() -> None:
    assert check_entry(json.dumps(ENVELOPE).encode(), LIMIT) is None
    assert envelope_problem(ENVELOPE, LIMIT) is None
