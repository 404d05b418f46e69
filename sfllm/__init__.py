"""sfllm: an LLM serving engine. `from sfllm import LLM, SamplingParams` for offline use."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from sfllm.sampling_params import SamplingParams, StructuredOutput

# An install puts the kernels/ folder inside this package (pyproject.toml's package-dir); a source tree on
# PYTHONPATH, as on the GPU hosts where nothing is installed, has it beside: either way it is sfllm.kernels.
_SOURCE_TREE = Path(__file__).resolve().parent.parent
if not Path(__path__[0], "kernels").is_dir() and (_SOURCE_TREE / "kernels" / "__init__.py").is_file():
    __path__.append(str(_SOURCE_TREE))

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
