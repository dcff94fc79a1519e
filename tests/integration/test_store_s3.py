"""S3Store against a real S3 server (SeaweedFS): the same contract as FileStore."""

from __future__ import annotations

import pytest

from kiban.errors import StoreError
from kiban.store import ObjectInfo, open_store

pytestmark = pytest.mark.integration


def test_put_get_exists_delete(s3_server, s3_bucket: str) -> None:  # type: ignore[no-untyped-def]
    store = open_store(f"s3://{s3_bucket}/kiban", endpoint_url=s3_server.endpoint_url, create=True)
    assert store.uri == f"s3://{s3_bucket}/kiban"
    store.put("a/b/c.bin", b"hello")
    assert store.get("a/b/c.bin") == b"hello"
    assert store.exists("a/b/c.bin")
    assert not store.exists("a/b")
    store.put("a/b/c.bin", b"replaced")
    assert store.get("a/b/c.bin") == b"replaced"
    store.delete("a/b/c.bin")
    assert not store.exists("a/b/c.bin")
    # the object really lives under the prefix in the bucket
    store.put("x.txt", b"1")
    raw = s3_server.client().get_object(Bucket=s3_bucket, Key="kiban/x.txt")
    assert raw["Body"].read() == b"1"


def test_missing_key_is_store_error(s3_server, s3_bucket: str) -> None:  # type: ignore[no-untyped-def]
    store = open_store(f"s3://{s3_bucket}/p", endpoint_url=s3_server.endpoint_url, create=True)
    with pytest.raises(StoreError, match="no object 'nope.txt'"):
        store.get("nope.txt")
    assert not store.exists("nope.txt")


def test_list_strips_prefix_and_stays_inside_it(s3_server, s3_bucket: str) -> None:  # type: ignore[no-untyped-def]
    client = s3_server.client()
    client.create_bucket(Bucket=s3_bucket)
    keys = {
        "data/a/1.jpg": b"1",
        "data/a/sub/22.jpg": b"22",
        "data/b/333.jpg": b"333",
        "data/.hidden/x.jpg": b"h",
        "data/a/.dot.jpg": b"d",
        "data2/not-mine.jpg": b"no",  # shares the string prefix "data", not the folder
        "other/elsewhere.jpg": b"no",
    }
    for key, body in keys.items():
        client.put_object(Bucket=s3_bucket, Key=key, Body=body)
    store = open_store(f"s3://{s3_bucket}/data", endpoint_url=s3_server.endpoint_url)
    assert sorted(store.list(), key=lambda o: o.key) == [
        ObjectInfo("a/1.jpg", 1),
        ObjectInfo("a/sub/22.jpg", 2),
        ObjectInfo("b/333.jpg", 3),
    ]
    assert sorted(o.key for o in store.list("a")) == ["a/1.jpg", "a/sub/22.jpg"]
    whole = open_store(f"s3://{s3_bucket}", endpoint_url=s3_server.endpoint_url)
    assert "data2/not-mine.jpg" in {o.key for o in whole.list()}


def test_list_paginates(s3_server, s3_bucket: str) -> None:  # type: ignore[no-untyped-def]
    """More keys than one page holds: listing must follow continuation tokens.

    SeaweedFS honours MaxKeys, so a small page size in the paginator proves the
    pagination path without uploading 1,000 objects.
    """
    store = open_store(f"s3://{s3_bucket}/many", endpoint_url=s3_server.endpoint_url, create=True)
    for i in range(25):
        store.put(f"k/{i:03d}.bin", bytes([i]))
    client = s3_server.client()
    pages = list(
        client.get_paginator("list_objects_v2").paginate(
            Bucket=s3_bucket, Prefix="many/", PaginationConfig={"PageSize": 10}
        )
    )
    assert len(pages) == 3
    assert sorted(o.key for o in store.list()) == [f"k/{i:03d}.bin" for i in range(25)]


def test_escaping_keys_refused(s3_server, s3_bucket: str) -> None:  # type: ignore[no-untyped-def]
    store = open_store(f"s3://{s3_bucket}/p", endpoint_url=s3_server.endpoint_url, create=True)
    for bad in ["../x", "/abs", "a/../../b", "a\\b"]:
        with pytest.raises(StoreError):
            store.put(bad, b"x")
