"""A stack that looks after itself, with real processes: a SIGKILLed worker is restarted by
the supervisor (logged, counted), `kiban status` shows it dead before the restart and alive
after; `kiban up --detach` records each worker's metrics port and `kiban down` works from a
shell that sourced the env file `kiban up` wrote."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kiban.status import pid_running
from kiban_cli.stack import REDIS_MISSING, RestartPolicy, find_redis_server
from tests.integration.stack_fixtures import running_stack

pytestmark = pytest.mark.integration

#: The supervisor waits this long before the first restart, so that the test can look at the
#: stack while the worker is dead (the default policy waits 1 s).
FIRST_RESTART_SECONDS = 8.0


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KIBAN_")}
    env.update(extra)
    return env


def kiban(args: list[str], env: dict[str, str], timeout: float = 120, **kw: Any):
    return subprocess.run(
        [sys.executable, "-m", "kiban_cli.main", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        **kw,
    )


def live(env: dict[str, str]) -> dict[str, Any]:
    out = kiban(["status", "--live", "--json"], env)
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout)


def wait_for(what: str, check: Callable[[], Any], timeout: float = 90) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def worker(view: dict[str, Any], name: str) -> dict[str, Any]:
    (entry,) = [w for w in view["workers"] if w["name"] == name]
    return entry


def test_a_killed_worker_is_restarted_and_status_shows_it_dead_then_alive(
    tmp_path: Path,
) -> None:
    home = tmp_path / "home"  # KIBAN_HOME of the status command: the record is home/stack/
    state_file = home / "stack" / "stack.json"
    with running_stack(home / "stack", [("ingest", "ingest"), ("encoder", "encoder-0")]) as stack:
        events: list[str] = []

        def on_event(lines: list[str]) -> None:
            events.extend(lines)
            stack.save_state(state_file)

        stack.supervise(RestartPolicy(initial=FIRST_RESTART_SECONDS), on_event)
        stack.save_state(state_file)
        env = _clean_env(**{**stack.env, "KIBAN_HOME": str(home)})

        view = wait_for(
            "both workers alive",
            lambda: (
                (v := live(env))
                and all(w["state"] == "alive" for w in v["workers"])
                and len(v["workers"]) == 2
                and v
            ),
        )
        before = worker(view, "encoder-0")
        assert before["node"].startswith("encoder-") and before["queues"] == ["encode"]
        assert before["metrics"] == f"127.0.0.1:{stack.procs['encoder-0'].metrics_port}"
        assert {q["queue"] for q in view["queues"]} >= {"ingest", "encode", "deadletter"}
        old_pid = stack.procs["encoder-0"].pid

        os.killpg(old_pid, signal.SIGKILL)  # what the OOM killer does: no goodbye
        wait_for("the exit to be noticed", lambda: any("killed by SIGKILL" in e for e in events))
        dead = worker(live(env), "encoder-0")
        assert dead["state"] == "dead" and dead["pid"] == old_pid
        assert dead["last_exit"] == "killed by SIGKILL"
        assert not any("restarted" in e for e in events), "restarted before status looked"
        text = kiban(["status"], env)
        assert text.returncode == 0 and "dead" in text.stdout, text.stdout + text.stderr

        wait_for("the restart", lambda: any("encoder-0 restarted" in e for e in events), 60)
        new_pid = stack.procs["encoder-0"].pid
        assert new_pid != old_pid
        after = wait_for(
            "the restarted worker's heartbeat",
            lambda: (w := worker(live(env), "encoder-0"))["state"] == "alive" and w,
        )
        assert after["pid"] == new_pid and after["restarts"] == 1
        assert after["metrics"] == before["metrics"]  # same port: the scrape target stays
        log = stack.procs["encoder-0"].log()
        assert f"encoder-0 (pid {old_pid}) killed by SIGKILL" in log
        assert "encoder-0 restarted" in log
        assert worker(live(env), "ingest")["restarts"] == 0


def test_up_detached_is_supervised_and_down_works_from_the_env_file(tmp_path: Path) -> None:
    if find_redis_server() is None:
        pytest.skip(REDIS_MISSING)
    home = tmp_path / "home"
    env = _clean_env(KIBAN_HOME=str(home), KIBAN_ALLOWED_ROOTS=str(tmp_path))
    up = kiban(["up", "--detach"], env, timeout=240, cwd=tmp_path)
    state_file = home / "stack" / "stack.json"
    state: dict[str, Any] = {}
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        state = json.loads(state_file.read_text())
        ports = state["metrics_ports"]
        assert {"ingest", "encoder-0", "indexer"} <= set(ports)
        for name in ("ingest", "encoder-0", "indexer"):  # printed and in the env file
            assert f"127.0.0.1:{ports[name]}" in up.stdout
        env_file = home / "stack" / "env.sh"
        text = env_file.read_text()
        assert f"# metrics encoder-0 http://127.0.0.1:{ports['encoder-0']}/metrics" in text
        assert f"export KIBAN_HOME={home}" in text
        assert pid_running(state["supervisor_pid"])

        old_pid = state["pids"]["encoder-0"]
        os.killpg(old_pid, signal.SIGKILL)

        def restarted() -> dict[str, Any] | None:
            now = json.loads(state_file.read_text())
            proc = now["procs"]["encoder-0"]
            return now if proc.get("restarts") == 1 and proc["pid"] != old_pid else None

        state = wait_for("the detached supervisor's restart", restarted, 60)
        assert state["procs"]["encoder-0"]["last_exit"] == "killed by SIGKILL"
        supervisor_log = (home / "stack" / "logs" / "supervisor.log").read_text()
        assert f"encoder-0 (pid {old_pid}) killed by SIGKILL" in supervisor_log

        # another shell: only what the env file says, started somewhere else
        down = subprocess.run(
            [
                "bash",
                "-c",
                f'source "{env_file}" && cd / && "{sys.executable}" -m kiban_cli.main down',
            ],  # fmt: skip
            capture_output=True,
            text=True,
            env=_clean_env(),
            timeout=120,
        )
        assert down.returncode == 0, down.stdout + down.stderr
        assert "stopped:" in down.stdout
        assert not state_file.exists()
        for pid in [state["supervisor_pid"], *state["pids"].values()]:
            wait_for(f"pid {pid} to end", lambda pid=pid: not pid_running(pid), 30)
    finally:
        if state_file.exists():  # leave nothing running whatever failed above
            kiban(["down"], env, timeout=120)
