"""PyTorch profiler traces of the worker's steps, started and stopped on request."""
from __future__ import annotations

import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile


class StepProfiler:
    def __init__(self) -> None:
        self._profile: profile | None = None
        self._directory: Path | None = None
        self._steps_left: int | None = None
        self._pending_start: tuple[str, int, int] | None = None
        self._last_trace: Path | None = None

    def start(self, directory: str, num_steps: int | None = None) -> None:
        if self._profile is not None:
            return
        activities = [ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(ProfilerActivity.CUDA)
        self._directory = Path(directory)
        self._directory.mkdir(parents=True, exist_ok=True)
        self._steps_left = num_steps
        self._profile = profile(activities=activities, record_shapes=False, with_stack=False)
        self._profile.__enter__()

    def start_after(self, directory: str, skip_steps: int, num_steps: int) -> None:
        """Profiles `num_steps` steps once `skip_steps` more have run (past warm-up and prefill)."""
        self._pending_start = (directory, skip_steps, num_steps)

    def step(self) -> None:
        if self._pending_start is not None:
            directory, skip, num = self._pending_start
            if skip > 0:
                self._pending_start = (directory, skip - 1, num)
                return
            self._pending_start = None
            self.start(directory, num)
            return
        if self._steps_left is None or self._profile is None:
            return
        self._steps_left -= 1
        if self._steps_left <= 0:
            self.stop()

    @property
    def last_trace(self) -> Path | None:
        return self._last_trace

    def stop(self) -> Path | None:
        if self._profile is None:
            return None
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._profile.__exit__(None, None, None)
        path = self._directory / f"worker-trace-{int(time.time() * 1000)}.json"
        self._profile.export_chrome_trace(str(path))
        self._profile = None
        self._last_trace = path
        return path

