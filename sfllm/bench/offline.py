"""`sfllm bench offline`: the standard offline workload through the engine, against its roofline.

Default workload: 256 requests, input and output lengths uniform in [100, 1024] (seed 0,
random token ids), EOS ignored. The engine runs at the product's defaults, as `LLM(model=...)`
does; the engine flags below change only what they name. The memory roofline is what the
workload must read at least: the weights once per step the engine ran, plus every decode step's
KV context, over the device-to-device copy bandwidth measured on the spot.
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from sfllm.bench.collector_pauses import CollectorPauses
from sfllm.bench.profiler_trace import format_idle_causes, gpu_idle, idle_causes, top_kernels
from sfllm.bench.workload import BENCH_CONSTRAINTS, RandomTokenWorkload, RequestSpec, parse_length_range
from sfllm.loop_time import LoopTime
from sfllm.sampling_params import SamplingParams


@dataclass
class OfflineReport:
    engine: str
    device: str
    model: str
    dtype: str
    requests: int
    input_tokens: int
    output_tokens: int
    wall_s: float
    output_tokens_per_s: float
    total_tokens_per_s: float
    steps: int | None = None
    copy_bandwidth_gb_s: float | None = None
    roofline_s: float | None = None
    roofline_fraction: float | None = None
    gpu_idle_fraction: float | None = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="qwen3-0.6b")
    parser.add_argument("--load-format", default="dummy")
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--input-len", default="100:1024", help="A[:B], uniform")
    parser.add_argument("--output-len", default="100:1024", help="A[:B], uniform")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="sfllm's decoding: 0 greedy, above it sampled (the baseline stays greedy)")
    parser.add_argument("--top-p", type=float, default=1.0,
                        help="below 1: nucleus sampling, drawn by the eager sampler from the step's logits")
    parser.add_argument("--top-k", type=int, default=-1,
                        help="above 0: top-k sampling, drawn by the eager sampler from the step's logits")
    parser.add_argument("--workload", choices=["random", "repeat"], default="random",
                        help="repeat: chat prompts asking to repeat a paragraph word for word (the model's own "
                             "tokenizer; output up to --output-len tokens, EOS ends it), where speculative "
                             "decoding's n-gram drafts are accepted")
    parser.add_argument("--spec-force-reject", action="store_true",
                        help="with --speculative-method: drafts the target almost never samples (a token after "
                             "the last one), for speculation's overhead when nothing is accepted")
    parser.add_argument("--structured-output", choices=["none", *BENCH_CONSTRAINTS], default="none",
                        help="json_schema: every request follows BENCH_SCHEMA, a list of records too long to close "
                             "within the output lengths, so both runs decode the same tokens; structural_tag: "
                             "free text with BENCH_SCHEMA as a call behind a <tool_call> trigger")
    engine = parser.add_argument_group("engine settings (default: the engine's own, as `sfllm launch` and "
                                       "`LLM()` use them)")
    for flag, kind in ENGINE_FLAGS.items():
        if kind is bool:
            engine.add_argument(flag, action="store_const", const=True, default=None)
        else:
            engine.add_argument(flag, type=kind, default=None)
    parser.add_argument("--profile-steps", type=int, default=0, help="write a profiler trace of N steps")
    parser.add_argument("--profile-skip-steps", type=int, default=200, help="steps to run before the trace starts")
    parser.add_argument("--profile-dir", default="sfllm-profiles")
    parser.add_argument("--baseline", choices=["none", "transformers"], default="none")
    parser.add_argument("--baseline-requests", type=int, default=64,
                        help="requests of the workload the (slow) transformers baseline runs")
    parser.add_argument("--baseline-batch-size", type=int, default=32)
    parser.add_argument("--output-file", default=None)


ENGINE_FLAGS = {"--dtype": str, "--device": str, "--max-context-length": int, "--max-running-requests": int,
                "--max-running-tokens": int, "--attention-backend": str, "--schedule-policy": str,
                "--cuda-graph-max-bs": int, "--disable-cuda-graph": bool, "--disable-overlap": bool,
                "--mem-fraction": float, "--cpu-kv-cache-gib": float, "--num-kv-blocks": int,
                "--tensor-parallel-size": int, "--cpu-threads": int,
                "--speculative-method": str, "--num-speculative-tokens": int, "--speculative-ngram-min": int,
                "--speculative-ngram-max": int, "--speculative-max-batch-size": int,
                "--speculative-min-acceptance-rate": float}

REPEAT_PARAGRAPHS = (
    "The committee met on Tuesday to review the budget. After a long discussion, the members agreed to fund the "
    "new library, repair the old bridge, and plant two hundred trees along the river before the end of spring.",
    "Our shop opens at nine in the morning and closes at six in the evening. On Saturdays we close at noon, and "
    "on Sundays we stay closed so that everyone who works here can spend the day with their families.",
    "To make the bread, mix the flour with warm water, salt and yeast, knead the dough for ten minutes, let it "
    "rise for an hour in a warm place, then bake it for forty minutes until the crust is golden brown.",
    "The train to the coast leaves from platform four every two hours. Tickets can be bought at the station or "
    "online, and children under twelve travel for half the price when they are with an adult.",
)


def repeat_prompts(llm, count: int) -> list[list[int]]:
    """Chat prompts asking the model to repeat a text of two paragraphs: its answer is mostly in its prompt."""
    def text(i: int) -> str:
        return "\n\n".join(REPEAT_PARAGRAPHS[(i + j) % len(REPEAT_PARAGRAPHS)] for j in range(2))
    return [llm.tokenizer.apply_chat_template([{"role": "user", "content": f"Repeat this text word for word:\n\n"
                                                f"{text(i)}"}]) for i in range(count)]


class RejectedDrafts:
    """Drafts of the token after the last one, repeated: a model of real weights or random ones almost never
    samples them, so every verify step pays for its drafts and gains nothing."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def propose(self, token_ids: list[int], max_drafts: int) -> list[int]:
        return [(token_ids[-1] + 1) % self.vocab_size] * max_drafts


