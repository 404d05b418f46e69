"""vLLM's and SGLang's names for sfllm's settings, as their users pass them: `LLM(max_model_len=4096)`,
`sfllm launch --gpu-memory-utilization 0.8`, a config file's `max_num_seqs: 128`.

Each maps onto the one sfllm setting that means the same. Near, not equal: SGLang's `mem_fraction_static` leaves
activations out of its fraction where sfllm's `mem_fraction` counts them; SGLang's `chunked_prefill_size` caps a
prompt's chunk where sfllm's `max_running_tokens` caps a step's tokens, which bounds its chunks too (sfllm always
chunks: SGLang's -1 is refused).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class OtherName:
    setting: str  # sfllm's
    engine: str  # whose name it is
    negated: bool = False  # true for sfllm's setting is false for this one (vLLM's enable_prefix_caching)
    values: tuple[tuple[str, str], ...] = ()  # the other engine's values -> sfllm's, where they differ

    def value(self, given: object) -> object:
        if self.negated and isinstance(given, bool):
            return not given
        return dict(self.values).get(given, given) if isinstance(given, str) else given


OTHER_NAMES = {
    "max_model_len": OtherName("max_context_length", "vLLM"),
    "gpu_memory_utilization": OtherName("mem_fraction", "vLLM"),
    "max_num_seqs": OtherName("max_running_requests", "vLLM"),
    "max_num_batched_tokens": OtherName("max_running_tokens", "vLLM"),
    "enforce_eager": OtherName("disable_cuda_graph", "vLLM"),
    "enable_prefix_caching": OtherName("disable_prefix_cache", "vLLM", negated=True),
    "max_cudagraph_capture_size": OtherName("cuda_graph_max_bs", "vLLM"),
    "model_path": OtherName("model", "SGLang"),
    "context_length": OtherName("max_context_length", "SGLang"),
    "mem_fraction_static": OtherName("mem_fraction", "SGLang"),
    "chunked_prefill_size": OtherName("max_running_tokens", "SGLang"),
    "disable_radix_cache": OtherName("disable_prefix_cache", "SGLang"),
    "tp_size": OtherName("tensor_parallel_size", "SGLang"),
    "random_seed": OtherName("seed", "SGLang"),
    "sampling_defaults": OtherName("generation_config", "SGLang", values=(("model", "auto"), ("openai", "sfllm"))),
}

# Other engines' words for the values of sfllm's settings of the same name, by setting
OTHER_VALUES = {
    "dtype": {"half": "float16", "float": "float32"},  # vLLM's (`--dtype half`, common in commands for older cards)
    "tool_call_parser": {"qwen": "hermes", "qwen25": "hermes", "llama3": "llama3_json"},  # SGLang's parsers' names
}

# vLLM's one-dash flags, by sfllm's setting
SHORT_FLAGS = {"tensor_parallel_size": "-tp"}

# Accepted and without effect, and why
NO_EFFECT = {
    "trust_remote_code": "sfllm runs its own code for every architecture it serves, never a model folder's",
    "enable_auto_tool_choice": "sfllm reads the model's tool calls whenever a request has tools "
                               "(--tool-call-parser picks their format)",
    "enable_metrics": "sfllm always serves /metrics (SGLang's flag)",
    "enable_chunked_prefill": "sfllm always chunks prompts into steps of max_running_tokens (vLLM's flag)",
    "disable_custom_all_reduce": "sfllm's tensor parallelism reduces with NCCL alone (vLLM's flag)",
    "disable_log_requests": "sfllm logs no request's prompt or parameters (vLLM's flag)",
}
# of those, the flags older vLLM also took a true or false after
NO_EFFECT_WITH_VALUE = frozenset({"enable_chunked_prefill"})
