"""Every user-facing failure is one line and exit status 2 (issue 9 §6).

A corpus of bad invocations — values out of range, invalid batch IDs and model names, bad
settings, stores that cannot be opened, a broker that refuses or is not there, a Qdrant server
that does not answer, places that cannot be written, unknown commands and options — each must
end with exit status 2 and exactly one line, ``error: <what is wrong>``, on the terminal
(stdout and stderr together), no traceback, no secret. In-process cases use typer's runner;
the environment-variable cases run the installed ``kiban`` script in a subprocess, as a
person would, with a time limit (a broker or server that is not there must not hang).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kiban_cli.main import app

KIBAN = Path(sys.executable).parent / "kiban"
SECRET = "hunter2-pw"


@dataclass(frozen=True)
class Bad:
    args: list[str]
    says: str  # a substring of the one line
    env: dict[str, str] = field(default_factory=dict)


def assert_one_clean_line(output: str, says: str) -> None:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    assert lines[0].startswith("error: "), output
    assert says in lines[0], output
    assert "Traceback" not in output and SECRET not in output, output


RUN = ["run", "--source", "file:///nonexistent", "--models", "m"]
EVAL = ["evaluate", "--batch", "b"]

IN_PROCESS = [
    Bad([*RUN, "--k", "1000000000"], "--k values must be integers from 1 to 100,"),
    Bad([*RUN, "--k", "0"], "--k values must be integers from 1 to 100,"),
    Bad([*RUN, "--k", "-3"], "--k values must be integers from 1 to 100,"),
    Bad([*RUN, "--k", "1,x"], "--k must be comma-separated integers"),
    Bad([*RUN, "--query-sample", "0"], "query_sample"),
    Bad([*RUN, "--query-sample", "-5"], "query_sample"),
    Bad([*RUN, "--volume", "0"], "'--volume'"),
    Bad([*RUN, "--volume", "-1"], "'--volume'"),
    Bad([*RUN, "--protocol", "psychic"], "invalid protocol options: name"),
    Bad([*EVAL, "--bootstrap", "1000000000"], "invalid protocol options: bootstrap"),
    Bad([*EVAL, "--bootstrap", "-1"], "invalid protocol options: bootstrap"),
    Bad([*EVAL, "--ann-check", "-1"], "ann_check_queries"),
    Bad([*EVAL, "--seed", "-1"], "invalid protocol options: seed"),
    Bad([*EVAL, "--k", "5000"], "--k values must be integers from 1 to 100,"),
    Bad([*EVAL, "--history", "../etc"], "history_batches"),
    Bad(["evaluate", "--batch", "never-run"], "has no stored embeddings"),
    Bad([*RUN, "--batch", "../etc"], "invalid batch ID '../etc'"),
    Bad([*RUN, "--batch", "a b"], "invalid batch ID"),
    Bad([*RUN, "--batch", "x" * 200], "invalid batch ID"),
    Bad(["status", "../../etc"], "invalid batch ID"),
    Bad(["status", "[bold]x[/]"], "invalid batch ID '[bold]x[/]'"),
    Bad(["status", "esc\x1b[31m"], "invalid batch ID 'esc\\x1b[31m'"),
    Bad(["status", "never-run"], "is not ingested"),
    Bad(["report", "show", "a/b"], "invalid batch ID"),
    Bad(["report", "show", "b", "--version", "latest"], "--version must be four digits"),
    Bad(["report", "show", "never-run"], "no report for batch"),
    Bad(["embeddings", "export", "--batch", "b c", "--model", "m", "--out", "x"], "batch ID"),
    Bad(["embeddings", "export", "--batch", "b", "--model", "m/x", "--out", "x"], "model name"),
    Bad(["trigger", "ingest", "--source", "file:///tmp", "--batch", "x y"], "invalid batch ID"),
    Bad(["trigger", "ingest", "--source", "file:///tmp", "--batch", "b", "--k", "x"], "--k"),
    Bad(["trigger", "evaluate", "--batch", "b", "--models", "m", "--k", "5000"], "--k"),
    Bad(["trigger", "nightly", "--date", "tomorrow"], "date"),
    Bad(
        ["trigger", "export-report", "--batch", "b", "--to", "file:///x", "--version", "v1"],
        "report_version",
    ),
    Bad([*RUN[:-1], "no-such-model"], "no model named 'no-such-model'"),
    Bad([*RUN[:-1], "bad/name"], "invalid model name 'bad/name'"),
    Bad([*RUN[:-1], " , "], "--models needs at least one model name"),
    Bad(["models", "show", "../x"], "invalid model name"),
    Bad(["models", "show", "nope"], "no model named 'nope'"),
    Bad(["models", "export", "efficientnet-lite0", "--name", "x", "--family", "big"], "--family"),
    Bad(["worker", "nosuch"], "unknown service 'nosuch'"),
    Bad([*RUN, "--bogus"], "No such option: --bogus"),
    Bad(["run", "--models", "m"], "Missing option '--source'"),
    Bad(["report", "show"], "Missing argument 'batch'"),
    Bad(["no-such-command"], "No such command 'no-such-command'"),
    Bad(["status", "--k", "3"], "No such option: --k"),
]


@pytest.mark.parametrize("bad", IN_PROCESS, ids=[" ".join(b.args)[:60] for b in IN_PROCESS])
def test_bad_invocation_is_one_line_exit_2(bad: Bad) -> None:
    result = CliRunner().invoke(app, bad.args)
    assert result.exit_code == 2, result.output
    assert_one_clean_line(result.output, bad.says)


# --- places that cannot be written ------------------------------------------------------


@pytest.fixture
def stored_batch_and_report(tmp_path: Path) -> str:
    """An (empty) ingested batch with a report version, in the CLI's own store."""
    from kiban.context import Context
    from kiban.messages import IngestBatch
    from kiban.settings import load_settings
    from kiban_ingest.ingest import ingest_batch

    (tmp_path / "empty").mkdir()
    ctx = Context.from_settings(load_settings())
    ingest_batch(IngestBatch(batch_id="e", source=(tmp_path / "empty").as_uri()), ctx)
    ctx.store.put("reports/e/0001/report.json", b"{}")
    ctx.store.put("reports/e/0001/report.html", b"<html></html>")
    ctx.store.put("reports/e/0001/report.md", b"# e")
    return "e"


