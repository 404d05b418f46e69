"""Host time per decode step of 64 rows constrained by the offline bench's JSON schema, on the CPU: what lies
between step N's tokens coming back and step N+1's sampling being launched. `--constraint structural_tag`: the
same schema as a tool call behind a `<tool_call>` trigger in free text (a random path rarely writes the trigger,
so this times the free text's masks, where such rows spend most of their tokens).

The qwen3-0.6b dummy tokenizer (vocabulary 151,936) and BENCH_SCHEMA, as `sfllm bench offline --load-format
dummy --structured-output json_schema` runs them. Each row follows its own valid path, drawn beforehand: at
every step a token chosen at random among those its mask allows, as greedy decoding of random weights does.
Per step, in the order of the engine: the matchers take their tokens, the scheduler fills the masks, the
GrammarMask message is encoded and decoded (only a worker in another process, or the other tensor-parallel
ranks, pay this), the worker builds its bitmask, and the sampler applies it to CPU logits (on a GPU this is
a few kernel launches; here it is the CPU's own arithmetic, timed on one step in 16).

    python scripts/bench_grammar_step.py [--rows 64] [--steps 512] [--threads N] [--constraint structural_tag]
"""
from __future__ import annotations

import argparse
import time
from collections import defaultdict

import llguidance
import numpy as np
import torch

from sfllm.bench.workload import BENCH_CONSTRAINTS
from sfllm.messages import GrammarMask, MessageCodec, SchedulerToWorker
from sfllm.model_source.resolve import resolve_model
from sfllm.model_source.tokenizer_spec import tokenizer_spec
from sfllm.sampling_params import StructuredOutput
from sfllm.scheduler.grammar_matchers import GrammarMatchers, accepts
from sfllm.worker.token_mask import TokenBitmasks, apply_bitmask

APPLY_EVERY = 16


def token_paths(grammars: GrammarMatchers, constraint: StructuredOutput, rows: int, steps: int,
                seed: int) -> list[list[int]]:
    """Per row, `steps` tokens its grammar accepts one after another (shorter where it completes)."""
    rng = np.random.default_rng(seed)
    paths = []
    for _ in range(rows):
        matcher = grammars.matcher(constraint)
        path: list[int] = []
        while len(path) < steps and not matcher.is_stopped():
            words = np.frombuffer(matcher.compute_bitmask(), dtype="<u4")
            bits = np.unpackbits(words.view(np.uint8), bitorder="little")[:grammars.vocab_size]
            token = int(rng.choice(np.flatnonzero(bits)))
            assert accepts(matcher, token)
            path.append(token)
        paths.append(path)
    return paths


def run(grammars: GrammarMatchers, constraint: StructuredOutput, paths: list[list[int]],
        steps: int) -> dict[str, float]:
    """Seconds spent in each part over `steps` steps."""
    codec = MessageCodec(SchedulerToWorker)
    worker_masks = TokenBitmasks(grammars.vocab_size, torch.device("cpu"))
    rows = list(range(len(paths)))
    matchers: list[llguidance.LLMatcher | None] = [grammars.matcher(constraint) for _ in paths]
    logits = torch.randn(len(paths), grammars.vocab_size)
    seconds: dict[str, float] = defaultdict(float)
    for step in range(steps):
        t0 = time.perf_counter()
        for row, matcher in enumerate(matchers):
            if matcher is None:
                continue
            if step >= len(paths[row]):
                matchers[row] = None  # finished: its row allows every token
                continue
            accepts(matcher, paths[row][step])
            matcher.is_stopped()
        t1 = time.perf_counter()
        packed = grammars.masks(matchers)
        t2 = time.perf_counter()
        received = codec.decode(codec.encode(GrammarMask(step_id=step, bitmask=packed)))
        t3 = time.perf_counter()
        bitmask = worker_masks.bitmask(packed, rows, rows)
        t4 = time.perf_counter()
        if step % APPLY_EVERY == 0:  # ~35 ms of CPU arithmetic each: a sample of the steps
            apply_bitmask(logits, bitmask)
        t5 = time.perf_counter()
        assert len(received.bitmask) == len(packed)
        for part, start, end in (("consume tokens", t0, t1), ("fill masks", t1, t2),
                                 ("encode+decode (IPC/TP only)", t2, t3), ("worker bitmask", t3, t4),
                                 ("apply bitmask (CPU logits)", t4, t5)):
            seconds[part] += end - start
    seconds["apply bitmask (CPU logits)"] *= APPLY_EVERY
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--steps", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3, help="the fastest run of each part counts")
    parser.add_argument("--threads", type=int, default=None, help="LLExecutor threads (default: llguidance's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--constraint", choices=sorted(BENCH_CONSTRAINTS), default="json_schema")
    args = parser.parse_args()
    source = resolve_model("qwen3-0.6b", "dummy")
    grammars = GrammarMatchers(tokenizer_spec(source).tokenizer_json, source.config.vocab_size,
                               list(source.config.eos_token_ids), num_threads=args.threads)
    started = time.perf_counter()
    constraint = BENCH_CONSTRAINTS[args.constraint]
    paths = token_paths(grammars, constraint, args.rows, args.steps, args.seed)
    print(f"{args.rows} paths of up to {args.steps} tokens drawn in {time.perf_counter() - started:.1f} s")
    runs = [run(grammars, constraint, paths, args.steps) for _ in range(args.repeats)]
    best = {part: min(r[part] for r in runs) for part in runs[0]}
    for part, total in best.items():
        print(f"{part:30s} {1e6 * total / args.steps:8.0f} us/step")
    engine = [p for p in best if not p.startswith(("encode", "apply"))]
    print(f"{'critical path (in-process)':30s} {1e6 * sum(best[p] for p in engine) / args.steps:8.0f} us/step "
          f"({', '.join(engine)})")


if __name__ == "__main__":
    main()
