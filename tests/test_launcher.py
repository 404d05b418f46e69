"""The launcher's restart policy and rolling restart, on a fake clock and fake processes (the real
processes are in test_server_lifecycle.py and test_ops_server.py)."""
from __future__ import annotations

import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from sfllm import launcher, rolling_restart
from sfllm.config import ServerConfig
from sfllm.launcher import BACKOFF_RESET_AFTER_S, FRONTEND_RESTART_BACKOFF_S, FrontendSlot, Supervisor
from sfllm.rolling_restart import REPLACEMENT_START_TIMEOUT_S, RollingRestart


class FakeProcess:
    def __init__(self, pid: int, returncode: int | None = None) -> None:
        self.pid = pid
        self.returncode = returncode
        self.signals: list[int] = []

    def poll(self) -> int | None:
        return self.returncode

    def send_signal(self, sig: int) -> None:
        self.signals.append(sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)
        self.returncode = -signal.SIGKILL

    def wait(self) -> int | None:
        return self.returncode


@pytest.fixture
def supervisor(tmp_path: Path) -> Iterator[Supervisor]:
    with socket.socket() as http_socket:
        yield Supervisor(ServerConfig(run_dir=str(tmp_path)), http_socket)


def test_a_crash_loop_backs_off_and_a_long_healthy_run_resets_the_backoff(supervisor: Supervisor,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr(launcher.time, "monotonic", lambda: clock[0])
    spawned: list[FakeProcess] = []

    def spawn_frontend(tell_ready: bool = False) -> tuple[FakeProcess, None]:
        spawned.append(FakeProcess(4242, returncode=1))
        return spawned[-1], None

    monkeypatch.setattr(supervisor, "spawn_frontend", spawn_frontend)
    slot = FrontendSlot(FakeProcess(4242, returncode=1), started_at=clock[0])

    supervisor._restart(slot)
    assert len(spawned) == 1 and slot.restarts == 1, "the first crash is restarted at once"
    clock[0] += FRONTEND_RESTART_BACKOFF_S[1] / 2
    supervisor._restart(slot)
    assert len(spawned) == 1, "a second crash soon after waits"
    clock[0] += FRONTEND_RESTART_BACKOFF_S[1]
    supervisor._restart(slot)
    assert len(spawned) == 2 and slot.restarts == 2
    clock[0] += FRONTEND_RESTART_BACKOFF_S[2] - 0.1
    supervisor._restart(slot)
    assert len(spawned) == 2, "the wait grows with each restart"

    clock[0] += BACKOFF_RESET_AFTER_S + 1
    supervisor._restart(slot)
    assert len(spawned) == 3 and slot.restarts == 1, "after a long healthy run the backoff starts over"
    assert slot.process is spawned[-1] and slot.started_at == clock[0]


class ReplacementFrontends:
    """Stands in for Supervisor.spawn_frontend: each new frontend's ready pipe is real; the test decides
    whether it tells "serving" (writes a byte) or dies first (closes the pipe)."""

    def __init__(self) -> None:
        self.spawned: list[FakeProcess] = []
        self.tell: list[int] = []

    def __call__(self, tell_ready: bool = False) -> tuple[FakeProcess, int]:
        assert tell_ready
        read_end, write_end = os.pipe()
        self.spawned.append(FakeProcess(100 + len(self.spawned)))
        self.tell.append(write_end)
        return self.spawned[-1], read_end

    def serves(self) -> None:
        os.write(self.tell[-1], b"1")
        os.close(self.tell[-1])

    def dies(self) -> None:
        os.close(self.tell[-1])


@pytest.fixture
def replacements(supervisor: Supervisor, monkeypatch: pytest.MonkeyPatch) -> ReplacementFrontends:
    fake = ReplacementFrontends()
    monkeypatch.setattr(supervisor, "spawn_frontend", fake)
    supervisor.frontends = [FrontendSlot(FakeProcess(1), 0.0), FrontendSlot(FakeProcess(2), 0.0)]
    return fake


def test_rolling_restart_replaces_one_frontend_at_a_time_and_the_old_one_hands_over(
        supervisor: Supervisor, replacements: ReplacementFrontends) -> None:
    old = [slot.process for slot in supervisor.frontends]
    restart = RollingRestart(supervisor)
    restart.step()
    assert len(replacements.spawned) == 1 and restart.replacing(supervisor.frontends[0])
    restart.step()
    assert old[0].signals == [] and len(replacements.spawned) == 1, "nothing happens before it serves"

    replacements.serves()
    restart.step()
    assert old[0].signals == [signal.SIGUSR1] and supervisor.retiring == [old[0]]
    assert supervisor.frontends[0].process is replacements.spawned[0]
    restart.step()
    assert len(replacements.spawned) == 2 and restart.replacing(supervisor.frontends[1]), "then the next one"
    replacements.serves()
    restart.step()
    assert restart.done and old[1].signals == [signal.SIGUSR1]
    assert [slot.process for slot in supervisor.frontends] == replacements.spawned


def test_a_replacement_that_dies_or_hangs_leaves_the_old_frontends_serving(
        supervisor: Supervisor, replacements: ReplacementFrontends, monkeypatch: pytest.MonkeyPatch) -> None:
    old = [slot.process for slot in supervisor.frontends]
    restart = RollingRestart(supervisor)
    restart.step()
    replacements.dies()
    restart.step()
    assert restart.done and len(replacements.spawned) == 1
    assert [slot.process for slot in supervisor.frontends] == old and not any(p.signals for p in old)

    clock = [0.0]
    monkeypatch.setattr(rolling_restart.time, "monotonic", lambda: clock[0])
    restart = RollingRestart(supervisor)
    restart.step()
    clock[0] += REPLACEMENT_START_TIMEOUT_S + 1
    restart.step()
    assert restart.done and replacements.spawned[-1].signals == [signal.SIGKILL], "the hung one is killed"
    assert [slot.process for slot in supervisor.frontends] == old and not any(p.signals for p in old)
