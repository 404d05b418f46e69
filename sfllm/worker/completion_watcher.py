"""Wakes the worker's loop when a launched step's tokens reach the host, so that the loop can sleep in
the kernel (one poll on the scheduler's socket and this pipe) instead of spinning while the GPU works.

A thread waits on each step's copy-done event in launch order; the events are blocking-sync, so the
driver puts the thread to sleep until the GPU signals; then it writes a byte to the pipe.
"""
from __future__ import annotations

import os
import queue
import threading

import torch


class CompletionWatcher:
    def __init__(self) -> None:
        self.wake_fd, self._write_fd = os.pipe()
        os.set_blocking(self.wake_fd, False)
        self._events: queue.SimpleQueue[torch.cuda.Event | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="step-completion", daemon=True)
        self._thread.start()

    def watch(self, event: torch.cuda.Event) -> None:
        """Wake the loop once `event` has completed (after the events watched before it)."""
        self._events.put(event)

    def drain(self) -> None:
        """Reads the wake-up bytes so far (call when the poll says the pipe is readable)."""
        try:
            while os.read(self.wake_fd, 4096):
                pass
        except BlockingIOError:
            pass

    def _run(self) -> None:
        while (event := self._events.get()) is not None:
            event.synchronize()  # releases the GIL while it waits
            os.write(self._write_fd, b"\0")

    def close(self) -> None:
        self._events.put(None)
        self._thread.join(timeout=5)
        os.close(self.wake_fd)
        os.close(self._write_fd)