def unwritable(tmp_path: Path) -> list[tuple[str, str]]:
    a_file = tmp_path / "a-file"
    a_file.write_bytes(b"x")
    return [
        (str(a_file / "x.out"), "cannot write"),  # a file used as a directory
        ("/proc/kiban-test/x.out", "cannot write"),  # a place no one may create
    ]


def test_unwritable_outputs_are_one_line(stored_batch_and_report: str, tmp_path: Path) -> None:
    batch = stored_batch_and_report
    runner = CliRunner()
    for place, says in unwritable(tmp_path):
        for args in (
            ["embeddings", "export", "--batch", batch, "--model", "m", "--out", place],
            ["report", "show", batch, "--html", "--out", place],
        ):
            result = runner.invoke(app, args)
            assert result.exit_code == 2, (args, result.output)
            assert_one_clean_line(result.output, says)
    assert (tmp_path / "a-file").read_bytes() == b"x"
    for destination in ((tmp_path / "a-file" / "sub").as_uri(), "file:///proc/kiban-test/"):
        result = runner.invoke(
            app, ["trigger", "export-report", "--batch", batch, "--to", destination]
        )
        assert result.exit_code == 2, result.output
        assert_one_clean_line(result.output, "cannot create the directory")


# --- environment: settings, stores, the broker, the Qdrant server (a real subprocess) ------


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_kiban(
    args: list[str], env: dict[str, str], home: Path, limit: float = 60
) -> tuple[int, str, float]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("KIBAN_", "AWS_"))}
    clean.update(
        KIBAN_HOME=str(home),
        AWS_ACCESS_KEY_ID="kibantest",
        AWS_SECRET_ACCESS_KEY=SECRET,
        AWS_CONFIG_FILE=str(home / "no-aws-config"),
        AWS_SHARED_CREDENTIALS_FILE=str(home / "no-aws-credentials"),
        **env,
    )
    start = time.monotonic()
    done = subprocess.run(
        [str(KIBAN), *args], env=clean, capture_output=True, text=True, timeout=limit
    )
    return done.returncode, done.stdout + done.stderr, time.monotonic() - start


