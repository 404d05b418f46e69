"""The worker process: receives ForwardBatches from the scheduler, returns ForwardResults.

It keeps up to two steps launched: while the device runs step N it already reads and
launches step N+1, and sends step N's tokens as soon as they are ready. Between messages it
sleeps in one poll on the scheduler's socket and the completion watcher's pipe, or until a held
step is due (ModelRunner.launch_due). With tensor parallelism it is rank 0: it relays every message
to the other ranks, and holds no step (every rank must run the steps in the order they came).
"""
from __future__ import annotations

import logging
import math
import os
import signal
import time
import traceback

import zmq

from sfllm.config import WorkerConfig
from sfllm.gc_pauses import freeze_startup_objects
from sfllm.loop_time import loop_time
from sfllm.messages import (ForwardBatch, GrammarMask, MessageCodec, SchedulerToWorker, Shutdown, StartProfile,
                            StopProfile, WorkerFailed)
from sfllm.model_source import resolve_model
from sfllm.nvtx import nvtx_range
from sfllm.ordered_stop import ORDERED_STOP, SigtermFromOutside
from sfllm.worker.completion_watcher import CompletionWatcher
from sfllm.worker.follower_ranks import start_rank_zero
from sfllm.worker.attention.registry import BackendUnavailable
from sfllm.worker.inprocess_worker import worker_ready
from sfllm.worker.memory_planner import InsufficientMemory
from sfllm.worker.model_runner import DeviceUnavailable
from sfllm.worker.weight_loader import WeightLoadError

logger = logging.getLogger(__name__)

# A start that fails on the setup (the model's files, the device, memory, the flags): the message says it all. Any
# other exception is a bug and keeps its traceback in the log.
SETUP_ERRORS = (ValueError, OSError, DeviceUnavailable, BackendUnavailable, InsufficientMemory, WeightLoadError)

LOG_POLL_MS = 1000  # the longest sleep between loop-time reports (and checks of the other ranks) while idle
LOST_RANK_WAIT_S = 1.0


def run_worker(config: WorkerConfig, address: str) -> int:
    codec = MessageCodec(SchedulerToWorker)
    context = zmq.Context()
    sock = context.socket(zmq.PAIR)
    sock.setsockopt(zmq.LINGER, 1000)
    # a send that cannot complete means the scheduler is gone: give up instead of hanging as an orphan
    sock.setsockopt(zmq.SNDTIMEO, 30_000)
    sock.connect(address)
    stop = False

    def request_stop(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(ORDERED_STOP, request_stop)  # the engine's, after its Shutdown message
    signal.signal(signal.SIGTERM, SigtermFromOutside(os.getppid(), request_stop, "its engine"))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the launcher decides; Ctrl-C reaches the whole group
    try:
        source = resolve_model(config.model, config.load_format, config.cache_dir)
        runner, followers = start_rank_zero(config, source)
    except Exception as error:
        if isinstance(error, SETUP_ERRORS):
            logger.error("worker failed to start: %s", error)
        else:
            logger.exception("worker failed to start")
        sock.send(codec.encode(WorkerFailed(error=f"{type(error).__name__}: {error}")))
        sock.close()
        return 1
    # on a CPU a step has run by the time the next comes: nothing to hold
    runner.may_defer = followers is None and runner.device.type == "cuda"
    try:
        sock.send(codec.encode(worker_ready(runner)))
    except zmq.Again:
        logger.error("no scheduler took the worker's ready message within 30 s; the worker exits")
        if followers is not None:
            followers.close(graceful=False)
        return 1
    freeze_startup_objects()
    clock = runner.loop_time = loop_time(config.disable_log_stats)
    watcher = CompletionWatcher()
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    poller.register(watcher.wake_fd, zmq.POLLIN)

    def watch(launched: list) -> None:  # the loop wakes when each launched step's tokens are on the host
        for step in launched:
            if step.copied is not None:
                watcher.watch(step.copied)
    try:
        while not stop:
            if followers is not None:
                followers.check()
            watch(runner.launch_due(time.perf_counter()))
            result = runner.next_result(wait=False)
            if result is not None:
                clock.lap("waiting")
                with nvtx_range("send_result"):
                    sock.send(codec.encode(result))
                clock.lap("sending results")
                continue
            due_s = runner.seconds_until_due(time.perf_counter())
            timeout = LOG_POLL_MS if due_s is None else min(LOG_POLL_MS, math.ceil(1000 * due_s))
            events = dict(poller.poll(timeout=timeout))
            if watcher.wake_fd in events:
                watcher.drain()
            if sock not in events:
                line = clock.report(runner.num_steps)
                if line is not None:
                    if runner.num_urgent_first:
                        line += f"; {runner.num_urgent_first} urgent steps launched before a held step so far"
                    logger.info("worker loop, %s", line)
                continue
            clock.lap("waiting")
            with nvtx_range("receive"):
                data = sock.recv()
                if followers is not None:
                    followers.relay(data)
                message = codec.decode(data)
            clock.lap("receiving")
            if isinstance(message, (ForwardBatch, GrammarMask)):
                watch(runner.take(message))
            elif isinstance(message, StartProfile):
                runner.profiler.start(message.directory)
            elif isinstance(message, StopProfile):
                logger.info("profiler trace written to %s", runner.profiler.stop())
            elif isinstance(message, Shutdown):
                break
    except zmq.Again:
        logger.error("the scheduler stopped reading; the worker exits")
        return 1
    except Exception as error:
        logger.exception("worker failed")
        reason = f"{type(error).__name__}: {error}\n{traceback.format_exc()}"
        lost = followers.lost_rank(LOST_RANK_WAIT_S) if followers is not None else None
        try:
            sock.send(codec.encode(WorkerFailed(error=lost or reason)))
        except zmq.Again:
            pass
        time.sleep(0.2)
        if lost is not None:
            # the device may still run a collective that waits for the lost rank: no clean-up may wait for it
            followers.close(graceful=False)
            os._exit(1)
        return 1
    finally:
        if followers is not None:
            followers.close()
        watcher.close()
        sock.close()
        context.term()
    return 0
