"""check_location: in distributed mode a message reaches only the allowed roots and buckets."""

from __future__ import annotations

from pathlib import Path

import pytest

from kiban.errors import ForbiddenLocationError, KibanError
from kiban.locations import check_location, is_under
from kiban.settings import Settings


@pytest.fixture
def layout(tmp_path: Path) -> Path:
    (tmp_path / "data" / "night").mkdir(parents=True)
    (tmp_path / "data2").mkdir()
    (tmp_path / "etc").mkdir()
    (tmp_path / "data" / "escape").symlink_to(tmp_path / "etc")  # a link out of the root
    (tmp_path / "data" / "inner").symlink_to(tmp_path / "data" / "night")
    (tmp_path / "link-to-data").symlink_to(tmp_path / "data")  # a link *to* the root
    return tmp_path


def distributed(root: Path, **extra: object) -> Settings:
    return Settings(mode="distributed", allowed_roots=[str(root / "data")], **extra)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("relative", "allowed"),
    [
        ("data", True),
        ("data/", True),
        ("data/night/", True),
        ("data/night/manifest.csv", True),
        ("data/not-yet/created", True),  # an export destination may not exist yet
        ("data/inner/x.jpg", True),  # a link that stays inside
        ("link-to-data/night", True),  # a link leading into the root
        ("data2", False),  # the prefix trick: /data2 is not under /data
        ("data2/x", False),
        ("data/../etc", False),  # traversal
        ("data/night/../../etc/passwd", False),
        ("data/escape", False),  # a symbolic link out of the root
        ("data/escape/passwd", False),
        ("etc", False),
        ("", False),  # the parent of the root
    ],
)
def test_file_locations_under_allowed_roots(layout: Path, relative: str, allowed: bool) -> None:
    uri = "file://" + str(layout) + "/" + relative
    settings = distributed(layout)
    if allowed:
        resolved = check_location(uri, settings, "source")
        assert resolved.startswith((layout / "data").resolve().as_uri())
    else:
        with pytest.raises(ForbiddenLocationError, match=r"^source file://.*KIBAN_ALLOWED_ROOTS"):
            check_location(uri, settings, "source")


def test_plain_and_relative_paths(layout: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = distributed(layout)
    assert check_location(str(layout / "data" / "night"), settings, "source").startswith("file://")
    monkeypatch.chdir(layout / "data")
    with pytest.raises(ForbiddenLocationError, match="relative path is not accepted"):
        check_location("night", settings, "source")


def test_host_paths_refused(layout: Path) -> None:
    settings = distributed(layout)
    for uri in ["file:///etc/passwd", "file:///", "file:///proc/self/environ", "/etc"]:
        with pytest.raises(ForbiddenLocationError):
            check_location(uri, settings, "manifest")


def test_no_roots_means_no_local_paths(layout: Path) -> None:
    settings = Settings(mode="distributed")
    with pytest.raises(ForbiddenLocationError, match="unless KIBAN_ALLOWED_ROOTS"):
        check_location((layout / "data").as_uri(), settings, "export destination")


def test_buckets(layout: Path) -> None:
    open_buckets = Settings(mode="distributed")
    assert check_location("s3://any/x", open_buckets, "source") == "s3://any/x"
    settings = distributed(layout, allowed_buckets=["images", "reports"])
    assert check_location("s3://images/night/", settings, "source") == "s3://images/night/"
    for uri in ["s3://images2/x", "s3://other/images/x", "s3://imag/x"]:
        with pytest.raises(ForbiddenLocationError, match="KIBAN_ALLOWED_BUCKETS"):
            check_location(uri, settings, "source")


def test_embedded_mode_is_unrestricted(layout: Path) -> None:
    settings = Settings(mode="embedded", allowed_roots=[str(layout / "data")])  # type: ignore[arg-type]
    assert check_location("file:///etc/", settings, "source") == "file:///etc/"


def test_root_that_is_a_link_and_error_class(layout: Path) -> None:
    settings = Settings(mode="distributed", allowed_roots=[str(layout / "link-to-data")])  # type: ignore[arg-type]
    check_location((layout / "data" / "night").as_uri(), settings, "source")
    assert issubclass(ForbiddenLocationError, KibanError)
    assert is_under("/data/x", "/data") and not is_under("/data2", "/data")
    assert is_under("/anything", "/")
