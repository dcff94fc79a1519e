"""`kiban train` errors: one line, exit code 2, through the real embedded dispatch path."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from kiban.messages import TrainSpecialist
from kiban.store import open_store
from kiban_cli.main import app


def _error_lines(output: str) -> list[str]:
    """The error messages printed (rich wraps a long one at the console width)."""
    text = " ".join(output.split())
    return [f"error:{part}".strip() for part in text.split("error:")[1:]]


def test_invalid_options_fail_in_one_line() -> None:
    result = CliRunner().invoke(
        app, ["train", "--batch", "b1", "--base", "effnet", "--name", "no spaces allowed"]
    )
    assert result.exit_code == 2
    (line,) = _error_lines(result.output)
    assert line.startswith("error: invalid train request: name")
    result = CliRunner().invoke(
        app, ["train", "--batch", "b1", "--base", "e", "--name", "x", "--mode", "lora"]
    )
    assert result.exit_code == 2
    assert "invalid train request: mode" in result.output


def test_a_batch_that_is_not_ingested_is_dead_lettered_and_reported(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["train", "--batch", "nope", "--base", "effnet-lite0", "--name", "nope-head"]
    )
    assert result.exit_code == 2, result.output
    (line,) = _error_lines(result.output)
    assert "training nope-head failed" in line and "batch 'nope' is not ingested" in line
    # the message went through the task's failure path: a dead letter with its reason
    store = open_store((tmp_path / "kiban-home" / "store").as_uri())
    (letter,) = list(store.list(f"deadletter/{TrainSpecialist.task}"))
    record = json.loads(store.get(letter.key))
    assert record["payload"]["name"] == "nope-head"
    assert "not ingested" in record["reason"]
