"""The worker process as the engine core sees it: a WorkerHandle over a PAIR socket that notices the process die."""
from __future__ import annotations

import subprocess
import time

import zmq

from sfllm.messages import (PROTOCOL_VERSION, ForwardBatch, ForwardResult, GrammarMask, MessageCodec, WorkerFailed,
                            WorkerReady, WorkerToScheduler)

WORKER_START_TIMEOUT_S = 1800.0


class WorkerDied(RuntimeError):
    pass


class RemoteWorker:
    """The worker process behind a PAIR socket, as EngineCore's WorkerHandle."""
    in_own_process = True

    def __init__(self, sock: zmq.Socket, process: subprocess.Popen) -> None:
        self.sock = sock
        self.process = process
        self.codec = MessageCodec(WorkerToScheduler)
        self.info = self._wait_ready()

    def _receive(self, timeout_s: float) -> object:
        deadline = time.monotonic() + timeout_s
        while not self.sock.poll(timeout=200):
            if self.process.poll() is not None:
                raise WorkerDied(f"the worker process exited with code {self.process.returncode}")
            if time.monotonic() > deadline:
                raise WorkerDied(f"the worker did not answer within {timeout_s:.0f} s")
        message = self.codec.decode(self.sock.recv())
        if isinstance(message, WorkerFailed):
            raise WorkerDied(f"the worker failed: {message.error}")
        return message

    def _wait_ready(self) -> WorkerReady:
        message = self._receive(WORKER_START_TIMEOUT_S)
        if not isinstance(message, WorkerReady) or message.protocol_version != PROTOCOL_VERSION:
            raise WorkerDied(f"the worker speaks protocol {getattr(message, 'protocol_version', '?')}, "
                             f"the scheduler {PROTOCOL_VERSION}: install one sfllm version for both")
        return message

    def submit(self, batch: ForwardBatch) -> None:
        self.send(batch)

    def send(self, message: object) -> None:
        data = self.codec.encode(message)
        # A PAIR socket whose peer is gone blocks its sends: wait in slices, checking the worker lives.
        while True:
            try:
                self.sock.send(data)
                return
            except zmq.Again:
                self.check_alive()

    def send_grammar_mask(self, mask: GrammarMask) -> None:
        self.send(mask)

    def collect(self) -> ForwardResult:
        message = self._receive(600.0)
        if not isinstance(message, ForwardResult):
            raise WorkerDied(f"the worker sent {type(message).__name__} where a step result was due")
        return message

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise WorkerDied(f"the worker process exited with code {self.process.returncode}")
