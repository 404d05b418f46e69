"""SIGHUP to `sfllm launch`: every frontend replaced, one at a time, without a failed request.

The new frontend starts on the shared socket (sfllm/http_socket.py) while the old one serves;
once it serves, the old one hands over (SIGUSR1: it stops accepting and answers what its open
connections still ask, each answer closing its connection, see DrainingServer) and the next
frontend's turn comes. A replacement that fails to start ends the rolling restart and leaves
the old frontends serving.
"""
from __future__ import annotations

import logging
import os
import select
import signal
import subprocess
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sfllm.launcher import FrontendSlot, Supervisor

logger = logging.getLogger(__name__)

# A replacement frontend that does not serve within this long is given up (the old one stays).
REPLACEMENT_START_TIMEOUT_S = 120.0


@dataclass
class Replacement:
    """A new frontend started for `slot`, not serving yet; its pipe gets a byte once it serves."""
    slot: FrontendSlot
    process: subprocess.Popen
    ready_pipe: int
    deadline: float


class RollingRestart:
    """The supervisor's frontends replaced in turn; `step` is called on every supervision tick."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
        self.waiting = list(supervisor.frontends)
        self.current: Replacement | None = None

    @property
    def done(self) -> bool:
        return self.current is None and not self.waiting

    def replacing(self, slot: FrontendSlot) -> bool:
        return self.current is not None and self.current.slot is slot

    def step(self) -> None:
        if self.current is None:
            slot = self.waiting.pop(0)
            process, ready_pipe = self.supervisor.spawn_frontend(tell_ready=True)
            self.current = Replacement(slot, process, ready_pipe, time.monotonic() + REPLACEMENT_START_TIMEOUT_S)
            return
        replacement = self.current
        if select.select([replacement.ready_pipe], [], [], 0)[0]:
            served = os.read(replacement.ready_pipe, 1) == b"1"  # else the pipe closed: the process exited
        elif time.monotonic() > replacement.deadline:
            served = False
        else:
            return
        os.close(replacement.ready_pipe)
        self.current = None
        if not served:
            logger.error("the replacement frontend pid %d did not start serving; the rolling restart stops and "
                         "frontend pid %d keeps serving", replacement.process.pid, replacement.slot.process.pid)
            replacement.process.kill()
            replacement.process.wait()
            self.waiting = []
            return
        old = replacement.slot.process
        logger.info("frontend pid %d serves; frontend pid %d hands over", replacement.process.pid, old.pid)
        old.send_signal(signal.SIGUSR1)
        self.supervisor.retiring.append(old)
        replacement.slot.process, replacement.slot.started_at = replacement.process, time.monotonic()
