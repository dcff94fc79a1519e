"""Redelivery and liveness pieces that need no broker: the bounds, what a heartbeat says of a
message, the lost-ack log filter, and the live status without workers."""

from __future__ import annotations

import base64
import json
import logging
import socket
import sys

import pytest
import redis.exceptions

from kiban.celery_app import RecoveredAckFilter, configure
from kiban.liveness import (
    describe_raw_message,
    heartbeat_ttl,
    redelivery_bound,
    renew_interval,
    restore_sweep_interval,
    work_of,
)
from kiban.settings import Settings, load_settings
from kiban.status import live_status


def test_default_redelivery_is_within_minutes_and_renewal_well_inside_it() -> None:
    vt = Settings().visibility_timeout
    assert vt == 60
    assert redelivery_bound(vt) == 70  # documented in docs/deployment.md, Redelivery
    assert renew_interval(vt) == 10 and restore_sweep_interval(vt) == 10
    assert heartbeat_ttl(vt) == 35
    for vt in (5, 8, 60, 120, 3600, 6 * 3600):  # a lease is renewed >= 5 times per timeout
        assert renew_interval(vt) * 5 <= vt or renew_interval(vt) == 1.0
        assert 1 <= restore_sweep_interval(vt) <= 10


def test_visibility_timeout_bounds_name_the_setting() -> None:
    from kiban.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="KIBAN_VISIBILITY_TIMEOUT"):
        load_settings(visibility_timeout=2)


def _raw(kwargs: object, encoding: str = "base64") -> dict[str, object]:
    body = json.dumps([[], kwargs, {}]).encode()
    return {
        "body": base64.b64encode(body).decode() if encoding == "base64" else body.decode(),
        "headers": {"task": "kiban.encoder.encode_chunk", "id": "t-1"},
        "properties": {"body_encoding": encoding, "delivery_tag": "tag-1"},
    }


def test_a_stored_message_is_described_by_its_work() -> None:
    message = {"batch_id": "b-1", "model": "m", "chunk": 3, "plan": {}}
    described = describe_raw_message(_raw({"message": message}))
    assert described == {
        "task": "kiban.encoder.encode_chunk",
        "id": "t-1",
        "tag": "tag-1",
        "batch": "b-1",
        "model": "m",
        "chunk": 3,
    }
    # bodies that are not a kiban call name no work, and never raise
    for kwargs in ({"msg": 1}, {"message": "text"}, None):
        assert describe_raw_message(_raw(kwargs))["batch"] is None
    broken = {"body": "%%%", "headers": "x", "properties": {"body_encoding": "base64"}}
    assert describe_raw_message(broken)["task"] is None
    assert work_of({"message": {"batch_id": "x" * 999, "chunk": True}}) == {
        "batch": "x" * 200,
        "model": None,
        "chunk": None,
    }


def _record(level: int, msg: str, exc: BaseException | None) -> logging.LogRecord:
    exc_info = (type(exc), exc, None) if exc else None
    args = ("tag", exc)
    return logging.LogRecord("celery.worker.request", level, __file__, 1, msg, args, exc_info)


def test_an_ack_lost_to_a_reconnect_is_a_warning_and_nothing_else_changes() -> None:
    lost = _record(
        logging.CRITICAL,
        "Couldn't ack %r, reason:%r",
        redis.exceptions.ConnectionError("Connection refused"),
    )
    assert RecoveredAckFilter().filter(lost)
    assert (lost.levelno, lost.levelname, lost.exc_info) == (logging.WARNING, "WARNING", None)
    assert "delivered again" in lost.getMessage()
    rejected = _record(logging.CRITICAL, "Couldn't reject %r, reason: %r", BrokenPipeError())
    RecoveredAckFilter().filter(rejected)
    assert rejected.levelno == logging.WARNING
    # a lost ack for another reason, and any other CRITICAL, stay CRITICAL with traceback
    for record in (
        _record(logging.CRITICAL, "Couldn't ack %r, reason:%r", ValueError("bug")),
        _record(logging.CRITICAL, "Unrecoverable error: %r", OSError("disk")),
    ):
        assert RecoveredAckFilter().filter(record)
        assert record.levelno == logging.CRITICAL and record.exc_info is not None


def test_configure_installs_the_filter_once_on_celerys_loggers() -> None:
    configure(Settings())
    configure(Settings())
    for name in ("celery.worker.request", "kombu.message"):
        filters = logging.getLogger(name).filters
        assert sum(isinstance(f, RecoveredAckFilter) for f in filters) == 1


def test_a_real_lost_ack_through_the_logger_is_logged_as_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    configure(Settings())
    logger = logging.getLogger("celery.worker.request")
    with caplog.at_level(logging.WARNING, logger="celery.worker.request"):
        try:
            raise redis.exceptions.ConnectionError("Error 111 connecting")
        except redis.exceptions.ConnectionError:
            logger.critical("Couldn't ack %r, reason:%r", "abc", sys.exc_info()[1], exc_info=True)
    (record,) = [r for r in caplog.records if "Couldn't ack" in r.getMessage()]
    assert record.levelname == "WARNING" and not record.exc_info


def test_live_status_in_embedded_mode_says_there_are_no_workers() -> None:
    view = live_status(Settings(mode="embedded"))
    assert view.workers == [] and "no workers" in (view.problem or "")


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_live_status_without_a_broker_is_one_line_and_lists_the_recorded_workers() -> None:
    secret = "pw-never-shown-93"
    settings = Settings(
        mode="distributed", broker_url=f"redis://:{secret}@127.0.0.1:{_closed_port()}/0"
    )
    recorded = {
        "procs": {
            "encoder-0": {"pid": 2**22 + 7, "service": "encoder", "metrics_port": 41000},
            "redis": {"pid": 2**22 + 8, "service": None},
        }
    }
    view = live_status(settings, recorded=recorded)
    assert not view.reachable and "broker unreachable" in (view.problem or "")
    assert secret not in view.model_dump_json()
    (worker,) = view.workers
    assert (worker.name, worker.state, worker.metrics) == ("encoder-0", "dead", "127.0.0.1:41000")
    assert view.processes == {"redis": "dead"}