def engine_settings(args: argparse.Namespace) -> dict:
    """The engine flags given on the command line, as LLM() keywords."""
    names = [flag[2:].replace("-", "_") for flag in ENGINE_FLAGS]
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


class StepHostTimes:
    """Host time of each step's launch (ModelRunner.execute: on a GPU its staging, copies and launches,
    no waiting for the GPU; on a CPU device the step itself), recorded by wrapping the runner's execute
    for the timed run."""

    def __init__(self, runner) -> None:
        self.decode: list[float] = []
        self.mixed: list[tuple[int, float]] = []  # (tokens, seconds)
        self._execute = runner.execute
        runner.execute = self._timed

    def _timed(self, batch):
        started = time.perf_counter()
        pending = self._execute(batch)
        elapsed = time.perf_counter() - started
        if len(batch.input_token_ids) == len(batch.slots):
            self.decode.append(elapsed)
        else:
            self.mixed.append((len(batch.input_token_ids), elapsed))
        return pending

    def summary(self) -> str:
        def us(values: list[float]) -> str:
            return f"p50 {1e6 * float(np.median(values)):.0f} us, max {1e6 * max(values):.0f} us"
        lines = []
        if self.decode:
            lines.append(f"  decode steps ({len(self.decode)}): {us(self.decode)}")
        if self.mixed:
            largest = max(tokens for tokens, _ in self.mixed)
            lines.append(f"  prefill/mixed steps ({len(self.mixed)}): {us([t for _, t in self.mixed])}")
            full = [t for tokens, t in self.mixed if tokens == largest]
            lines.append(f"  steps of {largest} tokens ({len(full)}): {us(full)}")
        return "host time per step launch:\n" + "\n".join(lines)


def measure_copy_bandwidth(device: torch.device) -> float:
    """Bytes read plus written per second by a large device-to-device copy, median of 20."""
    if device.type != "cuda":
        return float("nan")
    size = 1 << 30
    src = torch.empty(size, dtype=torch.uint8, device=device)
    src.random_(0, 255)
    dst = torch.empty_like(src)
    times = []
    for _ in range(25):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * size / float(np.median(times[5:]))


def roofline_seconds(specs: list[RequestSpec], steps: int, weight_bytes: int, kv_bytes_per_token: int,
                     bandwidth: float) -> float:
    kv_reads = 0
    for spec in specs:
        # the decode step producing output token t (t >= 1) reads input_len + t cached tokens
        n, i = spec.output_len - 1, spec.input_len
        kv_reads += n * i + n * (n + 1) // 2
    return (steps * weight_bytes + kv_reads * kv_bytes_per_token) / bandwidth


