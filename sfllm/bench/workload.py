"""What a serving benchmark sends and when: prompts, output lengths and arrival times."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from sfllm.sampling_params import StructuredOutput


# What the structured-output benchmarks constrain every request to: a list of records too long to close
# within their output lengths, so that a run with it and one without decode the same number of tokens
BENCH_SCHEMA = {"type": "object", "required": ["id", "notes"], "properties": {
    "id": {"type": "integer"},
    "notes": {"type": "array", "minItems": 200, "items": {
        "type": "object", "required": ["title", "score"],
        "properties": {"title": {"type": "string"}, "score": {"type": "number"}}}}}}
# the constraints a benchmark can put on every request: BENCH_SCHEMA itself, or as a tool call behind a trigger in
# free text (a random model's text rarely writes the trigger: this times a structural tag's free text)
BENCH_STRUCTURAL_TAG = {"triggers": ["<tool_call>"], "structures": [
    {"begin": "<tool_call>\n", "schema": BENCH_SCHEMA, "end": "\n</tool_call>"}]}
BENCH_CONSTRAINTS = {
    "json_schema": StructuredOutput.json_schema(BENCH_SCHEMA),
    "structural_tag": StructuredOutput.structural_tag(BENCH_STRUCTURAL_TAG),
}


class WorkloadError(ValueError):
    pass


@dataclass(frozen=True)
class LengthRange:
    """Token counts drawn uniformly from [low, high], both inclusive."""

    low: int
    high: int

    def __str__(self) -> str:
        return str(self.low) if self.low == self.high else f"{self.low}:{self.high}"

    def sample(self, rng: np.random.Generator, n: int) -> list[int]:
        return rng.integers(self.low, self.high + 1, size=n).tolist()


def parse_length_range(text: str) -> LengthRange:
    """Parse `A` or `A:B` (A <= B, both >= 1)."""
    parts = text.split(":")
    if len(parts) > 2:
        raise WorkloadError(f"length range {text!r} is not A or A:B")
    try:
        low, high = int(parts[0]), int(parts[-1])
    except ValueError:
        raise WorkloadError(f"length range {text!r} is not A or A:B with integers") from None
    if low < 1 or high < low:
        raise WorkloadError(f"length range {text!r} needs 1 <= A <= B")
    return LengthRange(low, high)


@dataclass(frozen=True)
class RequestSpec:
    prompt: str | list[int]
    output_len: int
    # Known only for token-id prompts; a text prompt's length is what the server's usage says.
    input_len: int | None


class Workload(Protocol):
    def take(self, n: int) -> list[RequestSpec]:
        """The next `n` requests; successive calls never repeat a random prompt."""
        ...


class RandomTokenWorkload:
    """Prompts of random token ids, sent as id lists so their length is exact."""

    def __init__(self, input_len: LengthRange, output_len: LengthRange, vocab_size: int, seed: int) -> None:
        if vocab_size < 2:
            raise WorkloadError(f"--vocab-size must be at least 2, got {vocab_size}")
        self.input_len = input_len
        self.output_len = output_len
        self.vocab_size = vocab_size
        self.rng = np.random.default_rng(seed)

    def take(self, n: int) -> list[RequestSpec]:
        input_lens = self.input_len.sample(self.rng, n)
        output_lens = self.output_len.sample(self.rng, n)
        return [
            RequestSpec(self.rng.integers(0, self.vocab_size, size=in_len).tolist(), out_len, in_len)
            for in_len, out_len in zip(input_lens, output_lens)
        ]


class PromptFileWorkload:
    """One prompt per non-empty line, taken in file order and wrapping around at the end.

    Taking in order means consecutive levels get different prompts while the file lasts,
    so a prefix cache does not turn a later level into a cache-hit benchmark."""

    def __init__(self, path: Path, output_len: LengthRange, seed: int) -> None:
        self.prompts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not self.prompts:
            raise WorkloadError(f"prompt file {path} has no non-empty lines")
        self.output_len = output_len
        self.rng = np.random.default_rng(seed)
        self.next_line = 0

    def take(self, n: int) -> list[RequestSpec]:
        output_lens = self.output_len.sample(self.rng, n)
        specs = []
        for out_len in output_lens:
            specs.append(RequestSpec(self.prompts[self.next_line], out_len, None))
            self.next_line = (self.next_line + 1) % len(self.prompts)
        return specs


def poisson_arrival_times(n: int, rate: float, rng: np.random.Generator) -> list[float]:
    """Send times in seconds from the start of a level; `rate` inf sends everything at once."""
    if rate == float("inf"):
        return [0.0] * n
    gaps = rng.exponential(1.0 / rate, size=n)
    gaps[0] = 0.0
    return np.cumsum(gaps).tolist()
