"""`sfllm launch`: starts the engine and the frontend as processes and supervises them.

Both start at once: the frontend imports and loads its tokenizer while the engine loads
the model, then waits for the engine's hello. The frontend is restarted when it dies
(the engine and its loaded model stay); when the engine dies (its worker with it),
launch stops the frontend and exits non-zero so an orchestrator restarts the pod.
SIGINT/SIGTERM go to the frontend first, which drains (see `drain_timeout_s`), then to
the engine. Every child gets SIGTERM from the kernel if launch itself dies.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

import yaml

from sfllm.config import EngineConfig
from sfllm.ipc import PortInUse, RunDirInUse, RunDirLock, check_port_free, die_with_parent

logger = logging.getLogger(__name__)

STOP_GRACE_S = 15.0  # for the engine, and for the frontend beyond its drain timeout
FRONTEND_RESTART_BACKOFF_S = (1.0, 2.0, 5.0, 10.0)
BACKOFF_RESET_AFTER_S = 120.0
SIGNAL_GAP_S = 0.5


def _wait_quietly(process: subprocess.Popen, timeout_s: float) -> None:
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        pass


def run_engine_command(config: EngineConfig) -> int:
    from sfllm.scheduler.scheduler_process import run_engine
    try:
        return run_engine(config)
    except RunDirInUse as error:
        logger.error("%s", error)
        return 2


def _child_env() -> dict[str, str]:
    # children read the resolved config file; stale SFLLM_* values must not override it
    return {k: v for k, v in os.environ.items() if not k.startswith("SFLLM_")}


class Supervisor:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.run_dir = config.resolved_run_dir()
        self.config_path = self.run_dir / f"launch-config-{os.getpid()}.yaml"
        self.engine: subprocess.Popen | None = None
        self.frontend: subprocess.Popen | None = None
        self.stopping = False
        self.frontend_restarts = 0

    def _spawn(self, command: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "sfllm", command, "--config", str(self.config_path)],
                                env=_child_env(), preexec_fn=die_with_parent)

    def start(self) -> None:
        # Owner-only: the config file holds the API key.
        self.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        descriptor = os.open(self.config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as config_file:
            config_file.write(yaml.safe_dump(self.config.to_dict()))
        self.engine = self._spawn("engine")
        self.frontend = self._spawn("frontend")

    def supervise(self) -> int:
        last_restart = 0.0
        while not self.stopping:
            time.sleep(0.2)
            if self.engine.poll() is not None:
                logger.error("the engine exited with code %s; stopping", self.engine.returncode)
                return 1
            if self.frontend.poll() is not None and not self.stopping:
                if time.monotonic() - last_restart > BACKOFF_RESET_AFTER_S:
                    self.frontend_restarts = 0  # it ran long enough: a crash now is not a crash loop
                delay = FRONTEND_RESTART_BACKOFF_S[min(self.frontend_restarts, len(FRONTEND_RESTART_BACKOFF_S) - 1)]
                if time.monotonic() - last_restart < delay:
                    continue
                logger.warning("the frontend exited with code %s; restarting it", self.frontend.returncode)
                self.frontend_restarts += 1
                last_restart = time.monotonic()
                self.frontend = self._spawn("frontend")
        return 0

    def stop(self) -> None:
        # With the engine gone no request can finish, so the frontend gets no drain: its second
        # SIGTERM cuts the connections at once (see DrainingServer).
        engine_gone = self.engine is not None and self.engine.poll() is not None
        frontend_grace_s = STOP_GRACE_S if engine_gone else self.config.drain_timeout_s + STOP_GRACE_S
        for process, grace_s in ((self.frontend, frontend_grace_s), (self.engine, STOP_GRACE_S)):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                if process is self.frontend and engine_gone:
                    _wait_quietly(process, SIGNAL_GAP_S)  # two signals at once may arrive as one
                    if process.poll() is None:
                        process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=grace_s)
                except subprocess.TimeoutExpired:
                    logger.error("pid %d did not stop within %g s; killing it", process.pid, grace_s)
                    process.kill()
                    process.wait()
        self.config_path.unlink(missing_ok=True)
        try:
            self.run_dir.rmdir()
        except OSError:
            pass


def launch(config: EngineConfig) -> int:
    try:
        check_port_free(config.host, config.port)
        probe = RunDirLock(config.resolved_run_dir())
        probe.acquire()  # fail now, not after the engine loaded its model
        probe.release([])
    except (PortInUse, RunDirInUse) as error:
        logger.error("%s", error)
        return 2
    logger.info("configuration:\n%s", yaml.safe_dump(config.to_dict() | {"api_key": "***" if config.api_key else None}))
    supervisor = Supervisor(config)

    def request_stop(*_: object) -> None:
        supervisor.stopping = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    code = 0
    try:
        supervisor.start()
        code = supervisor.supervise()
    except RuntimeError as error:
        logger.error("%s", error)
        code = 1
    finally:
        supervisor.stop()
    return code
