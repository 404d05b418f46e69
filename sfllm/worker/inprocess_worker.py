"""The worker in the caller's process: what the offline LLM API drives."""
from __future__ import annotations

import os

from sfllm.config import EngineConfig
from sfllm.messages import PROTOCOL_VERSION, ForwardBatch, ForwardResult, GrammarMask, WorkerReady
from sfllm.model_source import ModelSource
from sfllm.worker.model_runner import ModelRunner


def worker_ready(runner: ModelRunner) -> WorkerReady:
    return WorkerReady(protocol_version=PROTOCOL_VERSION, model_name=runner.source.name,
                       max_context_length=runner.max_context_length,
                       eos_token_ids=list(runner.source.config.eos_token_ids),
                       num_kv_blocks=runner.kv_cache.num_blocks, num_cpu_kv_blocks=runner.num_cpu_blocks,
                       block_size=runner.block_size, vocab_size=runner.source.config.vocab_size, pid=os.getpid())


class InProcessWorker:
    def __init__(self, config: EngineConfig, source: ModelSource) -> None:
        self.runner = ModelRunner(config, source)
        self.info = worker_ready(self.runner)

    def submit(self, batch: ForwardBatch) -> None:
        self.runner.execute(batch)

    def send_grammar_mask(self, mask: GrammarMask) -> None:
        self.runner.apply_grammar_mask(mask)

    def collect(self) -> ForwardResult:
        return self.runner.next_result(wait=True)
