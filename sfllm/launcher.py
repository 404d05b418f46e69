"""`sfllm launch`: starts the engine and the frontends as processes and supervises them.

All start at once: a frontend waits for the engine's hello, which carries the tokenizer.
Launch binds the HTTP port and its `frontend_processes` frontends all accept on that one
socket; each is restarted when it dies (the engine and its loaded model stay). SIGHUP
replaces them one by one (see sfllm/rolling_restart.py). When the engine dies (its worker with it),
launch stops the frontends and exits non-zero so an orchestrator restarts the pod.
SIGINT/SIGTERM make launch stop them in order (sfllm.ordered_stop): the frontends first, which drain (see
`drain_timeout_s`), then the engine. The children run in sessions of their own, so that a signal to launch's
process group (a terminal's Ctrl-C, `kill -TERM -- -PGID`) reaches launch alone, and they ignore SIGINT; a SIGTERM
sent to every process at once (systemd's default KillMode) drains the frontends as launch's order does, while
the engine and its worker wait for theirs. Every child gets SIGTERM from the kernel if launch itself dies.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import yaml

from sfllm.config import API_KEY_ENV, EngineConfig, ServerConfig, without_config_environment, write_config_file
from sfllm.http_socket import CannotBind, bind_http_socket
from sfllm.ipc import (WORKER_CONFIG_PREFIX, RunDirLock, RunDirUnusable, ipc_path, remove_stale_files,
                       supervised_child, worker_address)
from sfllm.ordered_stop import LAUNCH_PID_ENV, ORDERED_STOP
from sfllm.rolling_restart import RollingRestart

logger = logging.getLogger(__name__)

STOP_GRACE_S = 15.0  # for the engine, and for the frontends beyond their drain timeout
FRONTEND_RESTART_BACKOFF_S = (1.0, 2.0, 5.0, 10.0)
BACKOFF_RESET_AFTER_S = 120.0
SIGNAL_GAP_S = 0.5
# prometheus_client's multiprocess folder (see sfllm/frontend/metrics.py; not imported: launch needs no HTTP stack)
MULTIPROCESS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
# In the run directory, followed by launch's pid: the children's config file, the frontends' metrics folder.
CONFIG_FILE_PREFIX = "launch-config"
METRICS_DIR_PREFIX = "frontend-metrics"


def run_engine_command(config: EngineConfig) -> int:
    from sfllm.engine.engine_process import run_engine
    try:
        return run_engine(config)
    except RunDirUnusable as error:
        logger.error("%s", error)
        return 2


@dataclass
class FrontendSlot:
    """One of the frontend processes, with its restart history."""
    process: subprocess.Popen
    started_at: float
    restarts: int = 0


class Supervisor:
    def __init__(self, config: ServerConfig, http_socket: socket.socket) -> None:
        self.config = config
        self.http_socket = http_socket
        self.run_dir = config.resolved_run_dir()
        self.config_path = self.run_dir / f"{CONFIG_FILE_PREFIX}-{os.getpid()}.yaml"
        self.metrics_dir = self.run_dir / f"{METRICS_DIR_PREFIX}-{os.getpid()}"
        self.engine: subprocess.Popen | None = None
        self.frontends: list[FrontendSlot] = []
        self.retiring: list[subprocess.Popen] = []  # handing over to their replacements
        self.rolling_restart: RollingRestart | None = None
        self.rolling_restart_asked = False
        self.stopping = False

    def _spawn(self, command: str, *args: str, extra_env: dict[str, str] | None = None,
               pass_fds: tuple[int, ...] = ()) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "sfllm", command, "--config", str(self.config_path), *args],
                                env=without_config_environment() | (extra_env or {}), pass_fds=pass_fds,
                                start_new_session=True, preexec_fn=supervised_child)

    def spawn_frontend(self, tell_ready: bool = False) -> tuple[subprocess.Popen, int | None]:
        """A frontend on the shared socket; with `tell_ready`, also the pipe it tells once it serves."""
        env = {} if self.config.frontend_processes == 1 else {MULTIPROCESS_DIR_ENV: str(self.metrics_dir)}
        if self.config.api_key:
            env[API_KEY_ENV] = self.config.api_key
        args = ["--http-fd", str(self.http_socket.fileno())]
        fds = [self.http_socket.fileno()]
        read_end = write_end = None
        if tell_ready:
            read_end, write_end = os.pipe()
            args += ["--ready-fd", str(write_end)]
            fds.append(write_end)
        try:
            return self._spawn("frontend", *args, extra_env=env, pass_fds=tuple(fds)), read_end
        finally:
            if write_end is not None:
                os.close(write_end)  # the child's copy is the only one left: its exit closes the pipe

    def start(self) -> None:
        self.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        for prefix in (CONFIG_FILE_PREFIX, METRICS_DIR_PREFIX):
            remove_stale_files(self.run_dir, prefix)
        # the API key goes to the frontends in their environment, never into a file
        write_config_file(self.config.to_dict() | {"api_key": None}, self.config_path)
        if self.config.frontend_processes > 1:
            shutil.rmtree(self.metrics_dir, ignore_errors=True)
            self.metrics_dir.mkdir(mode=0o700)
        self.engine = self._spawn("engine", extra_env={LAUNCH_PID_ENV: str(os.getpid())})
        self.frontends = [FrontendSlot(self.spawn_frontend()[0], time.monotonic())
                          for _ in range(self.config.frontend_processes)]

    def supervise(self) -> int:
        while not self.stopping:
            time.sleep(0.2)
            if self.engine.poll() is not None:
                logger.error("the engine exited with code %s; stopping", self.engine.returncode)
                return 1
            self._roll()
            for slot in self.frontends:
                replaced = self.rolling_restart is not None and self.rolling_restart.replacing(slot)
                if slot.process.poll() is not None and not self.stopping and not replaced:
                    self._restart(slot)
            self.retiring = [process for process in self.retiring if process.poll() is None]
        return 0

    def _roll(self) -> None:
        if self.rolling_restart_asked:
            self.rolling_restart_asked = False
            if self.rolling_restart is None:
                logger.info("rolling restart of %d frontends", len(self.frontends))
                self.rolling_restart = RollingRestart(self)
            else:
                logger.warning("a rolling restart is already under way")
        if self.rolling_restart is not None:
            self.rolling_restart.step()
            if self.rolling_restart.done:
                self.rolling_restart = None

    def _restart(self, slot: FrontendSlot) -> None:
        now = time.monotonic()
        if now - slot.started_at > BACKOFF_RESET_AFTER_S:
            slot.restarts = 0  # it ran long enough: a crash now is not a crash loop
        delay = FRONTEND_RESTART_BACKOFF_S[min(slot.restarts, len(FRONTEND_RESTART_BACKOFF_S) - 1)]
        if slot.restarts and now - slot.started_at < delay:
            return
        logger.warning("frontend pid %d exited with code %s; restarting it", slot.process.pid,
                       slot.process.returncode)
        slot.restarts += 1
        slot.process, slot.started_at = self.spawn_frontend()[0], now

    def stop(self) -> None:
        # With the engine gone no request can finish, so the frontends get no drain: a SIGTERM after the order
        # cuts their connections at once (see DrainingServer).
        engine_gone = self.engine is not None and self.engine.poll() is not None
        replacement = self.rolling_restart.current if self.rolling_restart is not None else None
        candidates = [slot.process for slot in self.frontends] + self.retiring
        if replacement is not None:
            candidates.append(replacement.process)
        frontends = [process for process in candidates if process.poll() is None]
        for process in frontends:
            process.send_signal(ORDERED_STOP)
        if engine_gone and frontends:
            time.sleep(SIGNAL_GAP_S)  # two signals at once may arrive as one
            for process in frontends:
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
        frontend_grace_s = STOP_GRACE_S if engine_gone else self.config.drain_timeout_s + STOP_GRACE_S
        deadline = time.monotonic() + frontend_grace_s  # they drain side by side
        for process in frontends:
            _wait_or_kill(process, max(deadline - time.monotonic(), 0.0))
        if self.engine is not None and self.engine.poll() is None:
            self.engine.send_signal(ORDERED_STOP)
            _wait_or_kill(self.engine, STOP_GRACE_S)
        if engine_gone:
            self._remove_engine_leftovers()
        self.config_path.unlink(missing_ok=True)
        shutil.rmtree(self.metrics_dir, ignore_errors=True)
        try:
            self.run_dir.rmdir()
        except OSError:
            pass

    def _remove_engine_leftovers(self) -> None:
        """What an engine killed outright leaves in the run directory: its sockets, its lock and its worker's
        config; nothing if another engine holds the directory now."""
        lock = RunDirLock(self.run_dir)
        try:
            lock.acquire()
        except (RunDirUnusable, OSError):
            return
        remove_stale_files(self.run_dir, WORKER_CONFIG_PREFIX)
        sockets = [ipc_path(self.config.resolved_engine_address()), ipc_path(worker_address(self.run_dir))]
        lock.release([path for path in sockets if path is not None])


def _wait_or_kill(process: subprocess.Popen, timeout_s: float) -> None:
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        logger.error("pid %d did not stop within %g s; killing it", process.pid, timeout_s)
        process.kill()
        process.wait()


def launch(config: ServerConfig) -> int:
    try:
        http_socket = bind_http_socket(config.host, config.port)
    except CannotBind as error:
        logger.error("%s", error)
        return 2
    try:
        probe = RunDirLock(config.resolved_run_dir())
        probe.acquire()  # fail now, not after the engine loaded its model
        probe.release([])
    except RunDirUnusable as error:
        logger.error("%s", error)
        http_socket.close()
        return 2
    logger.info("configuration:\n%s", yaml.safe_dump(config.to_dict() | {"api_key": "***" if config.api_key else None}))
    supervisor = Supervisor(config, http_socket)

    def request_stop(*_: object) -> None:
        supervisor.stopping = True

    def request_rolling_restart(*_: object) -> None:
        supervisor.rolling_restart_asked = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGHUP, request_rolling_restart)
    code = 0
    try:
        supervisor.start()
        code = supervisor.supervise()
    except RuntimeError as error:
        logger.error("%s", error)
        code = 1
    finally:
        supervisor.stop()
        http_socket.close()
    return code
