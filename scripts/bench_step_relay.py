"""What it costs rank 0 to hand each step to the other tensor-parallel ranks, two ways: the relay sfllm uses (the
message's bytes, as received, sent over a ZeroMQ PAIR socket per rank) and a gloo broadcast (length, then the
bytes) on a CPU process group. Per step: rank 0's time in the call, and the time until the other rank has
decoded the message (half a round trip). Median of 2,000 steps each, for decode steps of 1, 64 and 256
sequences and a prefill chunk of 8,192 tokens.

    python scripts/bench_step_relay.py
"""
from __future__ import annotations

import datetime
import multiprocessing
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import zmq

from sfllm.messages import ForwardBatch, MessageCodec, SchedulerToWorker

STEPS = 2000


def step(num_seqs: int, tokens_each: int) -> ForwardBatch:
    return ForwardBatch(step_id=123456, slots=list(range(num_seqs)), num_new_tokens=[tokens_each] * num_seqs,
                        context_lens=[1000 + s for s in range(num_seqs)],
                        input_token_ids=[-1] * num_seqs if tokens_each == 1 else list(range(num_seqs * tokens_each)),
                        sample=[True] * num_seqs)


CASES = {"decode 1": step(1, 1), "decode 64": step(64, 1), "decode 256": step(256, 1),
         "prefill 8192 tokens": step(1, 8192)}


def _zmq_follower(address: str) -> None:
    codec = MessageCodec(SchedulerToWorker)
    sock = zmq.Context().socket(zmq.PAIR)
    sock.connect(address)
    while (data := sock.recv()) != b"":
        codec.decode(data)
        sock.send(b"\0")


def _gloo_rank(rank: int, rendezvous: str, results) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    codec = MessageCodec(SchedulerToWorker)
    for name, batch in CASES.items():
        data = codec.encode(batch)
        length = torch.zeros(1, dtype=torch.int64)
        payload = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        times = []  # rank 0: its call; rank 1: until it has decoded, from the barrier both leave together
        for _ in range(STEPS):
            dist.barrier()
            started = time.perf_counter()
            if rank == 0:
                length[0] = len(data)
            dist.broadcast(length, 0)
            received = payload if rank == 0 else torch.empty(int(length), dtype=torch.uint8)
            dist.broadcast(received, 0)
            if rank == 1:
                codec.decode(received.numpy().tobytes())
            times.append(time.perf_counter() - started)
        results.put((rank, name, statistics.median(times)))
    dist.destroy_process_group()


def main() -> None:
    codec = MessageCodec(SchedulerToWorker)
    folder = Path(tempfile.mkdtemp())
    address = f"ipc://{folder / 'relay.sock'}"
    context = multiprocessing.get_context("spawn")
    follower = context.Process(target=_zmq_follower, args=(address,))
    sock = zmq.Context().socket(zmq.PAIR)
    sock.bind(address)
    follower.start()
    print(f"{'step':<22}{'bytes':>8}   {'zmq: send':>10} {'delivered':>10}   {'gloo: call':>11} {'delivered':>10}")
    zmq_times = {}
    for name, batch in CASES.items():
        data = codec.encode(batch)
        sends, round_trips = [], []
        for _ in range(STEPS):
            started = time.perf_counter()
            sock.send(data)
            sent = time.perf_counter()
            sock.recv()
            sends.append(sent - started)
            round_trips.append(time.perf_counter() - started)
        zmq_times[name] = (len(data), statistics.median(sends), statistics.median(round_trips) / 2)
    sock.send(b"")
    follower.join()
    results = context.Queue()
    ranks = [context.Process(target=_gloo_rank, args=(rank, str(folder / "rendezvous"), results)) for rank in (0, 1)]
    for process in ranks:
        process.start()
    gloo = {(rank, name): seconds for rank, name, seconds in (results.get() for _ in range(2 * len(CASES)))}
    for process in ranks:
        process.join()
    for name, (size, send, delivered) in zmq_times.items():
        call, gloo_delivered = gloo[0, name], gloo[1, name]
        print(f"{name:<22}{size:>8}   {1e6 * send:>8.0f}us {1e6 * delivered:>8.0f}us   "
              f"{1e6 * call:>9.0f}us {1e6 * gloo_delivered:>8.0f}us")


if __name__ == "__main__":
    main()