def run_sfllm(args: argparse.Namespace, specs: list[RequestSpec]) -> tuple[OfflineReport, dict]:
    from sfllm.llm import LLM
    llm = LLM(model=args.model, load_format=args.load_format, seed=args.seed, **engine_settings(args))
    runner = llm.engine.worker.runner
    speculation = llm.engine.scheduler.speculation
    if args.spec_force_reject:
        speculation.proposer = RejectedDrafts(llm.source.config.vocab_size)
    structured_output = BENCH_CONSTRAINTS.get(args.structured_output)
    repeat = args.workload == "repeat"
    if repeat:
        specs = [RequestSpec(p, s.output_len, len(p)) for p, s in zip(repeat_prompts(llm, len(specs)), specs)]
    params = [SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                             max_tokens=s.output_len, ignore_eos=not repeat, detokenize=False,
                             structured_output=structured_output)
              for s in specs]
    prompts = [list(s.prompt) for s in specs]
    warm_up = prompts[:4]
    llm.generate(warm_up, [SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)] * len(warm_up))
    if runner.device.type == "cuda":
        torch.cuda.synchronize()
    # the roofline's bandwidth: the card's, read before and after the run (one reading varied by ~3% between runs
    # of equal wall time), the higher of the two
    bandwidth_before = measure_copy_bandwidth(runner.device)
    steps_before = llm.engine.num_steps
    if args.profile_steps:
        runner.profiler.start_after(args.profile_dir, args.profile_skip_steps, args.profile_steps)
    host_times = StepHostTimes(runner)
    # one clock for the engine and the worker in this process: the host's time per step, phase by phase
    engine_loop = llm.engine.loop_time = runner.loop_time = LoopTime(interval_s=0.0)
    started = time.perf_counter()
    with CollectorPauses() as collector:
        results = llm.generate(prompts, params)
    wall = time.perf_counter() - started
    print(host_times.summary())
    print(collector.summary())
    if structured_output is not None:
        masks = engine_loop.seconds.get("grammar masks", 0.0)
        steps_run = max(llm.engine.num_steps - steps_before, 1)
        print(f"grammar masks: {1e6 * masks / steps_run:.0f} us/step in the engine ({100 * masks / wall:.1f}% of the "
              f"wall time), {engine_loop.calls.get('grammar masks', 0)} masks")
    print(f"host loop: {engine_loop.report(llm.engine.num_steps - steps_before)}")
    steps = llm.engine.num_steps - steps_before
    output_tokens = sum(len(r.outputs[0].token_ids) for r in results)
    if speculation.enabled:
        print(f"speculation: {llm.engine.scheduler.speculation_summary()} (with the warm-up), {steps} steps for "
              f"{output_tokens} output tokens")
    input_tokens = sum(len(p) for p in prompts)
    report = OfflineReport("sfllm", _device_name(runner.device), args.model, str(runner.dtype), len(specs),
                           input_tokens, output_tokens, wall, output_tokens / wall, (input_tokens + output_tokens) / wall,
                           steps)
    if runner.device.type == "cuda":
        # with tensor parallelism, one rank's: each GPU reads its part of the weights and KV cache at once
        c = llm.source.config
        weight_bytes = sum(p.numel() * p.element_size() for p in runner.model.parameters())
        kv_per_token = 2 * c.num_layers * runner.shard.num_kv_heads * c.head_dim * runner.dtype.itemsize
        bandwidth_after = measure_copy_bandwidth(runner.device)
        bandwidth = max(bandwidth_before, bandwidth_after)
        print(f"copy bandwidth before / after the run: {bandwidth_before / 1e9:.0f} / {bandwidth_after / 1e9:.0f} GB/s")
        report.copy_bandwidth_gb_s = bandwidth / 1e9
        report.roofline_s = roofline_seconds(specs, steps, weight_bytes, kv_per_token, bandwidth)
        report.roofline_fraction = report.roofline_s / wall
    if runner.profiler.last_trace is not None:
        idle = gpu_idle(runner.profiler.last_trace)
        report.gpu_idle_fraction = idle.idle_fraction
        print(f"profiled {args.profile_steps} steps: GPU idle {100 * idle.idle_fraction:.1f}% of "
              f"{idle.span_us / 1000:.1f} ms ({idle.num_kernels} kernels), trace {runner.profiler.last_trace}")
        for kernel in top_kernels(runner.profiler.last_trace):
            print(f"  {kernel.total_us / 1000:9.2f} ms {100 * kernel.total_us / max(idle.busy_us, 1):5.1f}% "
                  f"x{kernel.count:<5d} {kernel.name[:100]}")
        print(format_idle_causes(idle_causes(runner.profiler.last_trace)))
    extra = {"graph_capture_s": getattr(runner.graph_runner, "capture_seconds", None),
             "graph_capture_bytes": getattr(runner.graph_runner, "capture_bytes", None),
             "decode_graph_max_batch": getattr(runner.graph_runner, "max_decode_batch", None),
             "mixed_graph_max_tokens": runner.graph_runner.mixed_sizes[-1] if runner.graph_runner else None,
             "kv_blocks": runner.kv_cache.num_blocks, "attention_backend": runner.backend.name,
             "preemptions": llm.engine.scheduler.num_preemptions,
             "spec_proposed_tokens": speculation.num_proposed, "spec_accepted_tokens": speculation.num_accepted}
    del llm, runner
    gc.collect()  # the engine's objects hold reference cycles; free its GPU memory for the baseline
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return report, extra


