"""`kiban up`'s supervisor: backoff, crash loops and restart bookkeeping, without processes."""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from kiban_cli import stack as stack_module
from kiban_cli.stack import LocalStack, RestartPolicy, Supervisor, describe_exit


def test_backoff_doubles_from_the_first_exit_and_is_capped() -> None:
    policy = RestartPolicy(initial=1, factor=2, cap=30)
    assert [policy.delay(n) for n in range(8)] == [0, 1, 2, 4, 8, 16, 30, 30]


def test_a_process_that_ran_long_enough_starts_the_backoff_over() -> None:
    policy = RestartPolicy(stable_after=60)
    assert policy.failures_after(4, ran_for=5) == 5  # still crashing
    assert policy.failures_after(4, ran_for=61) == 1  # it had been fine: a first exit
    assert policy.failures_after(0, ran_for=0) == 1


def test_crash_loop_after_the_configured_exits_in_a_row() -> None:
    policy = RestartPolicy(crash_loop_after=3)
    assert [policy.crash_loop(n) for n in (1, 2, 3, 9)] == [False, False, True, True]


def test_exit_descriptions_name_the_signal() -> None:
    assert describe_exit(-signal.SIGKILL) == "killed by SIGKILL"
    assert describe_exit(3) == "exit code 3"
    assert describe_exit(-200) == "killed by signal 200"


@dataclass
class FakePopen:
    pid: int
    code: int | None = None

    def poll(self) -> int | None:
        return self.code


@dataclass
class FakeProc:
    name: str
    popen: FakePopen
    log_path: Path
    stopped: bool = False
    args: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.popen.pid


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def supervised(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    pids = iter(range(200, 300))
    spawned: list[str] = []

    def respawn(proc: FakeProc) -> FakeProc:
        spawned.append(proc.name)
        return FakeProc(proc.name, FakePopen(next(pids)), proc.log_path)

    monkeypatch.setattr(stack_module, "respawn", respawn)
    stack = LocalStack(tmp_path)
    stack.procs["encoder-0"] = FakeProc("encoder-0", FakePopen(100), tmp_path / "e.log")  # type: ignore[assignment]
    stack.procs["ingest"] = FakeProc("ingest", FakePopen(101), tmp_path / "i.log")  # type: ignore[assignment]
    clock = Clock()
    events: list[str] = []
    policy = RestartPolicy(initial=1, factor=2, cap=8, stable_after=60, crash_loop_after=3)
    sup = Supervisor(stack, policy, lambda lines: events.extend(lines), clock=clock)
    return stack, sup, clock, events, spawned


def test_a_dead_worker_is_restarted_after_its_backoff_and_logged(supervised) -> None:
    stack, sup, clock, events, spawned = supervised
    assert sup.poll() == []  # everyone alive
    stack.procs["encoder-0"].popen.code = -signal.SIGKILL
    clock.now += 30
    (line,) = sup.poll()
    assert line == "encoder-0 (pid 100) killed by SIGKILL after 30s; restart #1 in 1s"
    assert spawned == []  # the backoff first
    clock.now += 0.5
    assert sup.poll() == []
    clock.now += 0.6
    (line,) = sup.poll()
    assert line == "encoder-0 restarted (pid 200, restart #1)"
    assert stack.procs["encoder-0"].pid == 200 and spawned == ["encoder-0"]
    assert events == [
        "encoder-0 (pid 100) killed by SIGKILL after 30s; restart #1 in 1s",
        "encoder-0 restarted (pid 200, restart #1)",
    ]
    state = sup.state()["encoder-0"]
    assert state["restarts"] == 1 and state["last_exit"] == "killed by SIGKILL"
    assert state["crash_loop"] is False and state["restart_in"] is None
    assert "restart #1" in (stack.procs["encoder-0"].log_path.read_text())  # in its own log


def test_a_crash_loop_backs_off_exponentially_and_says_so(supervised) -> None:
    stack, sup, clock, events, spawned = supervised
    delays = []
    for _ in range(5):
        stack.procs["ingest"].popen.code = 1
        clock.now += 2  # dies 2 s after every start
        (line,) = sup.poll()
        delays.append(sup.records["ingest"].restart_at - clock.now)
        clock.now = sup.records["ingest"].restart_at
        sup.poll()
    assert delays == [1, 2, 4, 8, 8]
    assert "crash loop: 3 exits in a row" in events[4]
    state = sup.state()["ingest"]
    assert state["restarts"] == 5 and state["crash_loop"] is True
    assert state["last_exit"] == "exit code 1"
    # a long healthy run forgives the past
    stack.procs["ingest"].popen.code = 1
    clock.now += 120
    sup.poll()
    assert sup.records["ingest"].restart_at - clock.now == 1


def test_processes_stopped_on_purpose_or_replaced_are_left_alone(supervised) -> None:
    stack, sup, clock, events, spawned = supervised
    sup.poll()
    stack.procs["encoder-0"].stopped = True
    stack.procs["encoder-0"].popen.code = 0
    clock.now += 5
    assert sup.poll() == []
    # its owner starts a new one under the same name (as a test does): followed, not restarted
    stack.procs["encoder-0"] = FakeProc("encoder-0", FakePopen(150), stack.home / "e.log")
    assert sup.poll() == [] and spawned == []
    assert sup.records["encoder-0"].pid == 150


def test_nothing_is_restarted_after_stop(supervised) -> None:
    stack, sup, clock, events, spawned = supervised
    stack.procs["ingest"].popen.code = 1
    sup.poll()
    sup.stop()
    clock.now += 100
    assert sup.poll() == [] and spawned == []
