"""The launcher's restart policy for frontends, on a fake clock and fake processes (the real
processes are in test_server_lifecycle.py and test_ops_server.py)."""
from __future__ import annotations

from pathlib import Path

import pytest

from sfllm import launcher
from sfllm.config import EngineConfig
from sfllm.launcher import BACKOFF_RESET_AFTER_S, FRONTEND_RESTART_BACKOFF_S, FrontendSlot, Supervisor


class ExitedProcess:
    pid = 4242
    returncode = 1

    def poll(self) -> int:
        return self.returncode


def test_a_crash_loop_backs_off_and_a_long_healthy_run_resets_the_backoff(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr(launcher.time, "monotonic", lambda: clock[0])
    supervisor = Supervisor(EngineConfig(run_dir=str(tmp_path)))
    spawned: list[ExitedProcess] = []
    monkeypatch.setattr(supervisor, "_spawn_frontend", lambda: spawned.append(ExitedProcess()) or spawned[-1])
    slot = FrontendSlot(ExitedProcess(), started_at=clock[0])

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
