"""A tensor-parallel rank other than 0: runs every step that rank 0 relays to it and reports nothing.

Rank 0 starts it (sfllm.worker.follower_ranks), watches it and stops it (a Shutdown message, else a kill); the
kernel kills it when rank 0 dies, inside a collective too (no handler waits for Python to run). It ignores SIGTERM,
which systemd's default KillMode sends every process of the unit at once (sfllm.ordered_stop).
"""
from __future__ import annotations

import logging
import signal
from pathlib import Path

import zmq

from sfllm.config import WorkerConfig
from sfllm.gc_pauses import freeze_startup_objects
from sfllm.messages import ForwardBatch, GrammarMask, MessageCodec, SchedulerToWorker, Shutdown
from sfllm.model_source import resolve_model
from sfllm.worker.model_runner import ModelRunner, pick_device
from sfllm.worker.tensor_parallel import TensorParallelGroup

logger = logging.getLogger(__name__)


def run_follower(config: WorkerConfig, address: str, rank: int, rendezvous: Path) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the launcher decides; Ctrl-C reaches the whole group
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # rank 0 stops it (sfllm.ordered_stop); its death kills it
    codec = MessageCodec(SchedulerToWorker)
    context = zmq.Context()
    sock = context.socket(zmq.PAIR)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    size = config.tensor_parallel_size
    group: TensorParallelGroup | None = None
    try:
        source = resolve_model(config.model, config.load_format, config.cache_dir)
        group = TensorParallelGroup(rank, size, pick_device(config.device, rank, size), rendezvous)
        runner = ModelRunner(config, source, group)
        freeze_startup_objects()  # rank 0 waits for this rank in every collective: its pauses are everyone's
        while True:
            message = codec.decode(sock.recv())
            if isinstance(message, (ForwardBatch, GrammarMask)):
                runner.take(message)
                while runner.next_result(wait=False) is not None:
                    pass  # rank 0 reports these tokens: it drew the same
            elif isinstance(message, Shutdown):
                return 0
    except Exception:
        logger.exception("tensor-parallel rank %d failed", rank)
        return 1
    finally:
        if group is not None:
            group.close()
        sock.close()
        context.term()