def env_cases(tmp_path: Path) -> list[tuple[str, Bad, float]]:
    a_file = tmp_path / "not-a-dir"
    a_file.write_text("x")
    port = closed_port()
    status = ["status"]
    run = ["run", "--source", (tmp_path / "src").as_uri(), "--models", "m"]
    broker = f"redis://:{SECRET}@127.0.0.1:{port}/0"
    return [
        ("bad log level", Bad(status, "KIBAN_LOG_LEVEL", {"KIBAN_LOG_LEVEL": "LOUD"}), 20),
        ("bad mode", Bad(status, "KIBAN_MODE", {"KIBAN_MODE": "cloud"}), 20),
        ("bad number", Bad(status, "KIBAN_BATCH_SIZE", {"KIBAN_BATCH_SIZE": "0"}), 20),
        ("store not a URI", Bad(status, "KIBAN_STORE_URI", {"KIBAN_STORE_URI": "ftp://x"}), 20),
        (
            "store on a file",
            Bad(status, "cannot create the directory", {"KIBAN_STORE_URI": a_file.as_uri()}),
            20,
        ),
        (
            "store in /proc",
            Bad(status, "cannot create the directory", {"KIBAN_STORE_URI": "file:///proc/k/s"}),
            20,
        ),
        (
            "S3 endpoint not a URL",
            Bad(
                status,
                "Invalid endpoint",
                {"KIBAN_STORE_URI": "s3://b/p", "KIBAN_S3_ENDPOINT_URL": "no url"},
            ),
            20,
        ),
        (
            "S3 endpoint closed, with credentials in the URL",
            Bad(
                status,
                "Could not connect to the endpoint URL",
                {
                    "KIBAN_STORE_URI": "s3://b/p",
                    "KIBAN_S3_ENDPOINT_URL": f"http://ak:{SECRET}@127.0.0.1:{port}",
                },
            ),
            45,
        ),
        (
            "broker closed (distributed trigger)",
            Bad(
                ["trigger", "nightly"],
                f"broker redis://:***@127.0.0.1:{port}/0",
                {"KIBAN_MODE": "distributed", "KIBAN_BROKER_URL": broker},
            ),
            20,
        ),
        (
            "broker closed, URL without scheme",
            Bad(
                ["trigger", "nightly"],
                "broker",
                {"KIBAN_MODE": "distributed", "KIBAN_BROKER_URL": f":{SECRET}@127.0.0.1:{port}"},
            ),
            20,
        ),
        (
            "Qdrant server closed",
            Bad(
                run,
                "(KIBAN_QDRANT_URL) does not answer",
                {
                    "KIBAN_QDRANT_URL": f"http://admin:{SECRET}@127.0.0.1:{port}",
                    "KIBAN_QDRANT_API_KEY": SECRET,
                },
            ),
            30,
        ),
    ]


def test_bad_environment_is_one_line_exit_2_and_fast(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    failures = []
    for name, bad, limit in env_cases(tmp_path):
        code, output, seconds = run_kiban(bad.args, bad.env, tmp_path / "home", limit)
        try:
            assert code == 2, output
            assert_one_clean_line(output, bad.says)
            assert seconds < limit
        except AssertionError as exc:
            failures.append(f"{name}: {exc}")
    assert not failures, "\n".join(failures)


def test_status_in_distributed_mode_needs_no_broker(tmp_path: Path) -> None:
    """`kiban status` reads the store only: a broker that is not there does not slow it."""
    env = {
        "KIBAN_MODE": "distributed",
        "KIBAN_BROKER_URL": f"redis://:{SECRET}@127.0.0.1:{closed_port()}/0",
    }
    code, output, seconds = run_kiban(["status"], env, tmp_path / "home", 20)
    assert code == 0, output
    assert "dead letters: 0" in output and seconds < 20


def test_wrong_broker_password_is_one_line(tmp_path: Path) -> None:
    """A real redis-server that wants another password: one line, the password masked."""
    from kiban_cli.stack import find_binary, free_ports, start_redis

    if find_binary("redis-server") is None:
        pytest.skip("redis-server not found: apt-get install -y redis-server")
    (port,) = free_ports(1)
    server = start_redis(tmp_path / "redis", port, password="the-right-one")
    try:
        env = {
            "KIBAN_MODE": "distributed",
            "KIBAN_BROKER_URL": f"redis://:{SECRET}@127.0.0.1:{port}/0",
        }
        code, output, seconds = run_kiban(["trigger", "nightly"], env, tmp_path / "home", 30)
        assert code == 2, output
        assert_one_clean_line(output, f"broker redis://:***@127.0.0.1:{port}/0")
        assert "pass" in output.lower()  # says why: the password (AUTH) was refused
        assert seconds < 30
    finally:
        server.stop()
