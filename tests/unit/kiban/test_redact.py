"""Credentials inside any URL are masked (issue 9 §7a): in `kiban settings`, CLI errors, log
lines and logged tracebacks — whatever the scheme, with or without one, in the user part or
in the query string. The host and the user name stay: they say where, not how to get in."""

from __future__ import annotations

import io
import json
import logging

import pytest
from typer.testing import CliRunner

from kiban.telemetry import RedactingFilter, RedactingFormatter, redact

SECRET = "hunter2"

# (text, what must still be there after redaction)
URL_FORMS = [
    ("redis://:hunter2@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
    ("redis://default:hunter2@redis:6379/0", "redis://default:***@redis:6379/0"),
    ("rediss://user:hunter2@redis.example:6380/0?ssl_cert_reqs=required", "ssl_cert_reqs"),
    ("redis://:hun@ter2hunter2@host:6379/0", "@host:6379/0"),  # '@' inside the password
    (
        "redis+sentinel://:hunter2@s1:26379;sentinel://:hunter2@s2:26379/0",
        "redis+sentinel://:***@s1:26379;sentinel://:***@s2:26379/0",
    ),
    ("redis://h1:6379;redis://:hunter2@h2:6379", "redis://h1:6379;redis://:***@h2:6379"),
    ("amqp://guest:hunter2@rabbit:5672//", "amqp://guest:***@rabbit:5672//"),
    ("https://admin:hunter2@qdrant.example:6333", "https://admin:***@qdrant.example:6333"),
    ("http://user:hunter2@[::1]:6333/collections", "@[::1]:6333/collections"),
    ("https://hunter2@qdrant.example", "https://***@qdrant.example"),  # a token as user
    ("https://ak:hunter2@s3.example.com", "https://ak:***@s3.example.com"),
    ("user:hunter2@host:6379", "user:***@host:6379"),  # no scheme
    (":hunter2@host:6379/0", ":***@host:6379/0"),
    ("broker at default:hunter2@10.0.0.5:6379 refused", "default:***@10.0.0.5:6379 refused"),
    ("https://q.example/?api_key=hunter2&x=1", "?api_key=***&x=1"),
    ("https://h/x?token=hunter2", "?token=***"),
    ("redis://h:6379/0?password=hunter2", "?password=***"),
    ("https://h/p?password=hunter2#frag", "#frag"),
    (
        "https://b.s3.example/k?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=hunter2"
        "&X-Amz-Signature=hunter2&X-Amz-Security-Token=hunter2",
        "X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=***&X-Amz-Signature=***",
    ),
    ("https://acct.blob.example/c?sv=2024&sig=hunter2", "sv=2024&sig=***"),
    ("password=hunter2 and more", "password=*** and more"),
    ('{"password": "hunter2"}', '{"password": "***"}'),
    ("aws_secret_access_key=hunter2", "aws_secret_access_key=***"),
    ("Authorization: Bearer hunter2", "Authorization: Bearer ***"),
    (
        "kombu.exceptions.OperationalError: Cannot connect to redis://:hunter2@broker:6379/0: "
        "Error 111 connecting to broker:6379. Connection refused.",
        "Cannot connect to redis://:***@broker:6379/0: Error 111",
    ),
]

# Text that holds no secret stays exactly as it was.
UNCHANGED = [
    "s3://bucket/folder@2x/img.jpg",
    "file:///data/a@b/c.jpg",
    "checker/img@2x.jpg",
    "KIBAN_QDRANT_API_KEY: Input should be a valid string",
    "invalid username-password pair or user is disabled.",
    "redis://127.0.0.1:6379/0",
    "https://qdrant.example:6333/collections?limit=10",
    "MV@5 macro-F1 0.81 [0.78, 0.84]",
    '"qdrant_api_key": "**********"',
]


@pytest.mark.parametrize(("text", "kept"), URL_FORMS, ids=[t[:48] for t, _ in URL_FORMS])
def test_secret_is_masked(text: str, kept: str) -> None:
    out = redact(text)
    assert SECRET not in out and "ter2" not in out, out
    assert kept in out, out
    assert redact(out) == out  # idempotent: redacting twice changes nothing


@pytest.mark.parametrize("text", UNCHANGED)
def test_text_without_secrets_is_unchanged(text: str) -> None:
    assert redact(text) == text


def test_logged_message_and_traceback_are_redacted() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(RedactingFormatter("%(levelname)s %(message)s"))
    handler.addFilter(RedactingFilter())
    logger = logging.getLogger("kiban.test_redact")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("broker is %s", "redis://:hunter2@b:6379/0")
        try:
            raise ConnectionError("Cannot connect to redis://:hunter2@b:6379/0: refused")
        except ConnectionError:
            logger.exception("send failed")
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    assert SECRET not in text
    assert "broker is redis://:***@b:6379/0" in text
    assert "Traceback" in text and "ConnectionError: Cannot connect to redis://:***@b" in text


def test_settings_command_masks_every_url(monkeypatch: pytest.MonkeyPatch) -> None:
    from kiban_cli.main import app

    env = {
        "KIBAN_BROKER_URL": "redis+sentinel://:hunter2@s1:26379;sentinel://:hunter2@s2:26379/0",
        "KIBAN_QDRANT_URL": "https://admin:hunter2@qdrant.example:6333/?api_key=hunter2",
        "KIBAN_QDRANT_API_KEY": "hunter2",
        "KIBAN_S3_ENDPOINT_URL": "https://ak:hunter2@s3.example",
        "KIBAN_SCHEDULE_SOURCE": "s3://night/{date}/?X-Amz-Signature=hunter2",
        "KIBAN_SCHEDULE_MANIFEST": "https://u:hunter2@files.example/{date}.csv",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    result = CliRunner().invoke(app, ["settings"])
    assert result.exit_code == 0, result.output
    assert SECRET not in result.output
    data = json.loads(result.output)
    assert data["broker_url"] == "redis+sentinel://:***@s1:26379;sentinel://:***@s2:26379/0"
    assert data["qdrant_url"] == "https://admin:***@qdrant.example:6333/?api_key=***"
    assert data["qdrant_api_key"] == "**********"
    assert data["s3_endpoint_url"] == "https://ak:***@s3.example"
    assert data["schedule_source"] == "s3://night/{date}/?X-Amz-Signature=***"
    assert data["schedule_manifest"] == "https://u:***@files.example/{date}.csv"


def test_broker_error_that_quotes_the_url_reaches_the_user_redacted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """kombu's connection error embeds the broker URL: the CLI's one line masks it."""
    import kombu.exceptions

    import kiban.workflow
    from kiban_cli.main import app

    def refuse(*_: object, **__: object) -> None:
        raise kombu.exceptions.OperationalError(
            "Cannot connect to redis://:hunter2@broker.example:6379/0: Error 111."
        )

    monkeypatch.setattr(kiban.workflow.app, "send_task", refuse)
    monkeypatch.setenv("KIBAN_MODE", "distributed")
    monkeypatch.setenv("KIBAN_BROKER_URL", "redis://:hunter2@broker.example:6379/0")
    result = CliRunner().invoke(app, ["trigger", "nightly"])
    assert result.exit_code == 2, result.output
    assert SECRET not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: broker redis://:***@broker.example")


def test_uncaught_traceback_is_redacted() -> None:
    """A process that set up kiban's logging prints an uncaught exception redacted, in the
    main thread and in any other."""
    import subprocess
    import sys

    code = (
        "import threading\n"
        "from kiban.telemetry import setup_logging\n"
        "setup_logging('INFO')\n"
        "def boom():\n"
        "    raise RuntimeError('cannot reach redis://:hunter2@b:6379/0')\n"
        "t = threading.Thread(target=boom); t.start(); t.join()\n"
        "boom()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert SECRET not in done.stderr
    assert done.stderr.count("RuntimeError: cannot reach redis://:***@b:6379/0") == 2
