"""Host time of the scheduler under a flood, with no model: `schedule()` and `process_result()` per step.

The priority benchmark's flood, as the scheduler meets it: `--requests` background requests of
`--prompt-len` tokens arrive at once, `max_running_requests` (the default, 256) run, the rest wait; steps
go out two in flight, as the engine sends them, each result a token per sampled row. Timed once every
running request decodes, the least of `--repeats` runs of `--steps` steps (a step's time is its schedule and
its result's processing). This host time decides how early the engine must send the next step
(engine/send_timing.py), and so how often a high-priority arrival finds that step already queued.

Run: python scripts/bench_scheduler.py [--requests 600] [--priority background]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import deque
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sfllm.config import ServerConfig  # noqa: E402
from sfllm.messages import ForwardResult, GenerateRequest  # noqa: E402
from sfllm.sampling_params import SamplingParams  # noqa: E402
from sfllm.scheduler.scheduler import Scheduler  # noqa: E402

EOS = 0


def flooded_scheduler(num_requests: int, prompt_len: int, output_len: int, priority: str) -> Scheduler:
    config = ServerConfig().scheduler()
    max_context = prompt_len + output_len + 16
    num_blocks = (config.max_running_requests + 8) * -(-max_context // config.block_size)
    scheduler = Scheduler(config, num_blocks, 0, max_context, [EOS])
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True, detokenize=False)
    for i in range(num_requests):
        prompt = [1 + (i * 7919 + j) % 50000 for j in range(prompt_len)]  # distinct: no prefix-cache hits
        error = scheduler.add_request(GenerateRequest(f"r{i}", prompt, params, priority=priority))
        assert error is None, error
    return scheduler


def run(scheduler: Scheduler, steps: int, warmup: int) -> tuple[list[float], list[float]]:
    """Steps two in flight; the per-step schedule and process times of the last `steps` steps."""
    in_flight: deque = deque()
    schedule_s, process_s = [], []
    for index in range(warmup + steps):
        started = time.perf_counter()
        step = scheduler.schedule()
        scheduled = time.perf_counter()
        if step is not None:
            in_flight.append(step)
        if len(in_flight) < 2 and step is not None:
            continue
        if not in_flight:
            raise SystemExit(f"the flood ended after {index} steps: ask for fewer --steps or a longer --output-len")
        done = in_flight.popleft()
        tokens = [1 + row % 1000 for row in range(len(done.sampled))]
        result = ForwardResult(step_id=done.batch.step_id, token_ids=tokens, logprobs=[None] * len(tokens))
        before = time.perf_counter()
        scheduler.process_result(done, result)
        finished = time.perf_counter()
        if index >= warmup:
            schedule_s.append(scheduled - started)
            process_s.append(finished - before)
    return schedule_s, process_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--prompt-len", type=int, default=1024)
    parser.add_argument("--output-len", type=int, default=512)
    parser.add_argument("--priority", default="background", choices=("high", "normal", "background"))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    best: tuple[float, float, int, int] | None = None
    for _ in range(args.repeats):
        scheduler = flooded_scheduler(args.requests, args.prompt_len, args.output_len, args.priority)
        # the flood's prefill: 8,192-token steps until every slot decodes
        warmup = -(-min(args.requests, scheduler.config.max_running_requests) * args.prompt_len
                   // scheduler.config.max_running_tokens) + 4
        schedule_s, process_s = run(scheduler, args.steps, warmup)
        measured = (statistics.median(schedule_s), statistics.median(process_s), len(scheduler.running),
                    len(scheduler.waiting))
        if best is None or sum(measured[:2]) < sum(best[:2]):
            best = measured
    schedule, process, running, waiting = best
    print(f"{running} running, {waiting} waiting ({args.priority}): schedule() {1e3 * schedule:.3f} ms "
          f"({1e6 * schedule / running:.2f} us a decode), process_result() {1e3 * process:.3f} ms "
          f"({1e6 * process / running:.2f} us a decode); median of {args.steps} steps, best of {args.repeats} runs")


if __name__ == "__main__":
    main()
