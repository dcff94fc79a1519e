"""Object storage behind one small interface: a local directory or an S3 bucket prefix.

The embedded default keeps everything in a directory (``file://``); the distributed
deployment points the same code at S3 (AWS, MinIO, SeaweedFS) through boto3. Keys are
always relative to the configured prefix and can never escape it. S3 errors that mean
"try again later" leave this module as ``kiban.transient.TransientError``.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlparse

from kiban.errors import StoreError
from kiban.transient import s3_is_transient, translated


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int


def safe_key(key: str) -> str:
    """Normalise ``key`` and refuse anything that would leave the store prefix."""
    if not key or "\x00" in key or "\\" in key:
        raise StoreError(f"invalid object key {key!r}")
    if key.startswith("/"):
        raise StoreError(f"object key {key!r} is absolute; keys are relative to the store prefix")
    parts = key.split("/")
    if any(part in ("..", ".") for part in parts):
        raise StoreError(f"object key {key!r} escapes the store prefix ('..' or '.' segment)")
    normalised = posixpath.normpath(key)
    if normalised.startswith(".."):
        raise StoreError(f"object key {key!r} escapes the store prefix")
    return normalised


def join_key(*parts: str) -> str:
    return safe_key("/".join(p.strip("/") for p in parts if p))


class ObjectStore(Protocol):
    """What kiban needs from object storage, and nothing more."""

    uri: str

    def get(self, key: str) -> bytes: ...

    def put(self, key: str, data: bytes) -> None: ...

    def exists(self, key: str) -> bool: ...

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]: ...

    def delete(self, key: str) -> None: ...


class FileStore:
    """A directory used as an object store; writes are atomic (temp file + rename)."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.uri = self.root.as_uri()

    def _path(self, key: str) -> Path:
        return self.root / safe_key(key)

    def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise StoreError(f"no object {key!r} in {self.uri}") from None
        except OSError as exc:
            raise StoreError(f"cannot read {key!r} in {self.uri}: {exc}") from exc

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        base = self._path(prefix) if prefix else self.root
        if base.is_file():
            yield ObjectInfo(safe_key(prefix), base.stat().st_size)
            return
        if not base.is_dir():
            return
        for dirpath, dirnames, filenames in os.walk(base, followlinks=False):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if name.startswith("."):
                    continue
                full = Path(dirpath) / name
                rel = full.relative_to(self.root).as_posix()
                yield ObjectInfo(rel, full.stat().st_size)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)


class S3Store:
    """A bucket prefix on any S3-compatible server, credentials from the AWS chain."""

    def __init__(
        self,
        bucket: str,
        prefix: str,
        endpoint_url: str | None = None,
        region: str | None = None,
        create_bucket: bool = False,
    ) -> None:
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        config = Config(retries={"max_attempts": 8, "mode": "standard"}, connect_timeout=10)
        # A session of its own: boto3's default session caches the first credentials it
        # resolves for the life of the process and is not safe to share between threads.
        self._s3 = boto3.session.Session().client(
            "s3", endpoint_url=endpoint_url, region_name=region or "us-east-1", config=config
        )
        if create_bucket:
            self._ensure_bucket()

    def _errors(self) -> contextlib.AbstractContextManager[None]:
        return translated(f"S3 {self.uri}", s3_is_transient)

    def _ensure_bucket(self) -> None:
        from botocore.exceptions import ClientError

        with self._errors():
            try:
                self._s3.head_bucket(Bucket=self.bucket)
            except ClientError as exc:
                if s3_is_transient(exc):
                    raise
                self._s3.create_bucket(Bucket=self.bucket)

    def _key(self, key: str) -> str:
        key = safe_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def get(self, key: str) -> bytes:
        from botocore.exceptions import ClientError

        try:
            with self._errors():
                body = self._s3.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
                return bytes(body.read())
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound"):
                raise StoreError(f"no object {key!r} in {self.uri}") from None
            raise StoreError(f"cannot read {key!r} in {self.uri}: {code}") from exc

    def put(self, key: str, data: bytes) -> None:
        with self._errors():
            self._s3.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            with self._errors():
                self._s3.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code", "") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        full = self._key(prefix) if prefix else (self.prefix + "/" if self.prefix else "")
        if prefix and not full.endswith("/"):
            full += "/"
        strip = len(self.prefix) + 1 if self.prefix else 0
        paginator = self._s3.get_paginator("list_objects_v2")
        pages = iter(paginator.paginate(Bucket=self.bucket, Prefix=full))
        while True:
            with self._errors():
                page = next(pages, None)
            if page is None:
                return
            for obj in page.get("Contents", []):
                rel = obj["Key"][strip:]
                if not rel or rel.endswith("/"):
                    continue
                if any(part.startswith(".") for part in rel.split("/")):
                    continue
                yield ObjectInfo(rel, int(obj["Size"]))

    def delete(self, key: str) -> None:
        with self._errors():
            self._s3.delete_object(Bucket=self.bucket, Key=self._key(key))


def open_store(
    uri: str,
    endpoint_url: str | None = None,
    region: str | None = None,
    create: bool = False,
) -> ObjectStore:
    """Open ``file:///dir`` or ``s3://bucket/prefix``; ``create`` makes the dir or bucket."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        root = (
            Path(unquote(parsed.netloc + parsed.path))
            if parsed.netloc
            else Path(unquote(parsed.path))
        )
        if create:
            root.mkdir(parents=True, exist_ok=True)
        elif not root.is_dir():
            raise StoreError(f"{uri}: no such directory")
        return FileStore(root)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StoreError(f"{uri}: missing bucket name (s3://bucket/prefix)")
        return S3Store(parsed.netloc, parsed.path, endpoint_url, region, create_bucket=create)
    if not parsed.scheme and uri:
        return open_store(Path(uri).resolve().as_uri(), endpoint_url, region, create)
    raise StoreError(f"unsupported store URI {uri!r}: use file:///dir or s3://bucket/prefix")
