"""The worker in the caller's process: what the offline LLM API drives (with tensor parallelism, rank 0,
the other ranks in processes of their own)."""
from __future__ import annotations

import os
import weakref

from sfllm.config import WorkerConfig
from sfllm.messages import (PROTOCOL_VERSION, ForwardBatch, ForwardResult, GrammarMask, MessageCodec,
                            SchedulerToWorker, WorkerReady)
from sfllm.model_source import ModelSource
from sfllm.worker.follower_ranks import FollowerRanks, RankFailed, start_rank_zero
from sfllm.worker.model_runner import ModelRunner

LOST_RANK_WAIT_S = 1.0


def worker_ready(runner: ModelRunner) -> WorkerReady:
    return WorkerReady(protocol_version=PROTOCOL_VERSION, model_name=runner.source.name,
                       max_context_length=runner.max_context_length,
                       eos_token_ids=list(runner.source.config.eos_token_ids),
                       num_kv_blocks=runner.kv_cache.num_blocks, num_cpu_kv_blocks=runner.num_cpu_blocks,
                       block_size=runner.block_size, vocab_size=runner.source.config.vocab_size, pid=os.getpid(),
                       holds_steps=runner.may_defer, device_type=runner.device.type)


class InProcessWorker:
    in_own_process = False
    def __init__(self, config: WorkerConfig, source: ModelSource) -> None:
        self.runner, self.followers = start_rank_zero(config, source)
        self.info = worker_ready(self.runner)
        self._codec = MessageCodec(SchedulerToWorker)
        # the other ranks stop with this object, or at the interpreter's exit
        self.close = weakref.finalize(self, _stop, self.followers)

    def submit(self, batch: ForwardBatch) -> None:
        self._on_every_rank(batch)

    def send_grammar_mask(self, mask: GrammarMask) -> None:
        self._on_every_rank(mask)

    def _on_every_rank(self, message: ForwardBatch | GrammarMask) -> None:
        if self.followers is None:
            self.runner.take(message)
            return
        self.followers.check()
        self.followers.relay(self._codec.encode(message))
        try:
            self.runner.take(message)
        except RuntimeError as error:
            lost = self.followers.lost_rank(LOST_RANK_WAIT_S)
            if lost is None:
                raise
            raise RankFailed(lost) from error

    def collect(self) -> ForwardResult:
        return self.runner.next_result(wait=True)


def _stop(followers: FollowerRanks | None) -> None:
    if followers is not None:
        followers.close()