def run_transformers(args: argparse.Namespace, specs: list[RequestSpec]) -> OfflineReport:
    """The same requests through transformers' generate(), in static padded batches."""
    import transformers

    from sfllm.model_source import resolve_model
    from sfllm.worker.model_runner import pick_device, pick_dtype
    source = resolve_model(args.model, args.load_format)
    device = pick_device(args.device or "auto")
    dtype = pick_dtype(args.dtype or "auto", source.config.torch_dtype, device)
    if source.folder is not None and source.load_format != "dummy":
        model = transformers.AutoModelForCausalLM.from_pretrained(source.folder, dtype=dtype)
    else:
        from sfllm.model_source.dummy_presets import transformers_config
        model = transformers.AutoModelForCausalLM.from_config(transformers_config(source.config), dtype=dtype)
    model = model.to(device).eval()
    model.generation_config.eos_token_id = None
    specs = specs[:args.baseline_requests]
    output_tokens = input_tokens = 0
    started = time.perf_counter()
    for first in range(0, len(specs), args.baseline_batch_size):
        batch = specs[first:first + args.baseline_batch_size]
        longest = max(s.input_len for s in batch)
        ids = torch.zeros(len(batch), longest, dtype=torch.long)
        mask = torch.zeros(len(batch), longest, dtype=torch.long)
        for row, spec in enumerate(batch):  # left padding, as generate() wants for decoder-only models
            ids[row, longest - spec.input_len:] = torch.tensor(spec.prompt)
            mask[row, longest - spec.input_len:] = 1
        new_tokens = max(s.output_len for s in batch)
        with torch.no_grad():
            model.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        output_tokens += sum(s.output_len for s in batch)  # only the tokens each request asked for count
        input_tokens += sum(s.input_len for s in batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - started
    return OfflineReport(f"transformers (static batches of {args.baseline_batch_size})", _device_name(device),
                         args.model, str(dtype), len(specs), input_tokens, output_tokens, wall, output_tokens / wall,
                         (input_tokens + output_tokens) / wall)


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or 'x86'})"


def _print(report: OfflineReport) -> None:
    print(f"\n== {report.engine} on {report.device}: {report.model} ({report.dtype})")
    print(f"requests {report.requests}, input tokens {report.input_tokens}, output tokens {report.output_tokens}")
    print(f"wall time {report.wall_s:.2f} s, output {report.output_tokens_per_s:.1f} tok/s, "
          f"total {report.total_tokens_per_s:.1f} tok/s")
    if report.roofline_s is not None:
        print(f"steps {report.steps}, copy bandwidth {report.copy_bandwidth_gb_s:.0f} GB/s, memory roofline "
              f"{report.roofline_s:.2f} s -> {100 * report.roofline_fraction:.1f}% of roofline")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="sfllm bench offline", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    from sfllm.model_source import resolve_model
    vocab = resolve_model(args.model, args.load_format).config.vocab_size
    workload = RandomTokenWorkload(parse_length_range(args.input_len), parse_length_range(args.output_len),
                                   vocab, args.seed)
    specs = workload.take(args.num_requests)
    if args.workload == "repeat" and args.baseline != "none":
        parser.error("--workload repeat has no baseline: its prompts are made with the engine's tokenizer")
    from sfllm.worker.memory_planner import InsufficientMemory
    try:
        report, extra = run_sfllm(args, specs)
    except InsufficientMemory as error:  # its message names the flags that make room
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    _print(report)
    output = {"config": vars(args), "sfllm": asdict(report) | extra}
    if args.baseline == "transformers":
        baseline = run_transformers(args, specs)
        _print(baseline)
        ratio = report.output_tokens_per_s / baseline.output_tokens_per_s
        print(f"\nsfllm / transformers output tokens/s: {ratio:.1f}x")
        output["transformers"] = asdict(baseline)
        output["speedup"] = ratio
    if args.output_file:
        with open(args.output_file, "w") as f:
            json.dump(output, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
