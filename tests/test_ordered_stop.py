"""The SIGTERM rule of processes whose parent stops them (sfllm.ordered_stop); the launched server's processes
taking it together are tests/test_ops_server.py's group-signal test."""
from __future__ import annotations

import logging
import os
import signal

import pytest

from sfllm.ordered_stop import LAUNCH_PID_ENV, SigtermFromOutside, launch_pid


def test_a_sigterm_while_the_parent_lives_is_left_to_it_and_a_second_stops(caplog: pytest.LogCaptureFixture) -> None:
    stops: list[int] = []
    handler = SigtermFromOutside(os.getppid(), lambda: stops.append(1), "its engine")
    with caplog.at_level(logging.WARNING):
        handler(signal.SIGTERM, None)
    assert stops == [] and f"SIGTERM while its engine (pid {os.getppid()}) runs" in caplog.text
    handler(signal.SIGTERM, None)
    assert stops == [1]


@pytest.mark.parametrize("parent", ["none", "gone"])
def test_a_sigterm_stops_at_once_where_no_living_parent_stops_the_process(parent: str) -> None:
    stops: list[int] = []
    # "gone": the pid the process was started by is no longer its parent (the kernel reparented it)
    SigtermFromOutside(None if parent == "none" else os.getppid() + 1, lambda: stops.append(1), "x")(
        signal.SIGTERM, None)
    assert stops == [1]


def test_the_engine_defers_only_to_the_launch_that_is_its_parent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(LAUNCH_PID_ENV, str(os.getppid()))
    assert launch_pid() == os.getppid()
    monkeypatch.setenv(LAUNCH_PID_ENV, str(os.getpid()))  # a launch that is not this process's parent
    assert launch_pid() is None
    monkeypatch.delenv(LAUNCH_PID_ENV)
    assert launch_pid() is None  # a standalone engine: SIGTERM stops it
