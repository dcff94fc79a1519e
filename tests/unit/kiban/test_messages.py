"""Queue messages: versioned, strict, and rejected with a reason that names the field."""

from __future__ import annotations

import pytest

from kiban.errors import InvalidMessageError
from kiban.messages import EncodeChunk, EvaluateBatch, IngestBatch, RunPlan, parse_message


def test_valid_ingest_message_round_trips() -> None:
    msg = IngestBatch(
        batch_id="night-2026-11-28", source="s3://b/p", plan=RunPlan(models=["a", "b"])
    )
    again = parse_message(msg.model_dump(mode="json"), IngestBatch)
    assert again == msg
    assert again.version == 1
    assert again.plan.k == [1, 3, 5]


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"batch_id": "../etc", "source": "file:///x"}, "batch_id"),
        ({"batch_id": "ok", "source": ""}, "source"),
        ({"batch_id": "ok", "source": "file:///x", "unexpected": 1}, "unexpected"),
        ({"batch_id": "ok", "source": "file:///x", "version": 2}, "version"),
        ({"batch_id": "ok", "source": "file:///x", "chunk_size": 0}, "chunk_size"),
    ],
)
def test_invalid_messages_name_the_problem(payload: dict, field: str) -> None:
    with pytest.raises(InvalidMessageError) as err:
        parse_message(payload, IngestBatch)
    assert field in str(err.value)
    assert "IngestBatch" in str(err.value)


def test_encode_chunk_rejects_negative_chunk_and_bad_model_name() -> None:
    with pytest.raises(InvalidMessageError, match="chunk"):
        parse_message({"batch_id": "b", "model": "m", "chunk": -1}, EncodeChunk)
    with pytest.raises(InvalidMessageError, match="model"):
        parse_message({"batch_id": "b", "model": "a/b", "chunk": 0}, EncodeChunk)


def test_evaluate_needs_models_and_positive_k() -> None:
    with pytest.raises(InvalidMessageError, match="models"):
        parse_message({"batch_id": "b", "models": []}, EvaluateBatch)
    with pytest.raises(InvalidMessageError, match="k"):
        parse_message({"batch_id": "b", "models": ["m"], "k": [0]}, EvaluateBatch)


def test_non_dict_payload_is_rejected() -> None:
    with pytest.raises(InvalidMessageError):
        parse_message("not a message", IngestBatch)


def test_readme_message_examples_are_valid() -> None:
    """Operations teams copy these: every documented example must validate as its kind."""
    import json
    import re

    from kiban.messages import parse_any, registry
    from tests.conftest import REPO_ROOT

    readme = (REPO_ROOT / "README.md").read_text()
    examples = re.findall(r"#### `(\w+)` → task `([\w.]+)`.*?```json\n(.*?)```", readme, re.S)
    assert {kind for kind, _, _ in examples} == set(registry())
    for kind, task, body in examples:
        assert registry()[kind].task == task
        message = parse_any(json.loads(body)["message"])
        assert isinstance(message, registry()[kind])


def test_readme_generated_sections_are_current() -> None:
    """The message section and the settings table are generated (`make docs`), never stale."""
    import importlib.util

    from tests.conftest import REPO_ROOT

    spec = importlib.util.spec_from_file_location("regen", REPO_ROOT / "tools/regen_readme.py")
    assert spec is not None and spec.loader is not None
    regen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(regen)
    text = (REPO_ROOT / "README.md").read_text()
    assert regen.render(text) == text, "README is stale: run `make docs`"


def test_any_message_is_parsed_by_its_kind() -> None:
    from kiban.messages import IndexShard, parse_any

    msg = parse_any({"kind": "index_shard", "batch_id": "b", "model": "m", "chunk": 2})
    assert isinstance(msg, IndexShard) and msg.chunk == 2
    with pytest.raises(InvalidMessageError, match="index_shard.chunk"):
        parse_any({"kind": "index_shard", "batch_id": "b", "model": "m", "chunk": -1})
    with pytest.raises(InvalidMessageError, match="does not match any"):
        parse_any({"kind": "no_such_kind"})
