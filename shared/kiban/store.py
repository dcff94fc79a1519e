"""Object storage behind one small interface: a local directory or an S3 bucket prefix.

The embedded default keeps everything in a directory (``file://``); the distributed
deployment points the same code at S3 (AWS, MinIO, SeaweedFS) through boto3. Keys are
always relative to the configured prefix and can never escape it. S3 errors that mean
"try again later" leave this module as ``kiban.transient.TransientError``.

What a store reads, and what it refuses (a source is somebody else's folder or bucket, and
its content is not trusted):

* **Only regular files.** A ``FileStore`` walks every folder on the way to an object without
  following symbolic links (``O_NOFOLLOW`` at each step, relative to the root) and checks
  with ``lstat`` that the object is a regular file *before* opening it; the open itself uses
  ``O_NONBLOCK | O_NOFOLLOW`` and ``fstat`` is checked again, so a file swapped for a FIFO
  or a device in between can neither hang nor be read. FIFOs, sockets and devices are
  refused without being opened.
* **Symbolic links.** A link to a regular file whose resolved target lies *inside* the root
  is followed (it is the same bytes as the target, which ingest de-duplicates); a link that
  resolves outside the root, a dangling link, a link loop, and a link to a folder are never
  followed. Writes and deletes never go through a link.
* **Bounded reads.** ``get(key, max_bytes)`` (default: the store's ``max_object_bytes``)
  reads at most ``max_bytes + 1`` bytes while streaming, file or S3 body, and raises
  ``ObjectTooLargeError``; it never reads the whole object first.
* **Listing never aborts on one entry.** An entry that cannot be an object — a name that is
  not UTF-8, has control characters or cannot be a key, a FIFO, a socket, a device, a link
  out of the root, a folder that cannot be read — is listed with ``ObjectInfo.problem`` set
  (its key is then a printable rendering, ``printable_key``), so the caller can quarantine
  it with its reason and go on. Only a root that cannot be listed at all is an error.
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol
from urllib.parse import unquote, urlparse

from kiban.errors import ObjectRefusedError, ObjectTooLargeError, StoreError
from kiban.transient import s3_is_transient, translated

#: Bytes read per call while streaming an object.
READ_CHUNK = 1 << 20
#: Longest key kiban accepts (S3's own limit), in UTF-8 bytes.
MAX_KEY_BYTES = 1024

_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_LINK_ERRNOS = (errno.ELOOP, errno.EMLINK)  # O_NOFOLLOW met a link (Linux, BSD)


@dataclass(frozen=True)
class ObjectInfo:
    """One listing entry. ``problem`` set: it cannot be read as an object (why, in a few
    content-free words); ``key`` is then ``printable_key`` of the name as listed."""

    key: str
    size: int
    problem: str | None = None


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


def _is_control(code: int) -> bool:
    return code < 0x20 or 0x7F <= code < 0xA0


def printable_key(key: str) -> str:
    """``key`` as text that survives JSON, logs and terminals: bytes that were not UTF-8
    (Python's surrogateescape) as ``\\xNN``, control characters escaped (``\\n``, ``\\x1b``)."""
    out = []
    for char in key:
        code = ord(char)
        if 0xDC80 <= code <= 0xDCFF:
            out.append(f"\\x{code - 0xDC00:02x}")
        elif 0xD800 <= code <= 0xDFFF:
            out.append(f"\\u{code:04x}")
        elif _is_control(code):
            out.append(repr(char)[1:-1])
        else:
            out.append(char)
    return "".join(out)


def key_problem(key: str) -> str | None:
    """Why a listed name cannot be a kiban object key (content-free words), or None."""
    if any(0xD800 <= ord(c) <= 0xDFFF for c in key):
        return "name is not valid UTF-8"
    if any(_is_control(ord(c)) for c in key):
        return "name contains control characters"
    if "\\" in key:
        return "name contains a backslash"
    if len(key.encode()) > MAX_KEY_BYTES:
        return f"name longer than {MAX_KEY_BYTES} bytes"
    try:
        normal = safe_key(key)
    except StoreError:
        return "name is not a relative key ('.', '..' or absolute)"
    if normal != key:
        return "name is not a normal key (empty or '.' segments)"
    return None


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "folder"
    if stat.S_ISFIFO(mode):
        return "named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode):
        return "character device"
    if stat.S_ISBLK(mode):
        return "block device"
    if stat.S_ISLNK(mode):
        return "symbolic link"
    return "special file"


def read_bounded(read: Callable[[int], bytes], limit: int | None, what: str) -> bytes:
    """Everything ``read`` yields, reading at most ``limit + 1`` bytes: more is refused."""
    chunks: list[bytes] = []
    total = 0
    while True:
        want = READ_CHUNK if limit is None else min(READ_CHUNK, limit + 1 - total)
        chunk = read(want)
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        chunks.append(chunk)
        if limit is not None and total > limit:
            raise _too_large(what, limit)


def _too_large(what: str, limit: int) -> ObjectTooLargeError:
    reason = f"too large: more than {limit} bytes (KIBAN_MAX_OBJECT_BYTES)"
    return ObjectTooLargeError(f"{what}: {reason}", reason)


class ObjectStore(Protocol):
    """What kiban needs from object storage, and nothing more."""

    uri: str

    def get(self, key: str, max_bytes: int | None = None) -> bytes: ...

    def put(self, key: str, data: bytes) -> None: ...

    def exists(self, key: str) -> bool: ...

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]: ...

    def delete(self, key: str) -> None: ...


