"""How sfllm's processes stop in order, whatever else signals them.

`sfllm launch` stops its children with ORDERED_STOP: the frontends drain, then the engine stops, which sends its
worker a Shutdown message, then ORDERED_STOP. A SIGTERM from outside while the parent that stops a process lives
(systemd's default KillMode sends one to every process of the unit at once; so does `pkill -f sfllm`) is left to
that parent, signalled too: a frontend drains on it as on launch's order, an engine under launch and a worker log it
and keep serving until their parent stops them, once the requests running have finished. A second SIGTERM stops
them at once, and so does the first once their parent is gone (the kernel's SIGTERM at its death, see
`sfllm.ipc.die_with_parent`). Tensor-parallel followers ignore SIGTERM: rank 0 stops them, and its death kills
them.
"""
from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable

logger = logging.getLogger(__name__)

ORDERED_STOP = signal.SIGUSR2
LAUNCH_PID_ENV = "_SFLLM_LAUNCH_PID"  # set by launch for its engine (no SFLLM_ prefix: not a setting)


class SigtermFromOutside:
    """A SIGTERM handler for a process whose parent (`parent_pid`; None: none stops it) stops it: `stop` runs on a
    second SIGTERM, or on the first where that parent is gone."""

    def __init__(self, parent_pid: int | None, stop: Callable[[], None], parent_name: str) -> None:
        self.parent_pid = parent_pid
        self.stop = stop
        self.parent_name = parent_name
        self.deferred = False

    def __call__(self, *_: object) -> None:
        if self.parent_pid is None or os.getppid() != self.parent_pid or self.deferred:
            self.stop()
            return
        self.deferred = True
        logger.warning("SIGTERM while %s (pid %d) runs: it stops this process in order once the running requests "
                       "finish; a second SIGTERM stops it now", self.parent_name, self.parent_pid)


def launch_pid() -> int | None:
    """The pid of the `sfllm launch` that started this engine and stops it, where it is this process's parent."""
    value = os.environ.get(LAUNCH_PID_ENV, "")
    return int(value) if value.isdigit() and int(value) == os.getppid() else None
