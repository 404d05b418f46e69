"""ZeroMQ plumbing shared by the processes: addresses, run-directory ownership, orphan safety, the
environment of worker processes."""
from __future__ import annotations

import ctypes
import fcntl
import os
import shutil
import signal
from pathlib import Path

from sfllm.config import without_config_environment

_PR_SET_PDEATHSIG = 1
WORKER_CONFIG_PREFIX = "worker-config"  # in the run directory, followed by the engine's pid


class RunDirUnusable(RuntimeError):
    """The run directory can't hold the engine's lock: the message says why."""


class RunDirInUse(RunDirUnusable):
    pass


def ipc_path(address: str) -> Path | None:
    return Path(address.removeprefix("ipc://")) if address.startswith("ipc://") else None


def worker_address(run_dir: Path) -> str:
    return f"ipc://{run_dir / 'worker.sock'}"


class RunDirLock:
    """Holds run_dir/engine.lock for the engine's lifetime: a second engine on the same
    run directory fails at once instead of stealing the first one's sockets."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.path = run_dir / "engine.lock"
        self._file = None

    def acquire(self) -> None:
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            handle = open(self.path, "a+")
        except OSError as error:  # a file where a folder should be, no permission
            raise RunDirUnusable(f"cannot use run directory {self.run_dir}: {error.strerror or error}; "
                                 "pass another --run-dir") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "unknown"
            handle.close()
            raise RunDirInUse(f"another sfllm engine (pid {owner}) is running with run directory {self.run_dir}; "
                              f"stop it or pass another --run-dir / --port") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._file = handle

    def release(self, remove_paths: list[Path]) -> None:
        for path in remove_paths:
            path.unlink(missing_ok=True)
        if self._file is not None:
            self.path.unlink(missing_ok=True)
            self._file.close()
            self._file = None
        try:
            self.run_dir.rmdir()
        except OSError:
            pass  # not empty: something else lives there too


def remove_stale_files(run_dir: Path, prefix: str) -> None:
    """`<prefix>-<pid>*` files and folders in `run_dir` left by processes no longer running (SIGKILLed)."""
    for path in run_dir.glob(f"{prefix}-*"):
        pid = path.name.removeprefix(f"{prefix}-").split(".")[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def die_with_parent(death_signal: int = signal.SIGTERM) -> None:
    """For subprocess preexec_fn: the kernel sends `death_signal` to this child if its parent dies."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, death_signal)


def supervised_child() -> None:
    """For subprocess preexec_fn of a process its parent stops (the launcher's engine and frontends): as
    die_with_parent, and SIGINT ignored. A terminal's Ctrl-C reaches the whole foreground group, and a child
    that stopped on it would cut the requests its parent is draining; the ignored disposition survives exec,
    and the child keeps it (`sigint_ignored`)."""
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def sigint_ignored() -> bool:
    """True in a process started ignoring SIGINT (by its supervisor, or `nohup`-like): it must not take it up."""
    return signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def worker_environment() -> dict[str, str]:
    """The environment for a worker process (every tensor-parallel rank): this one's, less SFLLM_* (a worker
    reads its resolved config file)."""
    env = without_config_environment()
    # On a CPU device the worker's OpenMP threads use every core. Idle ones spin only briefly before they
    # sleep: with libgomp's default (300k spins) a second server on the machine stalled this one's steps
    # for seconds; always sleeping (OMP_WAIT_POLICY=PASSIVE) cost ~20% of throughput (docs/performance.md).
    env.setdefault("GOMP_SPINCOUNT", "10000")
    return env
