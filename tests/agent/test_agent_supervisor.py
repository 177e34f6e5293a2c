"""The supervisor with a fake server child: start, log capture, stop, kill, restart, give up."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from agent_helpers import FakeClock, fake_server_command, kill_pid, pid_alive, wait_for

from corolla.agent.serverstatus import read_stats
from corolla.agent.supervisor import Backoff, Supervisor

pytestmark = pytest.mark.timeout(30)

MakeSupervisor = Callable[..., Supervisor]


@pytest.fixture
def make_supervisor(tmp_path: Path) -> Iterator[MakeSupervisor]:
    made: list[Supervisor] = []

    def make(**kwargs: object) -> Supervisor:
        supervisor = Supervisor(tmp_path / "logs" / "server.log", **kwargs)  # type: ignore[arg-type]
        made.append(supervisor)
        return supervisor

    yield make
    for supervisor in made:
        pid = supervisor.pid
        supervisor.stop()
        kill_pid(pid)


def argv(tmp_path: Path, *extra: str) -> list[str]:
    return [*fake_server_command(), "tiny-model", "--status-file", str(tmp_path / "status.json"), *extra]


def test_start_log_status_and_clean_stop(tmp_path: Path, make_supervisor: MakeSupervisor) -> None:
    sup: Supervisor = make_supervisor(grace_s=10)
    sup.start(argv(tmp_path, "--num-blocks", "6"))
    pid = sup.pid
    assert pid_alive(pid)
    stats = wait_for(lambda: read_stats(tmp_path / "status.json"), what="status file")
    assert stats.blocks == "0:6" and stats.state == "online"  # type: ignore[attr-defined]
    sup.start(argv(tmp_path, "--num-blocks", "6"))  # same argv: no restart
    assert sup.pid == pid
    assert sup.stop() == 0  # SIGTERM handled: clean exit
    assert not pid_alive(pid) and sup.pid is None
    log = (tmp_path / "logs" / "server.log").read_text()
    assert "model tiny-model, 6 blocks" in log and "SIGTERM: leaving the swarm" in log
    assert "=== exited with code 0" in log
    assert sup.poll().crashes == 0  # a requested stop is not a crash


def test_ignored_sigterm_is_killed_after_grace(tmp_path: Path, make_supervisor: MakeSupervisor) -> None:
    sup: Supervisor = make_supervisor(grace_s=0.5)
    sup.start(argv(tmp_path, "--fake-mode", "ignore-term"))
    pid = sup.pid
    wait_for(lambda: (tmp_path / "status.json").exists(), what="fake server up")
    assert sup.stop() == -9
    assert not pid_alive(pid)


def test_stop_leaves_no_grandchild(tmp_path: Path, make_supervisor: MakeSupervisor) -> None:
    if sys.platform == "win32":
        pytest.skip("process groups are POSIX")
    sup: Supervisor = make_supervisor(grace_s=5)
    sup.start(argv(tmp_path, "--fake-mode", "grandchild"))
    marker = tmp_path / "status.json.grandchild"
    grandchild = int(str(wait_for(lambda: marker.exists() and marker.read_text(), what="grandchild pid")))
    try:
        assert pid_alive(grandchild)
        sup.stop()
        wait_for(lambda: not pid_alive(grandchild), timeout_s=5, what="grandchild killed")
    finally:
        kill_pid(grandchild)


def test_crash_restarts_with_backoff_then_gives_up(tmp_path: Path, make_supervisor: MakeSupervisor) -> None:
    clock = FakeClock()
    backoff = Backoff(base_s=2, factor=2, cap_s=5)
    sup: Supervisor = make_supervisor(backoff=backoff, max_restarts=3, clock=clock)
    sup.start(argv(tmp_path, "--fake-mode", "crash"))
    delays = []
    for attempt in range(1, 4):
        status = wait_for(lambda: sup.poll().restart_in_s is not None and sup.poll(), what=f"crash {attempt}")
        assert status.crashes == attempt and status.failed is None  # type: ignore[attr-defined]
        delays.append(status.restart_in_s)  # type: ignore[attr-defined]
        clock.advance(status.restart_in_s - 0.1)  # type: ignore[attr-defined]
        assert sup.poll().pid is None  # not yet
        clock.advance(0.1)
        sup.poll()  # restarts now
    assert delays == [2, 4, 5]  # capped exponential
    final = wait_for(lambda: sup.poll().failed and sup.poll(), what="give up")
    assert "exited 4 times (code 3)" in final.failed and "CUDA out of memory" in final.failed  # type: ignore[attr-defined]
    assert not final.wanted and final.pid is None  # type: ignore[attr-defined]
    sup.reset()
    assert sup.poll().failed is None


def test_missing_program_is_a_failure(tmp_path: Path, make_supervisor: MakeSupervisor) -> None:
    sup: Supervisor = make_supervisor()
    sup.start([str(tmp_path / "no-such-server"), "m"])
    status = sup.poll()
    assert status.failed and "could not start" in status.failed and status.pid is None


def test_backoff() -> None:
    assert [Backoff(1, 3, 20).delay(n) for n in (1, 2, 3, 4)] == [1, 3, 9, 20]
