"""sfllm: an LLM serving engine. `from sfllm import LLM, SamplingParams` for offline use."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sfllm.sampling_params import SamplingParams, StructuredOutput

if TYPE_CHECKING:
    from sfllm.llm import LLM

__all__ = ["LLM", "SamplingParams", "StructuredOutput"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # the offline engine pulls in torch; the frontend process must not pay for that
    if name == "LLM":
        from sfllm.llm import LLM
        return LLM
    raise AttributeError(name)
