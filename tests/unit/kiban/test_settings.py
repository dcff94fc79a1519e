"""Settings: typed, from KIBAN_* variables, bad values named at start-up, all documented."""

from __future__ import annotations

import re

import pytest

from kiban.errors import ConfigurationError
from kiban.settings import Settings, load_settings, settings_table
from tests.conftest import REPO_ROOT


def test_defaults_are_the_embedded_mode(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("KIBAN_HOME", str(tmp_path))
    s = load_settings()
    assert s.mode == "embedded"
    assert s.resolved_store_uri == (tmp_path / "store").resolve().as_uri()
    assert s.resolved_qdrant_path == tmp_path / "qdrant"


def test_lists_and_maps_from_plain_env_strings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KIBAN_ORT_PROVIDERS", "CUDAExecutionProvider, CPUExecutionProvider")
    monkeypatch.setenv("KIBAN_ENCODE_POOLS", "vit-b-32=gpu, effnet=cpu")
    s = load_settings()
    assert s.ort_providers == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert s.encode_queue_for("vit-b-32") == "encode.gpu"
    assert s.encode_queue_for("other") == "encode"


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("KIBAN_BATCH_SIZE", "0"),
        ("KIBAN_BATCH_SIZE", "many"),
        ("KIBAN_STORE_URI", "ftp://host/x"),
        ("KIBAN_MODE", "cluster"),
        ("KIBAN_ENCODE_POOLS", "novalue"),
        ("KIBAN_PRICE_PER_HOUR", "-1"),
    ],
)
def test_bad_setting_fails_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, var: str, value: str
) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigurationError) as err:
        load_settings()
    assert var in str(err.value)


def test_secret_is_not_in_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KIBAN_QDRANT_API_KEY", "hunter2-secret")
    s = load_settings()
    assert "hunter2-secret" not in repr(s)
    assert "hunter2-secret" not in s.model_dump_json()


def test_every_setting_is_documented_in_the_readme() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    documented = set(re.findall(r"`(KIBAN_[A-Z0-9_]+)`", readme))
    expected = {Settings.env_name(name) for name in Settings.model_fields}
    assert expected <= documented, f"undocumented: {sorted(expected - documented)}"
    assert settings_table() in readme, "README settings table is stale: run `make docs`"
