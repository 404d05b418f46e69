"""Rank 0's side of a tensor-parallel worker: the processes of ranks 1..N-1, the relay of every step to
them, and the watch over them.

The scheduler (or the offline API) talks to rank 0 alone. Rank 0 forwards each message it gets, as it got
it, to every other rank over a PAIR socket of its own, before it decodes it itself: the relay costs rank 0
one send per rank (docs/performance.md) and the others decode in parallel. They run every step as rank 0
does, draw the same tokens from the same gathered logits, and report nothing.

A rank that exits, or on a GPU a step that has not finished after STEP_TIMEOUT_S (a rank hangs, and every
collective of the others with it: collectives inside CUDA graphs have no timeout of their own), ends the
worker. The watch kills the other ranks at once, and `check` raises RankFailed in the main thread, which
reports it. Should the main thread not come to `check` within FAILURE_GRACE_S (it waits inside a
collective or a copy that the lost rank will never complete), the watch ends the process itself: the exit
frees its GPU, and the scheduler (or the offline caller's shell) sees it.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
import zmq

from sfllm.config import WorkerConfig, write_config_file
from sfllm.ipc import die_with_parent, worker_environment
from sfllm.messages import MessageCodec, SchedulerToWorker, Shutdown
from sfllm.model_source import ModelSource
from sfllm.worker.model_runner import ModelRunner, pick_device
from sfllm.worker.model_shard import ModelShard
from sfllm.worker.tensor_parallel import COLLECTIVE_TIMEOUT_S, TensorParallelGroup

logger = logging.getLogger(__name__)

WATCH_INTERVAL_S = 0.2
STEP_TIMEOUT_S = COLLECTIVE_TIMEOUT_S
FAILURE_GRACE_S = 5.0
STOP_TIMEOUT_S = 10.0


class RankFailed(RuntimeError):
    pass


class FollowerRanks:
    def __init__(self, config: WorkerConfig) -> None:
        """Starts ranks 1..N-1; they load the model while rank 0 does."""
        self.folder = Path(tempfile.mkdtemp(prefix="sfllm-tp-"))  # owner-only
        self.rendezvous = self.folder / "rendezvous"
        config_path = self.folder / "config.yaml"
        write_config_file(dataclasses.asdict(config), config_path)
        self._context = zmq.Context()
        self._sockets: list[zmq.Socket] = []
        self.processes: list[subprocess.Popen] = []
        for rank in range(1, config.tensor_parallel_size):
            address = f"ipc://{self.folder / f'rank-{rank}.sock'}"
            sock = self._context.socket(zmq.PAIR)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDTIMEO, int(STEP_TIMEOUT_S * 1000))
            sock.bind(address)
            self._sockets.append(sock)
            # the kernel kills a rank when the thread that started it ends (rank 0 starts them from the thread that
            # builds the worker: the worker process's main thread, or the LLM's creator); SIGKILL, as a rank
            # ignores SIGTERM (sfllm.ordered_stop) and may be inside a collective
            self.processes.append(subprocess.Popen(
                [sys.executable, "-m", "sfllm", "worker", "--config", str(config_path), "--worker-address", address,
                 "--tensor-parallel-rank", str(rank), "--rendezvous", str(self.rendezvous)],
                env=worker_environment(), preexec_fn=functools.partial(die_with_parent, signal.SIGKILL)))
        self.group: TensorParallelGroup | None = None
        self.failure: str | None = None
        self._handled = threading.Event()
        self._stopping = threading.Event()
        self._unfinished_step_age: Callable[[], float] = lambda: 0.0
        self._thread = threading.Thread(target=self._watch, name="tensor-parallel-watch", daemon=True)
        self._thread.start()

    def join(self, device: torch.device) -> TensorParallelGroup:
        """Rank 0's membership of the group (closed with the followers)."""
        self.group = TensorParallelGroup(0, len(self.processes) + 1, device, self.rendezvous, self.check)
        return self.group

    def watch_steps(self, unfinished_step_age: Callable[[], float]) -> None:
        """Also fail when `unfinished_step_age()` (seconds, called from the watch's thread) passes
        STEP_TIMEOUT_S."""
        self._unfinished_step_age = unfinished_step_age

    def relay(self, data: bytes) -> None:
        for rank, sock in enumerate(self._sockets, 1):
            try:
                sock.send(data)
            except zmq.Again:
                raise RankFailed(f"tensor-parallel rank {rank} took no step for {STEP_TIMEOUT_S:.0f} s") from None

    def check(self) -> None:
        """Raises RankFailed if a rank is lost."""
        if self.failure is not None:
            self._handled.set()
            raise RankFailed(self.failure)

    def lost_rank(self, wait_s: float) -> str | None:
        """The lost rank behind an error of the main thread (a collective that a dead rank broke), once the
        watch has seen it, within `wait_s`."""
        deadline = time.monotonic() + wait_s
        while self.failure is None and time.monotonic() < deadline:
            time.sleep(WATCH_INTERVAL_S / 4)
        if self.failure is not None:
            self._handled.set()
        return self.failure

    def _watch(self) -> None:
        while not self._stopping.wait(WATCH_INTERVAL_S):
            failure = self._find_failure()
            if failure is None:
                continue
            self.failure = failure
            logger.error("%s; the worker stops", failure)
            self._kill()
            if not self._handled.wait(FAILURE_GRACE_S):
                logger.error("the worker is held by the lost rank (in a collective or a copy); it exits")
                os._exit(1)
            return

    def _find_failure(self) -> str | None:
        for rank, process in enumerate(self.processes, 1):
            code = process.poll()
            if code:  # 0: it took a Shutdown, which rank 0 relays when it stops too
                how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
                return f"tensor-parallel rank {rank} (pid {process.pid}) {how}"
        age = self._unfinished_step_age()
        if age > STEP_TIMEOUT_S:
            return (f"a step has not finished after {age:.0f} s: a tensor-parallel rank hangs, and the others "
                    f"wait for it in a collective")
        return None

    def _kill(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()

    def close(self, graceful: bool = True) -> None:
        """Stops the followers (a Shutdown ends their loop; a kill, those that do not stop within
        STOP_TIMEOUT_S, or all at once when not `graceful`), then leaves the group."""
        self._stopping.set()
        self._handled.set()
        self._thread.join()
        if not graceful:
            self._kill()
        shutdown = MessageCodec(SchedulerToWorker).encode(Shutdown())
        for sock in self._sockets:
            try:
                sock.send(shutdown, flags=zmq.NOBLOCK)
            except zmq.Again:
                pass  # that rank is gone or stuck: the kill below
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for process in self.processes:
            try:
                process.wait(max(deadline - time.monotonic(), 0.0))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self.group is not None and self.failure is None:
            self.group.close()  # not after a loss: NCCL could wait for the lost rank; the exit frees it all
        for sock in self._sockets:
            sock.close()
        self._context.term()
        shutil.rmtree(self.folder, ignore_errors=True)


def start_rank_zero(config: WorkerConfig, source: ModelSource) -> tuple[ModelRunner, FollowerRanks | None]:
    """The worker's ModelRunner: the whole model, or with --tensor-parallel-size N rank 0's part of it, with
    ranks 1..N-1 started beside it."""
    size = config.tensor_parallel_size
    if size == 1:
        return ModelRunner(config, source), None
    ModelShard.of(source.config, 0, size)  # a model the size does not split fails before any rank starts
    device = pick_device(config.device, 0, size)
    followers = FollowerRanks(config)
    try:
        runner = ModelRunner(config, source, followers.join(device))
    except BaseException:
        followers.close(graceful=False)  # they wait for rank 0 at a barrier or in a collective
        raise
    if device.type == "cuda":
        followers.watch_steps(runner.unfinished_step_age)
    return runner, followers
