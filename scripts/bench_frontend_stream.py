"""The frontend's share of a high-priority probe's first token under load, with no model: CPU only.

An engine stand-in that steps at a fixed pace (a ROUTER socket in a process of its own) answers as the
engine does under a flood: every `--step-ms` one token for each running request, one OutputBatch per
frontend; a request's first token at the step after it arrived, and a high-priority one's in a batch of its
own `--priority-lag-ms` after that step's (the engine runs a high-priority prefill as a step of its own).
One `sfllm frontend` serves it, and `sfllm bench priority` measures the probes alone and under
`--streams` background streams: with the engine's pace fixed, the growth of the probes' TTFT under load is
the frontend's (and the client's). Run with the frontend at `--log-level debug` to see where the probe waited
(scripts/priority_waits.py on the frontend's log).

Run: python scripts/bench_frontend_stream.py [--streams 64] [--step-ms 9]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


async def serve_engine(address: str, step_s: float, priority_lag_s: float) -> None:
    import zmq
    import zmq.asyncio

    from sfllm import messages
    from sfllm.config import DEFAULT_MODEL
    from sfllm.messages import (PROTOCOL_VERSION, AbortRequest, ClientHello, EngineHello, EngineStats,
                                GenerateRequest, Heartbeat, MessageCodec, OutputBatch, RequestOutput)
    from sfllm.model_source import resolve_model
    from sfllm.model_source.tokenizer_spec import tokenizer_spec

    tokenizer = tokenizer_spec(resolve_model(DEFAULT_MODEL))
    tokens = [504, 2365, 1242, 314, 260, 3575, 30, 378]  # ordinary words of SmolLM2's vocabulary, decoded each step
    context = zmq.asyncio.Context()
    socket = context.socket(zmq.ROUTER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.bind(address)
    decoder, encoder = MessageCodec(messages.FrontendToEngine), MessageCodec(messages.EngineToFrontend)
    running: dict[str, list] = {}  # request id -> [client identity, tokens left, outputs sent, high priority]
    arrived: list[str] = []

    async def send(identity: bytes, message: messages.Message) -> None:
        await socket.send_multipart([identity, encoder.encode(message)])

    async def receive() -> None:
        while True:
            identity, data = await socket.recv_multipart()
            message = decoder.decode(data)
            if isinstance(message, ClientHello):
                await send(identity, EngineHello(protocol_version=PROTOCOL_VERSION, model_name=DEFAULT_MODEL,
                                                 max_context_length=1 << 20, eos_token_ids=[0], num_kv_blocks=1 << 16,
                                                 block_size=16, tokenizer=tokenizer))
            elif isinstance(message, Heartbeat):
                await send(identity, EngineStats(running={}, waiting={}, num_kv_blocks=1 << 16,
                                                 num_free_kv_blocks=1 << 16, num_cached_kv_blocks=0,
                                                 prefix_cache_queries=0, prefix_cache_hits=0, num_preemptions=0,
                                                 num_steps=0, step_time_s=step_s, batch_size=len(running),
                                                 gpu_memory_allocated=0, gpu_memory_reserved=0, ready=True))
            elif isinstance(message, GenerateRequest):
                running[message.request_id] = [identity, message.params.max_tokens, 0, message.priority == "high"]
                arrived.append(message.request_id)
            elif isinstance(message, AbortRequest):
                for request_id in message.request_ids:
                    running.pop(request_id, None)

    def output(request_id: str) -> RequestOutput:
        state = running[request_id]
        state[1] -= 1
        state[2] += 1
        finished = state[1] == 0
        if finished:
            del running[request_id]
        return RequestOutput(request_id=request_id, token_ids=[tokens[state[2] % len(tokens)]], num_prompt_tokens=8,
                             finish_reason="length" if finished else None)

    receiving = asyncio.create_task(receive())
    next_step = time.perf_counter()
    while not receiving.done():
        next_step += step_s
        await asyncio.sleep(max(0.0, next_step - time.perf_counter()))
        new = set(arrived)
        arrived.clear()
        high = [r for r in new if r in running and running[r][3]]
        batches: dict[bytes, list[RequestOutput]] = {}
        for request_id in [r for r in running if r not in high]:
            identity = running[request_id][0]
            batches.setdefault(identity, []).append(output(request_id))
        for identity, outputs in batches.items():
            await send(identity, OutputBatch(outputs=outputs))
        if high:
            await asyncio.sleep(priority_lag_s)
            for request_id in high:
                if request_id in running:
                    await send(running[request_id][0], OutputBatch(outputs=[output(request_id)]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=64, help="background streams, all at once")
    parser.add_argument("--step-ms", type=float, default=9.0, help="the engine stand-in's step time")
    parser.add_argument("--priority-lag-ms", type=float, default=1.0,
                        help="a high-priority first token comes this long after its step's batch")
    parser.add_argument("--probes", type=int, default=20)
    parser.add_argument("--port", type=int, default=8097)
    parser.add_argument("--frontend-log", type=Path, help="the frontend's log (at --log-level debug)")
    parser.add_argument("--engine", action="store_true", help=argparse.SUPPRESS)  # the stand-in's own process
    parser.add_argument("--address", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.engine:
        asyncio.run(serve_engine(args.address, args.step_ms / 1e3, args.priority_lag_ms / 1e3))
        return 0
    run_dir = Path(tempfile.mkdtemp(prefix="sfllm-frontend-bench-"))
    address = f"ipc://{run_dir}/engine.sock"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    engine = subprocess.Popen([sys.executable, __file__, "--engine", "--address", address, "--step-ms",
                               str(args.step_ms), "--priority-lag-ms", str(args.priority_lag_ms)], env=env)
    log = open(args.frontend_log, "w") if args.frontend_log else subprocess.DEVNULL
    frontend = subprocess.Popen([sys.executable, "-m", "sfllm", "frontend", "--engine-address", address, "--port",
                                 str(args.port), "--host", "127.0.0.1", "--run-dir", str(run_dir),
                                 "--log-level", "debug" if args.frontend_log else "info"],
                                env=env, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{args.port}/health", timeout=1)
                break
            except OSError:
                if time.monotonic() > deadline or frontend.poll() is not None:
                    print("the frontend did not come up", file=sys.stderr)
                    return 1
                time.sleep(0.2)
        return subprocess.call([sys.executable, "-m", "sfllm", "bench", "priority", "--url",
                                f"http://127.0.0.1:{args.port}", "--probes", str(args.probes), "--warmup", "2",
                                "--probe-input-len", "16", "--probe-output-len", "4", "--background-requests",
                                str(args.streams), "--input-len", "16", "--output-len", "100000",
                                "--vocab-size", "49152"], env=env)
    finally:
        for process in (frontend, engine):
            process.send_signal(signal.SIGTERM)
        for process in (frontend, engine):
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()


if __name__ == "__main__":
    sys.exit(main())