_Found = list[tuple[str, Path, "os.stat_result | OSError"]]
_Scanned = list[tuple[Path, "os.stat_result | OSError"]]  # a folder's sorted entries


class _LinkOnPathError(Exception):
    """Internal: a symbolic link was met on the way to an object."""


def _is_link(name: str, dir_fd: int) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


class FileStore:
    """A directory used as an object store; writes are atomic (temp file + rename).

    Reads only regular files beneath the root, never through a link that leaves it, and
    at most ``max_object_bytes`` per object (None: unbounded; see the module docstring).
    """

    def __init__(self, root: Path, max_object_bytes: int | None = None) -> None:
        self.root = root.resolve()
        self.uri = self.root.as_uri()
        self.max_object_bytes = max_object_bytes

    # -- walking beneath the root without following links ------------------------------

    def _dir_fd(self, parts: list[str], create: bool = False) -> int:
        """A descriptor of ``root/parts…``, each step opened with O_NOFOLLOW."""
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root, os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC)
        try:
            for part in parts:
                if create:
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(part, dir_fd=fd)
                try:
                    nxt = os.open(
                        part, os.O_RDONLY | _O_DIRECTORY | _O_NOFOLLOW | _O_CLOEXEC, dir_fd=fd
                    )
                except OSError as exc:
                    if exc.errno in _LINK_ERRNOS or (
                        exc.errno == errno.ENOTDIR and _is_link(part, fd)
                    ):
                        raise _LinkOnPathError from None
                    raise
                os.close(fd)
                fd = nxt
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _inside(self, real: str) -> str | None:
        """``real`` (a resolved path) relative to the root, or None when outside it."""
        root = str(self.root)
        if real == root:
            return ""
        base = root.rstrip("/") + "/"
        return real[len(base) :] if real.startswith(base) else None

    def _open_regular(self, key: str, rel: str, open_file: bool) -> tuple[int, os.stat_result]:
        """Check (lstat) then open (O_NONBLOCK|O_NOFOLLOW) a regular file; fd -1 if not opened."""
        parts = rel.split("/")
        dfd = self._dir_fd(parts[:-1])
        try:
            st = os.stat(parts[-1], dir_fd=dfd, follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                raise _LinkOnPathError
            if not stat.S_ISREG(st.st_mode):
                raise self._refused(key, f"not a regular file ({_kind(st.st_mode)}): not opened")
            if not open_file:
                return -1, st
            try:
                fd = os.open(
                    parts[-1], os.O_RDONLY | _O_NOFOLLOW | _O_NONBLOCK | _O_CLOEXEC, dir_fd=dfd
                )
            except OSError as exc:
                if exc.errno in _LINK_ERRNOS:
                    raise _LinkOnPathError from None
                if exc.errno == errno.ENXIO:  # a socket swapped in after the lstat
                    raise self._refused(key, "not a regular file: not opened") from None
                raise
        finally:
            os.close(dfd)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # swapped after the lstat: never read
            os.close(fd)
            raise self._refused(key, f"not a regular file ({_kind(st.st_mode)}): not read")
        return fd, st

    def _refused(self, key: str, reason: str) -> ObjectRefusedError:
        return ObjectRefusedError(f"{key!r} in {self.uri}: {reason}", reason)

    def _locate(self, key: str, open_file: bool = True) -> tuple[int, os.stat_result]:
        """The regular file at ``key``; a link on the way is followed only inside the root."""
        rel = safe_key(key)
        try:
            return self._open_regular(key, rel, open_file)
        except _LinkOnPathError:
            pass
        real = os.path.realpath(self.root / rel)
        inside = self._inside(real)
        if inside is None:
            raise self._refused(key, "symbolic link to a path outside the source: not followed")
        if not inside:
            raise self._refused(key, "symbolic link to the source folder itself: not followed")
        try:
            os.stat(real)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise self._refused(key, "symbolic link loop: not followed") from None
            raise
        try:
            return self._open_regular(key, inside, open_file)
        except _LinkOnPathError:
            raise self._refused(key, "symbolic links changed while being read") from None

    # -- the ObjectStore interface ------------------------------------------------------

    def get(self, key: str, max_bytes: int | None = None) -> bytes:
        limit = self.max_object_bytes if max_bytes is None else max_bytes
        try:
            fd, st = self._locate(key)
        except (FileNotFoundError, NotADirectoryError):
            raise StoreError(f"no object {key!r} in {self.uri}") from None
        except OSError as exc:
            raise StoreError(f"cannot read {key!r} in {self.uri}: {exc.strerror or exc}") from exc
        with os.fdopen(fd, "rb", buffering=0) as fh:
            what = f"{key!r} in {self.uri}"
            if limit is not None and st.st_size > limit:
                raise _too_large(what, limit)
            try:
                return read_bounded(fh.read, limit, what)
            except OSError as exc:
                raise StoreError(f"cannot read {what}: {exc.strerror or exc}") from exc

    def put(self, key: str, data: bytes) -> None:
        self._write(key, lambda fh: fh.write(data))

    def put_file(self, key: str, path: Path) -> None:
        """Store the file at ``path`` under ``key``, copied in blocks (never whole in memory),
        atomically like ``put``."""
        with open(path, "rb") as src:
            self._write(key, lambda fh: shutil.copyfileobj(src, fh, READ_CHUNK))

    def _write(self, key: str, fill: Callable[[BinaryIO], object]) -> None:
        parts = safe_key(key).split("/")
        try:
            dfd = self._dir_fd(parts[:-1], create=True)
        except _LinkOnPathError:
            raise StoreError(
                f"cannot write {key!r} in {self.uri}: a folder on the way is a symbolic link "
                "(never written through)"
            ) from None
        except OSError as exc:
            raise StoreError(f"cannot write {key!r} in {self.uri}: {exc.strerror or exc}") from exc
        tmp = f".tmp-{secrets.token_hex(8)}"
        try:
            fd = os.open(
                tmp,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC,
                0o600,
                dir_fd=dfd,
            )
            try:
                with os.fdopen(fd, "wb") as fh:
                    fill(fh)
                os.replace(tmp, parts[-1], src_dir_fd=dfd, dst_dir_fd=dfd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=dfd)
                raise
        except OSError as exc:
            raise StoreError(f"cannot write {key!r} in {self.uri}: {exc.strerror or exc}") from exc
        finally:
            os.close(dfd)

    def exists(self, key: str) -> bool:
        try:
            self._locate(key, open_file=False)
        except (StoreError, OSError):
            return False
        return True

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        if not prefix:
            yield from self._walk(self.root)
            return
        rel = safe_key(prefix)
        base = self.root / rel
        if os.path.realpath(base.parent) != str(base.parent):
            yield ObjectInfo(rel, 0, "a folder on the way is a symbolic link: not followed")
            return
        try:
            st = os.lstat(base)
        except OSError:
            return
        if stat.S_ISDIR(st.st_mode):
            yield from self._walk(base)
        else:
            yield self._entry(base, rel, st)

    def _walk(self, top: Path) -> Iterator[ObjectInfo]:
        """Every entry under ``top`` except hidden ones, in ascending key order.

        Key order, not merely "depth first, names sorted": a folder sorts as its name plus
        ``/`` among its siblings, so ``a.jpg`` (``.`` < ``/``) comes before everything in
        ``a/`` and ``a/b.jpg`` before ``a0.jpg``, exactly as the keys compare as strings (and as
        S3 lists). Ingest streams the listing in pages and relies on it. Only the folders on
        the current path are open at a time (one sorted list of names per level).
        """
        stack: list[Iterator[tuple[Path, os.stat_result | OSError]]] = []
        scanned = self._scan(top)
        if isinstance(scanned, ObjectInfo):
            yield scanned
            return
        stack.append(iter(scanned))
        while stack:
            item = next(stack[-1], None)
            if item is None:
                stack.pop()
                continue
            path, st = item
            rel = path.relative_to(self.root).as_posix()
            if isinstance(st, OSError):
                yield ObjectInfo(printable_key(rel), 0, f"cannot stat: {st.strerror or st}")
                continue
            if stat.S_ISDIR(st.st_mode):
                problem = key_problem(rel)
                if problem:
                    yield ObjectInfo(printable_key(rel) + "/", 0, f"folder {problem}: not listed")
                    continue
                scanned = self._scan(path)
                if isinstance(scanned, ObjectInfo):
                    yield scanned
                else:
                    stack.append(iter(scanned))
                continue
            yield self._entry(path, rel, st)

    def _scan(self, folder: Path) -> _Scanned | ObjectInfo:
        """A folder's visible entries with their lstat, sorted as keys (folders as
        ``name/``); a sub-folder that cannot be read is one problem entry."""
        try:
            with os.scandir(folder) as scan:
                found: _Found = []
                for entry in scan:
                    if entry.name.startswith("."):
                        continue
                    try:
                        st: os.stat_result | OSError = entry.stat(follow_symlinks=False)
                    except OSError as exc:
                        st = exc
                    folder_like = not isinstance(st, OSError) and stat.S_ISDIR(st.st_mode)
                    found.append((entry.name + ("/" if folder_like else ""), Path(entry.path), st))
        except OSError as exc:
            if folder == self.root and isinstance(exc, FileNotFoundError):
                return []  # a store not written to yet holds nothing
            if folder == self.root:
                raise StoreError(f"cannot list {self.uri}: {exc.strerror or exc}") from exc
            rel = folder.relative_to(self.root).as_posix()
            return ObjectInfo(
                printable_key(rel) + "/", 0, f"cannot list folder: {exc.strerror or exc}"
            )
        found.sort(key=lambda f: f[0])
        return [(path, st) for _, path, st in found]

    def _entry(self, path: Path, rel: str, st: os.stat_result) -> ObjectInfo:
        """What one non-folder entry is: an object, or a problem with its reason."""
        problem = key_problem(rel)
        if problem:
            return ObjectInfo(printable_key(rel), 0, problem)
        if stat.S_ISREG(st.st_mode):
            return ObjectInfo(rel, st.st_size)
        if not stat.S_ISLNK(st.st_mode):
            return ObjectInfo(rel, 0, f"not a regular file ({_kind(st.st_mode)}): not opened")
        real = os.path.realpath(path)
        if self._inside(real) is None:
            return ObjectInfo(rel, 0, "symbolic link to a path outside the source: not followed")
        try:
            target = os.stat(real)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return ObjectInfo(rel, 0, "dangling symbolic link")
            if exc.errno == errno.ELOOP:
                return ObjectInfo(rel, 0, "symbolic link loop: not followed")
            return ObjectInfo(rel, 0, f"cannot stat link target: {exc.strerror or exc}")
        if stat.S_ISDIR(target.st_mode):
            return ObjectInfo(rel, 0, "symbolic link to a folder: not followed")
        if not stat.S_ISREG(target.st_mode):
            return ObjectInfo(rel, 0, f"symbolic link to a {_kind(target.st_mode)}: not opened")
        return ObjectInfo(rel, target.st_size)

    def delete(self, key: str) -> None:
        parts = safe_key(key).split("/")
        try:
            dfd = self._dir_fd(parts[:-1])
        except (FileNotFoundError, NotADirectoryError):
            return
        except _LinkOnPathError:
            raise StoreError(
                f"cannot delete {key!r} in {self.uri}: a folder on the way is a symbolic link"
            ) from None
        except OSError as exc:
            raise StoreError(f"cannot delete {key!r} in {self.uri}: {exc.strerror}") from exc
        try:
            os.unlink(parts[-1], dir_fd=dfd)  # a link itself is removed, never its target
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StoreError(f"cannot delete {key!r} in {self.uri}: {exc.strerror}") from exc
        finally:
            os.close(dfd)


class S3Store:
    """A bucket prefix on any S3-compatible server, credentials from the AWS chain."""

    def __init__(
        self,
        bucket: str,
        prefix: str,
        endpoint_url: str | None = None,
        region: str | None = None,
        create_bucket: bool = False,
        max_object_bytes: int | None = None,
    ) -> None:
        import boto3
        from botocore.config import Config

        self.max_object_bytes = max_object_bytes
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
                try:
                    self._s3.create_bucket(Bucket=self.bucket)
                except ClientError as err:
                    if s3_is_transient(err):
                        raise
                    code = err.response.get("Error", {}).get("Code", "")
                    raise StoreError(f"{self.uri}: cannot create the bucket: {code}") from None

    def _key(self, key: str) -> str:
        key = safe_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def get(self, key: str, max_bytes: int | None = None) -> bytes:
        from botocore.exceptions import ClientError

        limit = self.max_object_bytes if max_bytes is None else max_bytes
        what = f"{key!r} in {self.uri}"
        try:
            with self._errors():
                response = self._s3.get_object(Bucket=self.bucket, Key=self._key(key))
                body = response["Body"]
                try:
                    if limit is not None and int(response.get("ContentLength") or 0) > limit:
                        raise _too_large(what, limit)
                    return read_bounded(body.read, limit, what)  # streamed, never all first
                finally:
                    body.close()  # an unread rest is dropped with the connection
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound"):
                raise StoreError(f"no object {key!r} in {self.uri}") from None
            raise StoreError(f"cannot read {key!r} in {self.uri}: {code}") from exc

    def put(self, key: str, data: bytes) -> None:
        from botocore.exceptions import ClientError

        try:
            with self._errors():
                self._s3.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
        except ClientError as exc:  # access denied, no such bucket: one clear line
            code = exc.response.get("Error", {}).get("Code", "")
            raise StoreError(f"cannot write {key!r} in {self.uri}: {code}") from exc

    def put_file(self, key: str, path: Path) -> None:
        """Upload the file at ``path`` (boto3 ``upload_file``: multipart above 8 MiB, read in
        parts, never whole in memory)."""
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import ClientError

        try:
            with self._errors():
                self._s3.upload_file(str(path), self.bucket, self._key(key))
        except (ClientError, S3UploadFailedError) as exc:
            raise StoreError(f"cannot write {key!r} in {self.uri}: {exc}") from exc

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
                if any(p.startswith(".") and p not in (".", "..") for p in rel.split("/")):
                    continue  # hidden; '.' and '..' segments are listed as problems below
                problem = key_problem(rel)
                if problem:
                    yield ObjectInfo(printable_key(rel), int(obj["Size"]), problem)
                else:
                    yield ObjectInfo(rel, int(obj["Size"]))

    def delete(self, key: str) -> None:
        with self._errors():
            self._s3.delete_object(Bucket=self.bucket, Key=self._key(key))


def put_file(store: ObjectStore, key: str, path: Path) -> None:
    """Store a local file under ``key`` without holding it in memory where the store can
    stream (``FileStore``, ``S3Store``: their ``put_file``); any other store gets ``put``.

    A function rather than a member of ``ObjectStore``, so read-only sources and test stores
    need not implement it."""
    method = getattr(store, "put_file", None)
    if method is not None:
        method(key, path)
    else:
        store.put(key, Path(path).read_bytes())


def open_store(
    uri: str,
    endpoint_url: str | None = None,
    region: str | None = None,
    create: bool = False,
    max_object_bytes: int | None = None,
) -> ObjectStore:
    """Open ``file:///dir`` or ``s3://bucket/prefix``; ``create`` makes the dir or bucket.

    ``max_object_bytes`` bounds every ``get`` (None: unbounded; a source is opened with
    ``KIBAN_MAX_OBJECT_BYTES``). A directory that cannot be created is one StoreError.
    """
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        root = file_uri_path(uri)
        if create:
            try:
                root.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(
                    f"{uri}: cannot create the directory: {exc.strerror or exc}"
                ) from None
        if not root.is_dir():
            raise StoreError(f"{uri}: no such directory")
        return FileStore(root, max_object_bytes)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StoreError(f"{uri}: missing bucket name (s3://bucket/prefix)")
        return S3Store(parsed.netloc, parsed.path, endpoint_url, region, create, max_object_bytes)
    if parsed.scheme == "synthetic":  # read-only generated images (load tests)
        from kiban.synthetic_source import open_synthetic

        return open_synthetic(uri, max_object_bytes)
    if not parsed.scheme and uri:
        return open_store(
            Path(uri).resolve().as_uri(), endpoint_url, region, create, max_object_bytes
        )
    raise StoreError(
        f"unsupported store URI {uri!r}: use file:///dir or s3://bucket/prefix "
        "(or, as a read-only source, synthetic://textures?n=N)"
    )


def file_uri_path(uri: str) -> Path:
    """The local path of a ``file://`` URI (``file:///dir`` or ``file://dir``), unresolved."""
    parsed = urlparse(uri)
    return (
        Path(unquote(parsed.netloc + parsed.path)) if parsed.netloc else Path(unquote(parsed.path))
    )
