"""GPU utilisation and memory while a benchmark level runs, sampled from `nvidia-smi`.

The guide's KPI ("GPU utilisation above 80%") is what `nvidia-smi` reports: the share of
time in which at least one kernel ran on the GPU. A background `nvidia-smi -lms` process
streams samples; each level averages the samples taken between its start and its end.
Only meaningful when the server runs on this machine's GPU.
"""
from __future__ import annotations

import shutil
import subprocess
import threading
import time
from dataclasses import dataclass

SAMPLE_INTERVAL_MS = 100
QUERY = "utilization.gpu,memory.used,memory.total"


@dataclass(frozen=True)
class GpuSample:
    at: float  # time.time() when the line was read
    utilization_percent: float
    memory_used_mib: float
    memory_total_mib: float


@dataclass(frozen=True)
class GpuUsage:
    """Means over one window."""
    utilization_percent: float
    memory_percent: float
    num_samples: int


def parse_sample(line: str, at: float) -> GpuSample | None:
    """One `--format=csv,noheader,nounits` line of QUERY, or None if it is not one (e.g. "[N/A]")."""
    parts = [part.strip() for part in line.split(",")]
    if len(parts) != 3:
        return None
    try:
        utilization, used, total = (float(part) for part in parts)
    except ValueError:
        return None
    return GpuSample(at, utilization, used, total)


def mean_usage(samples: list[GpuSample], start: float, end: float) -> GpuUsage | None:
    window = [s for s in samples if start <= s.at <= end]
    if not window:
        return None
    return GpuUsage(utilization_percent=sum(s.utilization_percent for s in window) / len(window),
                    memory_percent=100.0 * sum(s.memory_used_mib / s.memory_total_mib for s in window) / len(window),
                    num_samples=len(window))


class GpuMonitorError(RuntimeError):
    pass


class GpuMonitor:
    """Samples one GPU every SAMPLE_INTERVAL_MS until `stop`; `usage(start, end)` averages a window."""

    def __init__(self, gpu_id: int, executable: str = "nvidia-smi") -> None:
        path = shutil.which(executable)
        if path is None:
            raise GpuMonitorError(f"{executable} not found on PATH")
        self._process = subprocess.Popen(
            [path, f"--id={gpu_id}", f"--query-gpu={QUERY}", "--format=csv,noheader,nounits",
             f"-lms={SAMPLE_INTERVAL_MS}"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self._samples: list[GpuSample] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, name="gpu-monitor", daemon=True)
        self._reader.start()

    @staticmethod
    def available(executable: str = "nvidia-smi") -> bool:
        return shutil.which(executable) is not None

    def _read(self) -> None:
        assert self._process.stdout is not None
        for line in self._process.stdout:
            sample = parse_sample(line, time.time())
            if sample is not None:
                with self._lock:
                    self._samples.append(sample)

    def usage(self, start: float, end: float) -> GpuUsage | None:
        with self._lock:
            return mean_usage(self._samples, start, end)

    def stop(self) -> str:
        """Ends sampling; returns what nvidia-smi wrote to stderr (empty when all went well)."""
        if self._process.poll() is None:
            self._process.terminate()
        try:
            self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._reader.join(timeout=5)
        assert self._process.stderr is not None
        return self._process.stderr.read().strip()
